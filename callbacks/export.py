"""Export the trained adapter at the end of fit: ``adapter_config.json`` + ``adapter_model.safetensors``.

Both files are written atomically (temporary file + rename) by `AdapterModule.export`, on rank 0 only.
Load them back with ``adapters.load_adapter(path)``.

The choices a method makes after training (e.g. its head's hyper-parameters on val, `finalize`) are
also written into the ``last`` checkpoint, so that ``train.py test --ckpt_path last`` scores exactly
the model the export holds.
"""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)


class AdapterExport(L.Callback):
    """Write the adapter export into ``dirpath`` when ``fit`` ends (not when it is interrupted).

    Args:
        dirpath: export directory (``train.py`` uses ``<run_dir>/adapter``).
    """

    def __init__(self, dirpath: str | Path):
        self.dirpath = Path(dirpath)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted or not hasattr(pl_module, "export"):
            return
        pl_module.finalize()  # the same on every rank: hyper-parameters chosen on val
        for callback in trainer.checkpoint_callbacks:  # the final, selected head goes into `last` too
            if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath:
                last = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
                trainer.save_checkpoint(last, weights_only=False)  # collective under DDP; rank 0 writes
        if trainer.is_global_zero:
            pl_module.export(self.dirpath)
            log.info("adapter exported to %s", self.dirpath)
        trainer.strategy.barrier("adapter_export")
