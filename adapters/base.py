"""The LightningModule bases of every method, the model-data contract, and the export format.

* `AdapterData` (a `typing.Protocol`) is everything a model may ask of its DataModule: classes,
  metadata, text features, the file's extra tensors, the splits a head needs, the epoch, the loader
  state, and transforms handed over by the model. Both built-in DataModules provide all of it; the
  data side returns data and never calls the model.
* `BackboneModule` holds the frozen `FrozenCLIP` backbone (built only when needed, never in a
  checkpoint), turns batches of images or of cached features into L2-normalised embeddings, embeds
  the splits a head needs, and takes the text classifier from the data. The feature extractor is one.
* `AdapterModule` adds training: metrics, optimiser, exact resume (data order and training
  randomness are functions of (seed, epoch, rank, step) and the loader position is in the
  checkpoint), `selection` (what was chosen on which split), and the peft-style export
  (``adapter_config.json`` + ``adapter_model.safetensors``), written atomically as a pair.

A trained method subclasses `AdapterModule` (or `adapters.cached.CachedHeadAdapter` when it infers
with a cache head), sets ``method``, defines its modules in ``__init__``, implements `training_loss`
and `logits` (optionally `adapt` and `finalize`) and registers with `register_adapter`; one line in
`adapters.loading.BUILTIN_METHODS` makes its exports loadable by name. See ``adapters/dac.py``.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from adapters.atomic import atomic_directory
from adapters.backbone import TINY_MODEL, FrozenCLIP, embed_dim_of, pool_views
from adapters.data import ImageSplit, Split
from adapters.errors import ConfigError
from adapters.metrics import classification_metrics
from adapters.protocol import templates_for

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1

ADAPTERS: dict[str, type[AdapterModule]] = {}


def register_adapter(cls: type[AdapterModule]) -> type[AdapterModule]:
    """Class decorator: make an adapter method loadable by name from its export."""
    ADAPTERS[cls.method] = cls
    return cls


def derived(module: torch.nn.Module, name: str, value: Any) -> Any:
    """Set ``module.<name>`` to something derived from its tensors (a fitted head, an attached encoder)
    without registering it as a submodule: it then never enters ``state_dict``, checkpoints or exports
    (``nn.Module.__setattr__`` would register a Module value)."""
    module.__dict__[name] = value
    return value


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


@runtime_checkable
class AdapterData(Protocol):
    """What a model may ask of its DataModule (`datamodules.features.FeatureDataModule` and
    `datamodules.images.ImageShardDataModule` provide all of it)."""

    #: Number of classes, their names (or None) and the dataset's name (selects prompt templates).
    num_classes: int
    class_names: list[str] | None
    dataset_name: str | None
    #: Embedding dimension of cached features; None for images (the backbone decides).
    dim: int | None
    #: Identity of cached features (``backbone``, ``pretrained``, ...); empty for images.
    metadata: dict[str, str]
    #: The zero-shot classifier stored with cached features, or None.
    text_features: torch.Tensor | None
    #: File-level tensors stored at extraction by methods' stores (``coder.*``, ...), by full name.
    extras: dict[str, torch.Tensor]
    #: Whether the data are images, which need the model's transforms (`set_transforms`).
    takes_images: bool
    #: Corrupt shards/samples skipped so far (0 for cached features).
    corrupt_count: int
    #: The selection protocol of val (`adapters.protocol.PROTOCOLS`): the whole val split, or a few-shot one.
    protocol: str

    def head_data(self) -> tuple[Split | ImageSplit, Split | ImageSplit | None]:
        """The (few-shot) training split and val, whole: what caches and searches are built from."""

    def set_epoch(self, epoch: int) -> None:
        """Called at each train epoch start (streamed data reshuffle shards per epoch)."""

    def set_transforms(self, train: Callable, eval: Callable) -> None:
        """The model's image transforms, handed over before any loader is built."""

    def restore_loader_state(self, state: dict) -> None:
        """A checkpoint's train-loader state, applied to the next train loader built."""


