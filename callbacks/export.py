"""Export the trained adapter at the end of fit: ``adapter_config.json`` + ``adapter_model.safetensors``.

Both files are written atomically (temporary file + rename) by `AdapterModule.export`, on rank 0 only.
Load them back with ``adapters.load_adapter(path)``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

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
        if trainer.is_global_zero:
            pl_module.export(self.dirpath)
            log.info("adapter exported to %s", self.dirpath)
        trainer.strategy.barrier("adapter_export")
