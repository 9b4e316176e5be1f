"""Write extracted features during ``train.py predict``: one part file per rank, then a manifest.

Each rank writes ``part-{rank:05d}.safetensors`` with, per predicted split, fp16 features, labels,
sample keys and every other per-sample tensor the model's ``predict_step`` returns (stored as
``{split}.<name>``); rank 0 adds the text classifier and the file-level tensors the model declares
(`adapters.base.BackboneModule.feature_file_extras`). After all ranks have written (a barrier),
rank 0 writes ``manifest.json`` (atomically, last), so a directory with a manifest is always
complete. `datamodules.feature_file.FeatureFile` reads the directory as one file, with rows in key
order (identical whatever the number of ranks), and ``evaluate.py`` takes it.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from adapters.atomic import atomic_write_text
from datamodules.feature_file import MANIFEST, MANIFEST_FORMAT, write_feature_file

log = logging.getLogger(__name__)

#: Fields of a prediction that are not per-sample tensors to store under their own name.
_FIXED = ("features", "label", "key", "dataloader_idx")


class FeatureWriter(BasePredictionWriter):
    """Collect ``predict_step`` outputs per split and write them per rank.

    Args:
        output_dir: directory of the part files and ``manifest.json``.
    """

    def __init__(self, output_dir: str | Path):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self._parts: dict[int, dict] = {}

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._parts = {}

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        part = self._parts.setdefault(dataloader_idx, {"features": [], "labels": [], "keys": [], "rows": {}})
        part["features"].append(prediction["features"].detach().to("cpu", torch.float16))
        for name, value in prediction.items():  # per-sample tensors a method adds (pre-projection, adapted, ...)
            if name not in _FIXED and torch.is_tensor(value):
                part["rows"].setdefault(name, []).append(value.detach().cpu())
        part["labels"].append(prediction["label"].detach().cpu())
        part["keys"].extend(prediction["key"] or [])

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        split_names = list(dm.predict_splits)
        splits, keys, rows = {}, {}, {}
        for idx, name in enumerate(split_names):
            part = self._parts.get(idx)
            if part is None or not part["features"]:
                splits[name] = (torch.zeros(0, pl_module.embed_dim), torch.zeros(0, dtype=torch.long))
                continue
            splits[name] = (torch.cat(part["features"]), torch.cat(part["labels"]))
            keys[name] = part["keys"]
            rows[name] = {k: torch.cat(v) for k, v in part["rows"].items()}
        zero = trainer.is_global_zero
        write_feature_file(self.output_dir / f"part-{trainer.global_rank:05d}.safetensors", splits,
                           text_features=pl_module.text_features if zero and pl_module.has_text else None,
                           keys={k: v for k, v in keys.items() if v}, rows=rows,
                           extras=pl_module.feature_file_extras() if zero else {})
        trainer.strategy.barrier("feature_writer")
        if zero:
            self._write_manifest(trainer, pl_module, dm)
        trainer.strategy.barrier("feature_writer_manifest")

    def _write_manifest(self, trainer, pl_module, dm) -> None:
        hp = pl_module.hparams
        metadata = {**pl_module.feature_file_metadata(),
                    "dataset": dm.dataset_name or hp.get("dataset") or self.output_dir.name,
                    "normalized": "l2", "num_classes": hp.num_classes, "views": dm.views}
        if hp.get("class_names"):
            metadata["class_names"] = json.dumps(list(hp.class_names))
        manifest = {"format": MANIFEST_FORMAT, "version": 1, "world_size": trainer.world_size,
                    "parts": [f"part-{r:05d}.safetensors" for r in range(trainer.world_size)],
                    "splits": list(dm.predict_splits), "metadata": metadata}
        atomic_write_text(self.output_dir / MANIFEST, json.dumps(manifest, indent=1))
        log.info("features written to %s", self.output_dir)
