"""CLIP adapters: trained methods (LightningModules), training-free heads and the frozen backbone.

``adapters.load_adapter(path, backbone=None)`` rebuilds an exported adapter for inference.
"""
import importlib

#: Modules defining the built-in trained methods; importing them registers each with `register_adapter`.
BUILTIN_METHODS = ("adapters.dac", "adapters.coder", "adapters.extractor", "adapters.imo")


def load_adapter(path, backbone=None, map_location="cpu"):
    """Rebuild an exported adapter (``adapter_config.json`` + ``adapter_model.safetensors``) for inference."""
    from adapters.base import load_adapter as _load

    return _load(path, backbone=backbone, map_location=map_location)


def register_builtin_methods() -> None:
    for name in BUILTIN_METHODS:
        importlib.import_module(name)
