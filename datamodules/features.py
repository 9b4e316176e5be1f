"""FeatureDataModule: train adapters on cached CLIP features (a feature file) in seconds.

The file format and its reader live in `datamodules.feature_file`; this module adds the Lightning
side: a (seed, epoch)-ordered DistributedSampler that resumes mid-epoch, and what the model may ask
of its data (`adapters.base.AdapterData`).
"""
from __future__ import annotations

import lightning as L
import torch

from adapters.data import Split
from adapters.errors import ConfigError
from datamodules.distributed import per_device_batch_size
from datamodules.feature_file import FeatureFile
from datamodules.resumable import ResumableTrainLoader


class _SplitDataset(torch.utils.data.Dataset):
    """Rows of a (memory-mapped) split as ``{"features": fp32 [D], "label": int}``, or with ``views`` each
    image's augmented views as its features, [V, D]."""

    def __init__(self, split: Split, views: bool = False):
        self.split, self.rows = split, (split.extra["views"] if views else split.features)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict:
        return {"features": self.rows[i].float(), "label": self.split.labels[i]}


class EpochSampler(torch.utils.data.DistributedSampler):
    """A DistributedSampler whose order depends only on (seed, epoch, rank), that can skip the samples
    already trained on in the epoch being resumed.

    Rank r takes every R-th index of the (seed, epoch) permutation, so batch j of the R ranks together
    is batch j of a one-device run with R times the batch: a multi-device run of a global batch steps
    on the same samples (exactly so when the split's size is a multiple of the global batch; else the
    last batch differs by the sampler's padding)."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.skip_epoch, self.skip = -1, 0

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.skip:] if self.epoch == self.skip_epoch else indices)


class _ResumableLoader(torch.utils.data.DataLoader):
    """A DataLoader that Lightning saves and restores with the checkpoint (mid-epoch resume)."""

    datamodule: FeatureDataModule

    def state_dict(self) -> dict:
        trainer = self.datamodule.trainer
        if trainer is None:
            return {}
        # Lightning's count of batches trained on (the loader itself runs one prefetched batch ahead)
        return {"epoch": trainer.current_epoch, "batches": trainer.fit_loop.epoch_loop.batch_progress.current.processed}

    def load_state_dict(self, state: dict) -> None:
        if state and 0 < state["batches"] < len(self):
            self.sampler.skip_epoch, self.sampler.skip = state["epoch"], state["batches"] * self.batch_size


class FeatureDataModule(ResumableTrainLoader, L.LightningDataModule):
    """Cached CLIP features from a feature file, for training adapters in seconds.

    Args:
        path: feature file (.safetensors) or extraction directory (with manifest.json).
        shots: K per class for training: the file's ``train_{K}shot`` split, else K sampled per class from
            ``train`` with ``fewshot_seed``; ``None`` trains on all of ``train``.
        fewshot_seed: few-shot sampling seed (1, 2, 3 in the CoOp protocol).
        seed: seed of the per-epoch sample order.
        batch_size: samples per batch and device.
        global_batch_size: samples per optimiser step over all devices (and accumulated batches); when
            set, the per-device ``batch_size`` is derived from it (`datamodules.distributed`). The
            sampler hands each device an equal slice of every global batch, so a multi-device run steps
            on the batches a one-device run of the same global batch steps on.
        num_workers: DataLoader workers (0 is fastest for cached features).
        val_split / test_split: split names, or None.
        train_views: train on every augmented view of each image (``features`` [B, V, D] batches), from
            a file extracted with ``view_rows: true``; otherwise on the pooled row per image.
        protocol: what choices made on val (the head's hyper-parameters, a checkpoint) see: ``full``, the
            whole val split; ``realistic``, min(K, 4) val images per class drawn with ``fewshot_seed``
            (CoOp's rule; `adapters.protocol`).
        fewshot_dir: Dassl's ``split_fewshot`` folder: train (and, under ``realistic``, validate) on the
            subsets its ``shot_{K}-seed_{S}.pkl`` lists, matched on the file's sample keys.
    """

    def __init__(self, path: str, shots: int | None = 16, fewshot_seed: int = 1, seed: int = 0,
                 batch_size: int = 256, num_workers: int = 0, val_split: str | None = "val",
                 test_split: str | None = "test", train_views: bool = False, global_batch_size: int | None = None,
                 protocol: str = "full", fewshot_dir: str | None = None):
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ConfigError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
        self.file = FeatureFile(path)
        self.file.verify([s for s in (val_split, test_split) if s and self.file.has_split(s)] +
                         ([f"train_{shots}shot"] if shots and self.file.has_split(f"train_{shots}shot") else
                          ["train"] if self.file.has_split("train") else []))
        self.shots, self.fewshot_seed, self.seed = shots, fewshot_seed, seed
        self.batch_size, self.num_workers, self.global_batch_size = batch_size, num_workers, global_batch_size
        self.val_split = val_split if val_split and self.file.has_split(val_split) else None
        self.test_split = test_split if test_split and self.file.has_split(test_split) else None
        self.protocol = protocol
        self.train, self.train_description, val, self.val_description = self.file.fewshot(
            shots, fewshot_seed, protocol, fewshot_dir)
        self.val = val if self.val_split == "val" else self.file.split(self.val_split) if self.val_split else None
        if train_views and "views" not in self.train.extra:
            raise ConfigError(f"train_views: {path} has no view rows for {self.train.name} "
                              "(extract with view_rows: true and views > 1)")
        self.train_views = train_views

    # -- what models link to and ask for (adapters.base.AdapterData) ---------------------------------------
    #: Cached features need no transforms, and nothing is skipped as corrupt while training.
    takes_images = False
    corrupt_count = 0

    @property
    def num_classes(self) -> int:
        return self.file.num_classes

    @property
    def class_names(self) -> list[str] | None:
        return self.file.class_names

    @property
    def dim(self) -> int:
        return self.file.dim

    @property
    def metadata(self) -> dict[str, str]:
        return self.file.metadata

    @property
    def dataset_name(self) -> str:
        return self.file.dataset

    @property
    def text_features(self) -> torch.Tensor | None:
        return self.file.text_features

    @property
    def extras(self) -> dict[str, torch.Tensor]:
        return self.file.extras

    def head_data(self) -> tuple[Split, Split | None]:
        """The K-shot training split and the val split, whole (for caches and hyper-parameter searches)."""
        return self.train, self.val

    def setup(self, stage: str) -> None:
        if self.global_batch_size and self.trainer is not None:
            self.batch_size = per_device_batch_size(self.global_batch_size, self.trainer)

    def set_epoch(self, epoch: int) -> None:
        """Nothing to do: Lightning sets the DistributedSampler's epoch itself."""

    def set_transforms(self, train, eval) -> None:
        """Nothing to do: features are already embedded."""

    # -- loaders ------------------------------------------------------------------------------------------
    def _loader(self, split: Split, train: bool) -> torch.utils.data.DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        dataset = _SplitDataset(split, views=train and self.train_views)
        sampler = EpochSampler(dataset, world, rank, self.seed, shuffle=train)
        cls = _ResumableLoader if train else torch.utils.data.DataLoader
        loader = cls(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                     persistent_workers=self.num_workers > 0)
        loader.datamodule = self
        return loader

    def train_dataloader(self):
        return self._resume_loader(self._loader(self.train, train=True))

    def val_dataloader(self):
        return [] if self.val is None else self._loader(self.val, train=False)

    def test_dataloader(self):
        return [] if self.test_split is None else self._loader(self.file.split(self.test_split), train=False)
