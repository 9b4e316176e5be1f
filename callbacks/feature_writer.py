"""Write extracted features during ``train.py predict``, shard by shard, resumably.

Every rank writes one *piece* per shard it reads, ``pieces/{split}/{shard}.safetensors``, as soon as
all of that shard's samples are embedded (atomically), holding fp16 features, labels, sample keys and
every other per-sample tensor the model's ``predict_step`` returns (stored as ``{split}.<name>``). So
memory holds only the shards in flight, and a killed extraction keeps what it finished: run the same
command again and it skips the shards whose pieces exist (`ImageShardDataModule.exclude_from_predict`)
and embeds only the rest. ``extraction.json`` records the settings the pieces were made with; a
second run with other settings is refused rather than mixed in.

When every rank is done (a barrier), rank 0 writes ``header.safetensors`` (the text classifier, the
file-level tensors the model declares, `adapters.base.BackboneModule.feature_file_extras`, and an
empty row set for each split) and then ``manifest.json`` listing the header and every piece
(atomically, last): a directory with a manifest is complete. `datamodules.feature_file.FeatureFile`
reads it as one file, rows in key order (identical whatever the number of ranks or restarts), and
``evaluate.py`` takes it. A directory that already holds a complete extraction is never written over.

A resumed extraction gives the features of an uninterrupted one bit for bit when batches do not span
shards (the batch size divides the shard sizes); otherwise the BLAS sums of the batches that now hold
other neighbours may differ in the last fp16 bit.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from adapters.atomic import atomic_write_text
from adapters.errors import ConfigError
from datamodules.feature_file import MANIFEST, MANIFEST_FORMAT, write_feature_file

log = logging.getLogger(__name__)

#: Fields of a prediction that are not per-sample tensors to store under their own name.
_FIXED = ("features", "label", "key", "dataloader_idx")
HEADER = "header.safetensors"
SETTINGS = "extraction.json"


class FeatureWriter(BasePredictionWriter):
    """Collect ``predict_step`` outputs per shard and write each shard's piece when it is complete.

    Args:
        output_dir: directory of the pieces, the header and ``manifest.json``.
    """

    def __init__(self, output_dir: str | Path):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self._pending: dict[tuple[str, str], dict] = {}
        self._expected: dict[str, dict[str, int]] = {}

    # -- before the loaders are built: what is done already -------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        if (self.output_dir / MANIFEST).exists():
            raise ConfigError(f"features: {self.output_dir} already holds a complete extraction; use another "
                              "--run_dir (nothing is written over)")
        dm = trainer.datamodule
        settings = self._settings(pl_module, dm)
        path = self.output_dir / SETTINGS
        if path.exists():
            previous = json.loads(path.read_text())
            changed = sorted(k for k in set(settings) | set(previous) if settings.get(k) != previous.get(k))
            if changed:
                raise ConfigError(f"features: {self.output_dir} holds part of an extraction made with other "
                                  f"settings ({', '.join(changed)} differ); use another --run_dir")
        elif trainer.is_global_zero:
            atomic_write_text(path, json.dumps(settings, indent=1, sort_keys=True))
        self._expected = {split: dm.shard_counts(split) for split in dm.predict_splits}
        done = 0
        for split in dm.predict_splits:
            names = {p.name[: -len(".safetensors")] for p in self._piece_dir(split).glob("*.safetensors")}
            dm.exclude_from_predict(split, names)
            done += len(names)
        if done and trainer.is_global_zero:
            total = sum(len(v) for v in self._expected.values())
            log.info("resuming the extraction in %s: %d of %d shards already written", self.output_dir, done, total)

    @staticmethod
    def _settings(pl_module: L.LightningModule, dm) -> dict:
        """What decides the features: the model's arguments and the data's selection and views."""
        model = {k: v for k, v in pl_module.hparams.items() if isinstance(v, str | int | float | bool | type(None))}
        return {"model": model, "shards": str(dm.shards), "splits": list(dm.predict_splits), "views": dm.views,
                "train_split": dm.train_split, "shots": dm.shots, "fewshot_seed": dm.fewshot_seed, "seed": dm.seed}

    def _piece_dir(self, split: str) -> Path:
        return self.output_dir / "pieces" / split

    # -- per batch: group rows by shard, write a shard once it is whole --------------------------------------
    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pending = {}

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        split = trainer.datamodule.predict_splits[dataloader_idx]
        shards = batch["shard"]
        tensors = {"features": prediction["features"].detach().to("cpu", torch.float16),
                   "label": prediction["label"].detach().cpu()}
        for name, value in prediction.items():  # per-sample tensors a method adds (pre-projection, adapted, ...)
            if name not in _FIXED and torch.is_tensor(value):
                tensors[name] = value.detach().cpu()
        keys = list(prediction["key"] or [])
        for shard in dict.fromkeys(shards):
            rows = [i for i, s in enumerate(shards) if s == shard]
            piece = self._pending.setdefault((split, shard), {"keys": [], "tensors": {}})
            piece["keys"] += [keys[i] for i in rows]
            index = torch.tensor(rows)
            for name, value in tensors.items():
                piece["tensors"].setdefault(name, []).append(value[index])
            if len(piece["keys"]) >= self._expected.get(split, {}).get(shard, float("inf")):
                self._write_piece(pl_module, split, shard)

    def _write_piece(self, pl_module: L.LightningModule, split: str, shard: str) -> None:
        piece = self._pending.pop((split, shard))
        tensors = {k: torch.cat(v) for k, v in piece["tensors"].items()}
        features, labels = tensors.pop("features"), tensors.pop("label")
        write_feature_file(self._piece_dir(split) / f"{shard}.safetensors", {split: (features, labels)},
                           keys={split: piece["keys"]}, rows={split: tensors})

    # -- at the end: the rest, then the header and the manifest ------------------------------------------------
    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # shards that came out short (corrupt samples skipped) are as complete as they will get
        for split, shard in list(self._pending):
            self._write_piece(pl_module, split, shard)
        trainer.strategy.barrier("feature_writer")
        if trainer.is_global_zero:
            self._write_manifest(trainer, pl_module, trainer.datamodule)
        trainer.strategy.barrier("feature_writer_manifest")

    def _write_manifest(self, trainer, pl_module, dm) -> None:
        empty = (torch.zeros(0, pl_module.embed_dim), torch.zeros(0, dtype=torch.long))
        write_feature_file(self.output_dir / HEADER, {split: empty for split in dm.predict_splits},
                           text_features=pl_module.text_features if pl_module.has_text else None,
                           extras=pl_module.feature_file_extras())
        pieces = [str(p.relative_to(self.output_dir)) for split in dm.predict_splits
                  for p in sorted(self._piece_dir(split).glob("*.safetensors"))]
        hp = pl_module.hparams
        metadata = {**pl_module.feature_file_metadata(),
                    "dataset": dm.dataset_name or hp.get("dataset") or self.output_dir.name,
                    "normalized": "l2", "num_classes": hp.num_classes, "views": dm.views}
        if hp.get("class_names"):
            metadata["class_names"] = json.dumps(list(hp.class_names))
        manifest = {"format": MANIFEST_FORMAT, "version": 2, "world_size": trainer.world_size,
                    "parts": [HEADER, *pieces], "splits": list(dm.predict_splits), "metadata": metadata}
        atomic_write_text(self.output_dir / MANIFEST, json.dumps(manifest, indent=1))
        log.info("features written to %s (%d shards)", self.output_dir, len(pieces))