class BackboneModule(L.LightningModule):
    """A frozen open_clip backbone as a LightningModule (see the module docstring).

    Args:
        num_classes: number of classes (linked from the DataModule by ``train.py``).
        class_names: class names, used for the zero-shot classifier when the data has no text features.
        backbone: open_clip architecture of the frozen encoder.
        pretrained: its weights: hub tag, ``hf-hub:`` name, local checkpoint file, or None (random;
            tests and demos).
        cache_dir: where open_clip looks for and stores downloaded weights (None: its default).
        embed_dim: embedding dimension (linked from the data; defaults to the backbone's).
        dataset: dataset name, selecting the protocol's prompt templates.
        templates: prompt templates overriding the dataset's.
    """

    #: Whether the method uses the zero-shot classifier (IMO classifies its own training classes).
    uses_text: ClassVar[bool] = True

    def __init__(self, num_classes: int, class_names: list[str] | None = None, backbone: str = TINY_MODEL,
                 pretrained: str | None = None, cache_dir: str | None = None, embed_dim: int | None = None,
                 dataset: str | None = None, templates: list[str] | None = None):
        super().__init__()
        self.save_hyperparameters()  # the arguments of every constructor up the subclass chain
        if num_classes is None:
            raise ConfigError("num_classes: not set; it comes from the data (train.py: --data "
                              "configs/data/<dataset>.yaml) or must be given")
        if num_classes < 2:
            raise ConfigError(f"num_classes: must be >= 2, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ConfigError(f"class_names: {len(class_names)} names for num_classes={num_classes}")
        self.embed_dim = embed_dim or embed_dim_of(backbone, cache_dir)
        self.strict_loading = False  # the frozen backbone is never in checkpoints
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
                self._modules["backbone"] = FrozenCLIP(self.hparams.backbone, self.hparams.pretrained,
                                                       cache_dir=self.hparams.get("cache_dir")).to(self.device)
            if self.backbone.embed_dim != self.embed_dim:
                raise ConfigError(f"embed_dim: {self.embed_dim} but backbone {self.hparams.backbone} "
                                  f"embeds in {self.backbone.embed_dim} dimensions")
        return self._modules["backbone"]

    def use_backbone(self, backbone: FrozenCLIP) -> None:
        """Use an existing FrozenCLIP instead of building one (it must match the configured one)."""
        if backbone.model_name != self.hparams.backbone:
            raise ConfigError(f"backbone: adapter was trained on {self.hparams.backbone}, got {backbone.model_name}")
        self._modules["backbone"] = backbone

    @property
    def train_transform(self) -> Callable:
        """What image training batches go through (the few-shot protocol's augmentation by default)."""
        return self.backbone.train_transform

    def state_dict(self, *args, **kwargs) -> dict[str, Any]:
        """Everything but the frozen backbone (and the metric states)."""
        state = super().state_dict(*args, **kwargs)
        return {k: v for k, v in state.items() if not k.startswith(("backbone.", "val_metrics.", "test_metrics."))}

    # -- data -----------------------------------------------------------------------------------------
    @property
    def has_text(self) -> bool:
        return self.text_features.numel() > 0

    @property
    def data(self) -> AdapterData | None:
        """The trainer's DataModule, checked against the `AdapterData` contract (None without one)."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None and not isinstance(dm, AdapterData):
            missing = [name for name in AdapterData.__annotations__ if not hasattr(dm, name)]
            raise ConfigError(f"data: {type(dm).__name__} does not provide what the model needs "
                              f"(adapters.base.AdapterData; missing: {', '.join(missing) or 'methods'})")
        return dm

    def setup(self, stage: str) -> None:
        """Check the data against the model, hand over the transforms, take the text classifier."""
        dm = self.data
        if dm is None:
            return
        self._check_data(dm)
        if dm.takes_images:
            dm.set_transforms(self.train_transform, self.backbone.eval_transform)
        if self.has_text or not self.uses_text:
            return
        if dm.text_features is not None:
            self.text_features = dm.text_features.float().to(self.device)
        elif self.hparams.class_names:
            templates = self.hparams.templates or list(templates_for(self.hparams.dataset))
            self.text_features = self.backbone.zero_shot_classifier(self.hparams.class_names, templates)
        if self.has_text and self.text_features.shape != (self.hparams.num_classes, self.embed_dim):
            raise ConfigError(f"text features: shape {tuple(self.text_features.shape)} does not fit "
                              f"num_classes={self.hparams.num_classes}, embed_dim={self.embed_dim}")

    def _check_data(self, dm: AdapterData) -> None:
        name = dm.metadata.get("backbone")
        if name and name != self.hparams.backbone:
            raise ConfigError(f"model.backbone: {self.hparams.backbone} but the features were extracted with {name}")
        if dm.num_classes != self.hparams.num_classes:
            raise ConfigError(f"model.num_classes: {self.hparams.num_classes} but the data has {dm.num_classes} classes")

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
    def embed_split(self, source: Split | ImageSplit) -> Split:
        """The embeddings of a split a head needs: a cached `Split` as it is (normalised), or an
        `ImageSplit` embedded here with views pooled by `pool_views`. Every rank computes the same
        (caches and searches need the whole split)."""
        if isinstance(source, Split):
            return Split(F.normalize(source.features.float(), dim=-1), source.labels, source.name)
        feats, labels = [], []
        with eval_mode(self):
            for batch in source.loader:
                batch = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
                feats.append(self.pooled_features(batch).cpu())
                labels.append(batch["label"].cpu())
        return Split(torch.cat(feats), torch.cat(labels), source.name)

    # -- what a method may change ---------------------------------------------------------------------
    def adapt(self, features: torch.Tensor) -> torch.Tensor:
        """Adapted image embeddings (identity for methods that do not change the image side)."""
        return features

    @property
    def adapts_features(self) -> bool:
        """Whether `adapt` changes image embeddings (then heads can run on the adapted features)."""
        return type(self).adapt is not BackboneModule.adapt

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Embeddings for feature extraction (views pooled by `pool_views`, as Tip-Adapter)."""
        return {"features": self.adapt(self.pooled_features(batch)), "label": batch["label"], "key": batch.get("key"),
                "dataloader_idx": dataloader_idx}

    # -- what a feature file written from this module holds (callbacks.feature_writer asks) -----------
    def feature_file_extras(self) -> dict[str, torch.Tensor]:
        """File-level tensors stored beside the features (e.g. a method's text set)."""
        return {}

    def feature_file_metadata(self) -> dict[str, str]:
        """Metadata of the feature file: the backbone's identity, plus what the module adds."""
        return {"backbone": self.hparams.backbone, "pretrained": self.hparams.pretrained or "none",
                "dim": str(self.embed_dim)}


class AdapterModule(BackboneModule):
    """Base of the trained adapters (see the module docstring).

    Args:
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        eps: AdamW epsilon (Tip-Adapter-F uses 1e-4).
        scheduler: ``"cosine"`` (over all training steps) or ``"constant"``.
        **kwargs: `BackboneModule` arguments (num_classes, class_names, backbone, pretrained, ...).
    """

    method: ClassVar[str] = ""
    #: Whether the method changes the image encoder itself (its `encode` gives adapted embeddings and
    #: its ``predict_step`` writes original and adapted ones: the extractor's ``adapter`` option).
    adapts_encoder: ClassVar[bool] = False

    def __init__(self, num_classes: int, class_names: list[str] | None = None, backbone: str = TINY_MODEL,
                 pretrained: str | None = None, cache_dir: str | None = None, embed_dim: int | None = None,
                 dataset: str | None = None, templates: list[str] | None = None, lr: float = 1e-3,
                 weight_decay: float = 0.01, eps: float = 1e-8, scheduler: str = "cosine"):
        super().__init__(num_classes, class_names, backbone, pretrained, cache_dir, embed_dim, dataset, templates)
        if scheduler not in ("cosine", "constant"):
            raise ConfigError(f"scheduler: must be 'cosine' or 'constant', got {scheduler!r}")
        for name, value in (("lr", lr), ("eps", eps)):
            if not value > 0:  # also refuses NaN
                raise ConfigError(f"{name}: must be > 0, got {value}")
        if not weight_decay >= 0:
            raise ConfigError(f"weight_decay: must be >= 0, got {weight_decay}")
        self.val_metrics = classification_metrics(num_classes, prefix="val/")
        self.test_metrics = classification_metrics(num_classes, prefix="test/")
        #: The data splits choices were made on at training time: "head" (the inference head's
        #: hyper-parameters) and "weights" (e.g. an epoch chosen on val). Exported, so that no
        #: evaluation scores the adapter on a split it was tuned on.
        self.selection: dict[str, str | None] = {"head": None, "weights": None}

    def feature_file_metadata(self) -> dict[str, str]:
        meta = super().feature_file_metadata()
        if self.adapts_encoder:  # the file's ``{split}.adapted`` rows come from this method's encoder
            meta["adapter"] = self.method
        return meta

    # -- what a method implements ---------------------------------------------------------------------
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
        features = self.pooled_features(batch)
        metrics.update(self.logits(features), batch["label"])
        self.log_dict(metrics, on_epoch=True, batch_size=len(batch["label"]))
        return {"original": features, "adapted": self.adapt(features), "label": batch["label"]}

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self._evaluate(batch, self.val_metrics)

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return self._evaluate(batch, self.test_metrics)

    def on_train_epoch_start(self) -> None:
        self.data.set_epoch(self.current_epoch)  # streamed data reshuffle shards per epoch

    def on_train_epoch_end(self) -> None:
        if self.data.takes_images:
            self.log("data/corrupt_skipped", float(self.data.corrupt_count), sync_dist=True, reduce_fx="sum")

    def on_fit_end(self) -> None:
        self.finalize()

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay,
                                      eps=self.hparams.eps)
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
        if loader_states and self.data is not None:
            self.data.restore_loader_state(loader_states[0])

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
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors an export holds: trained parameters and the buffers inference needs."""
        return {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}

    def export(self, directory: str | Path) -> Path:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (adapter tensors only), as a
        pair: both appear at once, or the previous export stays whole."""
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
        with atomic_directory(directory) as tmp:
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "method": self.method})
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, default=str))
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
