"""AdapterModule: the LightningModule base shared by every trained method, and its export format.

What every method gets from the base:

* a `FrozenCLIP` backbone built only when needed (images in the batch, or a text classifier to
  compute) that never enters checkpoints (``strict_loading = False`` and a filtered ``state_dict``);
* batches of images (online: ``{"image", "label"}``) or of cached features (``{"features", "label"}``):
  `image_features` turns either into L2-normalised CLIP embeddings, so one module trains both ways;
* the zero-shot text classifier, taken from the feature file or computed once from class names;
* validation/test metrics (torchmetrics top-1, top-5, mean per-class recall);
* `adapter_state_dict`, `export` and `load_adapter`: the peft-style ``adapter_config.json`` +
  ``adapter_model.safetensors`` directory, written atomically;
* exact resume: the data order and the training randomness are functions of (seed, epoch, rank,
  step), and the loader position is in the checkpoint.

A method subclasses `AdapterModule`, sets ``method``, defines its modules in ``__init__`` and
implements `training_loss` and `logits` (and optionally `adapt` and `finalize`), then registers with
`register_adapter`. See ``adapters/dac.py``.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import zlib
import warnings
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from adapters.atomic import atomic_path, atomic_write_text
from adapters.backbone import TINY_MODEL, FrozenCLIP, pool_views, register_model_configs
from adapters.errors import ConfigError, UserError
from adapters.metrics import classification_metrics
from adapters.protocol import templates_for

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1

ADAPTERS: dict[str, type["AdapterModule"]] = {}


def register_adapter(cls: type["AdapterModule"]) -> type["AdapterModule"]:
    """Class decorator: make an adapter method loadable by name from its export."""
    ADAPTERS[cls.method] = cls
    return cls


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """Run ``module`` in eval mode (no dropout) and give it back in the mode it was in.

    What is derived from trained weights (a cache built from adapted keys, a search on val) must not
    depend on dropout: at the end of fit Lightning leaves the module in train mode."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def model_embed_dim(model_name: str) -> int:
    """The joint embedding dimension of an open_clip architecture, read from its config (no weights)."""
    register_model_configs()
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ConfigError(f"backbone: unknown open_clip architecture {model_name!r}")
    return int(cfg["embed_dim"])


