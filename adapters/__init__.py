"""CLIP adapters: trained methods (LightningModules), training-free heads and the frozen backbone.

``adapters.load_adapter(path, backbone=None)`` rebuilds an exported adapter for inference (it is
`adapters.loading.load_adapter`, imported on first use so that importing any submodule stays light).
"""


def __getattr__(name: str):
    if name == "load_adapter":
        from adapters.loading import load_adapter

        return load_adapter
    raise AttributeError(f"module 'adapters' has no attribute {name!r}")
