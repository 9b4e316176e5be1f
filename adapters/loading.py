"""The one list of built-in methods, and loading an export by the method it names.

Method modules register themselves when imported: trained methods with
`adapters.base.register_adapter`, training-free heads with `adapters.heads.register_head`,
extraction stores with `adapters.stores.register_store`. `BUILTIN_METHODS` lists those modules;
this module sits above them (nothing in ``adapters/`` imports it or the package ``__init__``).
Adding a method is one line here.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from adapters.backbone import FrozenCLIP
from adapters.base import ADAPTERS, CONFIG_NAME, WEIGHTS_NAME, AdapterModule
from adapters.errors import ConfigError, UserError

#: Modules of the built-in methods; importing one registers its adapters, heads and stores.
BUILTIN_METHODS = (
    "adapters.heads",   # zero-shot, prototype, Tip-Adapter, GDA, IsoCLIP, prototype mixing
    "adapters.coder",   # CODER heads, CODER-Adapter
    "adapters.dac",     # DAC-style adapter
    "adapters.imo",     # IMO encoder adapter
    "adapters.tip_adapter_f",  # Tip-Adapter-F
)


def register_builtin_methods() -> None:
    for name in BUILTIN_METHODS:
        importlib.import_module(name)


def heads() -> dict:
    """Every registered training-free head, by name, in registration order."""
    from adapters.heads import HEADS

    register_builtin_methods()
    return HEADS


def load_adapter(path: str | Path, backbone: FrozenCLIP | None = None, map_location: str = "cpu") -> AdapterModule:
    """Rebuild an exported adapter (``adapter_config.json`` + ``adapter_model.safetensors``) for inference,
    in eval mode.

    ``backbone``: an existing `FrozenCLIP` to use; by default the one named in the export is built when
    first needed. A backbone or dimension mismatch is a `ConfigError`.
    """
    register_builtin_methods()
    path = Path(path)
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise UserError(f"{path}: not an adapter export (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        config = json.loads(config_path.read_text())
        method, hparams = config["method"], dict(config["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{config_path}: malformed adapter config ({e})") from None
    if method not in ADAPTERS:
        raise ConfigError(f"{config_path}: unknown adapter method {method!r} (known: {', '.join(sorted(ADAPTERS))})")
    if backbone is not None:
        if backbone.model_name != config["backbone"]:
            raise ConfigError(f"backbone: {path} was trained on {config['backbone']}, got {backbone.model_name}")
        if backbone.embed_dim != config["embed_dim"]:
            raise ConfigError(f"backbone: {path} expects embed_dim {config['embed_dim']}, got {backbone.embed_dim}")
    module = ADAPTERS[method](**hparams)
    if backbone is not None:
        module.use_backbone(backbone)
    module.load_export_config(config.get("extra", {}))
    module.selection.update(config.get("selected_on") or {})
    try:
        state = load_file(str(weights_path), device=map_location)
    except (SafetensorError, OSError) as e:  # as datamodules.feature_file reads a damaged file
        raise UserError(f"{weights_path}: unreadable adapter weights ({str(e).splitlines()[0]})") from None
    _load_exported_state(module, state, path)
    module.eval()
    module.finalize()
    return module


def _load_exported_state(module: AdapterModule, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load with strict key checking; buffers whose size depends on the data are resized first."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ConfigError(f"{path}: export does not fit {module.method} "
                          f"(missing: {missing[:3]}, unexpected: {unexpected[:3]})")
    for name, tensor in state.items():
        target = own[name]
        if target.shape != tensor.shape:
            owner, _, attr = name.rpartition(".")
            sub = module.get_submodule(owner) if owner else module
            if attr in sub._buffers:
                sub._buffers[attr] = torch.empty_like(tensor)
            elif attr in sub._parameters and target.numel() == 0:  # sized by the data at setup
                sub._parameters[attr] = torch.nn.Parameter(torch.empty_like(tensor))
            else:
                raise ConfigError(f"{path}: tensor {name} has shape {tuple(tensor.shape)}, "
                                  f"the model expects {tuple(target.shape)} (dimension mismatch)")
    module.load_state_dict(state, strict=False)