class AdapterModule(L.LightningModule):
    """Base of the trained adapters (see the module docstring).

    Args:
        num_classes: number of classes (linked from the DataModule by ``train.py``).
        class_names: class names, used for the zero-shot classifier when the data has no text features.
        backbone: open_clip architecture of the frozen encoder.
        pretrained: its weights: hub tag, local checkpoint file, or None (random; tests and demos).
        embed_dim: embedding dimension (linked from the data; defaults to the backbone's).
        dataset: dataset name, selecting the protocol's prompt templates.
        templates: prompt templates overriding the dataset's.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        scheduler: ``"cosine"`` (over all training steps) or ``"constant"``.
    """

    method: ClassVar[str] = ""

    def __init__(self, num_classes: int, class_names: list[str] | None = None, backbone: str = TINY_MODEL,
                 pretrained: str | None = None, embed_dim: int | None = None, dataset: str | None = None,
                 templates: list[str] | None = None, lr: float = 1e-3, weight_decay: float = 0.01,
                 scheduler: str = "cosine"):
        super().__init__()
        self.save_hyperparameters()
        if num_classes < 2:
            raise ConfigError(f"num_classes: must be >= 2, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ConfigError(f"class_names: {len(class_names)} names for num_classes={num_classes}")
        if scheduler not in ("cosine", "constant"):
            raise ConfigError(f"scheduler: must be 'cosine' or 'constant', got {scheduler!r}")
        self.embed_dim = embed_dim or model_embed_dim(backbone)
        self.strict_loading = False  # the frozen backbone is never in checkpoints
        #: The data splits choices were made on at training time: "head" (the inference head's
        #: hyper-parameters) and "weights" (e.g. an epoch chosen on val). Exported, so that no
        #: evaluation scores the adapter on a split it was tuned on.
        self.selection: dict[str, str | None] = {"head": None, "weights": None}
        self.val_metrics = classification_metrics(num_classes, prefix="val/")
        self.test_metrics = classification_metrics(num_classes, prefix="test/")
        self.register_buffer("text_features", torch.zeros(0, self.embed_dim))

    # -- the frozen backbone --------------------------------------------------------------------------
    @property
    def backbone(self) -> FrozenCLIP:
        """The frozen open_clip model, built on first use (cached-feature runs may never need it)."""
        if "backbone" not in self._modules:
            with warnings.catch_warnings():
                if self.hparams.pretrained is None:
                    warnings.simplefilter("ignore")
                # not add_module(): it probes hasattr(self, "backbone"), i.e. this property
                self._modules["backbone"] = FrozenCLIP(self.hparams.backbone, self.hparams.pretrained).to(self.device)
            if self.backbone.embed_dim != self.embed_dim:
                raise ConfigError(f"embed_dim: {self.embed_dim} but backbone {self.hparams.backbone} "
                                  f"embeds in {self.backbone.embed_dim} dimensions")
        return self._modules["backbone"]

    def use_backbone(self, backbone: FrozenCLIP) -> None:
        """Use an existing FrozenCLIP instead of building one (it must match the configured one)."""
        if backbone.model_name != self.hparams.backbone:
            raise ConfigError(f"backbone: adapter was trained on {self.hparams.backbone}, got {backbone.model_name}")
        self._modules["backbone"] = backbone

    def state_dict(self, *args, **kwargs) -> dict[str, Any]:
        """Everything but the frozen backbone (and the metric states)."""
        state = super().state_dict(*args, **kwargs)
        return {k: v for k, v in state.items() if not k.startswith(("backbone.", "val_metrics.", "test_metrics."))}

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors an export holds: trained parameters and the buffers inference needs."""
        return {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}

    # -- data -----------------------------------------------------------------------------------------
    @property
    def has_text(self) -> bool:
        return self.text_features.numel() > 0

    def setup(self, stage: str) -> None:
        """Take the text classifier and the backbone check from the DataModule."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        self._check_data(dm)
        if self.has_text:
            return
        text = getattr(dm, "text_features", None)
        if text is not None:
            self.text_features = text.float().to(self.device)
        elif self.hparams.class_names:
            templates = self.hparams.templates or list(templates_for(self.hparams.dataset))
            self.text_features = self.backbone.zero_shot_classifier(self.hparams.class_names, templates)
        if self.has_text and self.text_features.shape != (self.hparams.num_classes, self.embed_dim):
            raise ConfigError(f"text features: shape {tuple(self.text_features.shape)} does not fit "
                              f"num_classes={self.hparams.num_classes}, embed_dim={self.embed_dim}")

    def _check_data(self, dm) -> None:
        meta = getattr(dm, "metadata", None) or {}
        name = meta.get("backbone")
        if name and name != self.hparams.backbone:
            raise ConfigError(f"model.backbone: {self.hparams.backbone} but the features were extracted with {name}")
        num_classes = getattr(dm, "num_classes", None)
        if num_classes is not None and num_classes != self.hparams.num_classes:
            raise ConfigError(f"model.num_classes: {self.hparams.num_classes} but the data has {num_classes} classes")

    def encode(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image embeddings [B, D] through the (frozen) encoder this method classifies with."""
        return self.backbone.encode_image(images, normalize=normalize).float()

    def image_features(self, batch: dict) -> torch.Tensor:
        """L2-normalised CLIP embeddings of a batch: [B, D], or [B, V, D] for images with V views."""
        if "features" in batch:
            return F.normalize(batch["features"].float(), dim=-1)
        images = batch["image"]
        if images.ndim == 5:
            b, v = images.shape[:2]
            return self.encode(images.flatten(0, 1)).view(b, v, -1)
        return self.encode(images)

    def pooled_features(self, batch: dict) -> torch.Tensor:
        """One L2-normalised embedding per image [B, D]: views pooled by `pool_views` (mean of the raw
        view embeddings, then normalised), as Tip-Adapter builds its cache keys."""
        if "features" in batch:
            return F.normalize(batch["features"].float(), dim=-1)
        images = batch["image"]
        if images.ndim == 5:
            b, v = images.shape[:2]
            return pool_views(self.encode(images.flatten(0, 1), normalize=False).view(b, v, -1))
        return self.encode(images)

    @torch.no_grad()
    def embed_split(self, source) -> "Split":
        """The embeddings of a split a head needs: a cached `Split` as it is, or an `ImageSplit` (images
        from shards, with views) embedded here, views pooled by `pool_views`. Every rank computes the
        same (caches and searches need the whole split)."""
        from datamodules.features import Split

        if isinstance(source, Split):
            return Split(F.normalize(source.features.float(), dim=-1), source.labels, source.name)
        feats, labels = [], []
        with eval_mode(self):
            for batch in source.loader:
                batch = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
                feats.append(self.pooled_features(batch).cpu())
                labels.append(batch["label"].cpu())
        return Split(torch.cat(feats), torch.cat(labels), source.name)

    # -- what a method implements ---------------------------------------------------------------------
    def adapt(self, features: torch.Tensor) -> torch.Tensor:
        """Adapted image embeddings (identity for methods that do not change the image side)."""
        return features

    @property
    def adapts_features(self) -> bool:
        """Whether `adapt` changes image embeddings (then heads can run on the adapted features)."""
        return type(self).adapt is not AdapterModule.adapt

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits [B, C] for original CLIP embeddings [B, D]."""
        raise NotImplementedError

    def training_loss(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(loss, extra values to log) for a batch of original embeddings ([B, D] or [B, V, D])."""
        raise NotImplementedError

    def finalize(self) -> None:
        """Fit what is chosen after training (e.g. hyper-parameters on val). Idempotent."""

    def export_config(self) -> dict:
        """Method-specific fields of ``adapter_config.json`` (beyond the constructor arguments)."""
        return {}

    def load_export_config(self, config: dict) -> None:
        """Restore what `export_config` wrote."""

    # -- Lightning hooks ------------------------------------------------------------------------------
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, extra = self.training_loss(self.image_features(batch), batch["label"])
        bs = len(batch["label"])
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for k, v in extra.items():
            self.log(f"train/{k}", v, batch_size=bs)
        return loss

    def _evaluate(self, batch: dict, metrics) -> dict:
        """Update and log ``metrics``; return original and adapted embeddings (for the overlap callback)."""
        features = self.image_features(batch)
        if features.ndim == 3:
            features = F.normalize(features.mean(1), dim=-1)
        metrics.update(self.logits(features), batch["label"])
        self.log_dict(metrics, on_epoch=True, batch_size=len(batch["label"]))
        return {"original": features, "adapted": self.adapt(features), "label": batch["label"]}

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self._evaluate(batch, self.val_metrics)

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return self._evaluate(batch, self.test_metrics)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Adapted embeddings for feature extraction (views pooled by `pool_views`, as Tip-Adapter)."""
        return {"features": self.adapt(self.pooled_features(batch)), "label": batch["label"], "key": batch.get("key"),
                "dataloader_idx": dataloader_idx}

    def on_train_epoch_start(self) -> None:
        dm = self.trainer.datamodule
        if hasattr(dm, "set_epoch"):  # streaming data reshuffles shards per epoch
            dm.set_epoch(self.current_epoch)

    def on_train_epoch_end(self) -> None:
        skipped = getattr(self.trainer.datamodule, "corrupt_count", None)
        if skipped is not None:
            self.log("data/corrupt_skipped", float(skipped), sync_dist=True, reduce_fx="sum")

    def on_fit_end(self) -> None:
        self.finalize()

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if self.hparams.scheduler == "constant":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- exact resume ---------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["adapter_extra"] = self.export_config()
        checkpoint["adapter_selection"] = dict(self.selection)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if checkpoint.get("adapter_extra"):
            self.load_export_config(checkpoint["adapter_extra"])
        self.selection.update(checkpoint.get("adapter_selection") or {})
        # Lightning restores a stateful train loader only if it builds it after the checkpoint is read;
        # `estimated_stepping_batches` (the cosine schedule) builds it before. This hook runs before
        # either, so hand the saved loader state to the DataModule, which applies it to its loader.
        loader_states = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {}).get("combined_loader")
        dm = self._trainer.datamodule if self._trainer is not None else None
        if loader_states and hasattr(dm, "restore_loader_state"):
            dm.restore_loader_state(loader_states[0])

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Training randomness (dropout, feature noise) is a function of (seed, rank, epoch, batch), not of
        # everything that drew from the global RNG before (validation, loader start-up): a resumed run
        # draws exactly what the uninterrupted run drew at the same step, with no RNG state to restore.
        seed = zlib.crc32(f"{os.environ.get('PL_GLOBAL_SEED', 0)}-{self.global_rank}-{self.current_epoch}-{batch_idx}"
                          .encode())
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)

    # -- export ---------------------------------------------------------------------------------------
    def export(self, directory: str | Path) -> Path:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (adapter tensors only)."""
        self.finalize()
        directory = Path(directory)
        hparams = {k: v for k, v in dict(self.hparams).items() if not k.startswith("_")}  # CLI-internal keys
        config = {
            "format_version": FORMAT_VERSION, "method": self.method, "config": hparams,
            "backbone": self.hparams.backbone, "pretrained": self.hparams.pretrained, "embed_dim": self.embed_dim,
            "num_classes": self.hparams.num_classes, "class_names": self.hparams.class_names,
            "dataset": self.hparams.dataset, "selected_on": dict(self.selection),
            "extra": self.export_config(), "versions": _versions(),
        }
        tensors = self.adapter_state_dict()
        with atomic_path(directory / WEIGHTS_NAME) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt", "method": self.method})
        atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2, default=str))
        return directory


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "lightning", "open_clip_torch", "torchmetrics", "safetensors", "clip-adapters"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def load_adapter(path: str | Path, backbone: FrozenCLIP | None = None, map_location: str = "cpu") -> AdapterModule:
    """Rebuild an exported adapter for inference (eval mode).

    ``backbone``: an existing `FrozenCLIP` to use; by default the one named in the export is built when
    first needed. A backbone or dimension mismatch is a `ConfigError`.
    """
    from adapters import register_builtin_methods

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
    state = load_file(str(weights_path), device=map_location)
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
