"""Plain-text progress for cluster logs, where rich's live progress bar renders nothing useful."""
from __future__ import annotations

import logging
import time

import lightning as L

log = logging.getLogger("train")


class ProgressLog(L.Callback):
    """Log one line per train epoch (and per ``every_n_steps`` steps) with the logged metrics.

    Args:
        every_n_steps: also log every this many optimiser steps (0: epoch ends only).
    """

    def __init__(self, every_n_steps: int = 0):
        self.every_n_steps = every_n_steps
        self._start = time.monotonic()

    def _line(self, trainer: L.Trainer, what: str) -> None:
        metrics = " ".join(f"{k}={float(v):.4g}" for k, v in sorted(trainer.callback_metrics.items())
                           if getattr(v, "numel", lambda: 1)() == 1)
        log.info("%s epoch %d step %d (%.0fs) %s", what, trainer.current_epoch, trainer.global_step,
                 time.monotonic() - self._start, metrics)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0 and trainer.is_global_zero:
            self._line(trainer, "train")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self._line(trainer, "end of")
