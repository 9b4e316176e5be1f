"""Write extracted features during ``train.py predict``: one part file per rank, then a manifest.

Each rank writes ``part-{rank:05d}.safetensors`` with, per predicted split, fp16 features, labels and
sample keys; rank 0 adds the text classifier of the dataset's class names. After all ranks have
written (a barrier), rank 0 writes ``manifest.json`` (atomically, last), so a directory with a
manifest is always complete. `datamodules.features.FeatureFile` reads the directory as one file,
with rows in key order (identical whatever the number of ranks), and ``evaluate.py`` takes it.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from adapters.atomic import atomic_write_text
from datamodules.features import MANIFEST, MANIFEST_FORMAT, write_feature_file

log = logging.getLogger(__name__)


def _encoder_method(pl_module) -> str:
    """The adapter whose adapted features the file holds beside the original ones (e.g. "imo")."""
    encoder = pl_module.__dict__.get("_encoder")
    return getattr(encoder, "method", "") if encoder is not None else getattr(pl_module, "method", "")


class FeatureWriter(BasePredictionWriter):
    """Collect ``predict_step`` outputs per split and write them per rank.

    Args:
        output_dir: directory of the part files and ``manifest.json``.
    """

    def __init__(self, output_dir: str | Path):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self._parts: dict[int, dict[str, list]] = {}

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._parts = {}

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        part = self._parts.setdefault(dataloader_idx, {"features": [], "labels": [], "keys": [], "preproj": [],
                                                       "adapted": []})
        part["features"].append(prediction["features"].detach().to("cpu", torch.float16))
        for optional in ("preproj", "adapted"):  # pre-projection features (IsoCLIP), adapted encoder (IMO)
            if optional in prediction:
                part[optional].append(prediction[optional].detach().to("cpu", torch.float16))
        part["labels"].append(prediction["label"].detach().cpu())
        part["keys"].extend(prediction["key"] or [])

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        split_names = list(getattr(dm, "predict_splits", [])) or [f"split{i}" for i in range(len(self._parts))]
        splits, keys, preproj, adapted = {}, {}, {}, {}
        for idx, name in enumerate(split_names):
            part = self._parts.get(idx)
            if part is None or not part["features"]:
                dim = pl_module.embed_dim
                splits[name] = (torch.zeros(0, dim), torch.zeros(0, dtype=torch.long))
                keys[name] = []
                continue
            splits[name] = (torch.cat(part["features"]), torch.cat(part["labels"]))
            keys[name] = part["keys"]
            if part["preproj"]:
                preproj[name] = torch.cat(part["preproj"])
            if part["adapted"]:
                adapted[name] = torch.cat(part["adapted"])
        rank = trainer.global_rank
        text = pl_module.text_features if trainer.is_global_zero and getattr(pl_module, "has_text", False) else None
        extras = pl_module.feature_file_extras() if trainer.is_global_zero and hasattr(pl_module, "feature_file_extras") \
            else {}
        write_feature_file(self.output_dir / f"part-{rank:05d}.safetensors", splits, text_features=text,
                           keys={k: v for k, v in keys.items() if v}, preproj=preproj, extras=extras,
                           adapted=adapted)
        trainer.strategy.barrier("feature_writer")
        if trainer.is_global_zero:
            self._write_manifest(trainer, pl_module, dm)
        trainer.strategy.barrier("feature_writer_manifest")

    def _write_manifest(self, trainer, pl_module, dm) -> None:
        hp = pl_module.hparams
        metadata = {
            "backbone": hp.backbone, "pretrained": hp.pretrained or "none", "dim": pl_module.embed_dim,
            "dataset": getattr(dm, "dataset_name", None) or hp.get("dataset") or self.output_dir.name,
            "normalized": "l2", "num_classes": hp.num_classes, "views": getattr(dm, "views", 1),
            "adapter": _encoder_method(pl_module),
        }
        if hp.get("class_names"):
            metadata["class_names"] = json.dumps(list(hp.class_names))
        manifest = {"format": MANIFEST_FORMAT, "version": 1, "world_size": trainer.world_size,
                    "parts": [f"part-{r:05d}.safetensors" for r in range(trainer.world_size)],
                    "splits": list(getattr(dm, "predict_splits", [])), "metadata": metadata}
        atomic_write_text(self.output_dir / MANIFEST, json.dumps(manifest, indent=1))
        log.info("features written to %s", self.output_dir)
