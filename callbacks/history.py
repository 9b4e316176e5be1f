"""One unbroken metrics history per run directory, across kills and ``--ckpt_path last`` resumes.

Lightning's `CSVLogger` deletes an existing ``metrics.csv`` whenever a logger is created on the same
directory (any later command, even one that fails on a config error), and a resumed run would log the
steps after its checkpoint a second time. `ResumableCSVLogger` keeps the file: a fresh run starts a
new history (after the previous run's files were moved aside with ``--overwrite``), and a run resumed
from a checkpoint at global step S first drops the rows of steps >= S (logged after that checkpoint by
the interrupted run, about to be logged again) and appends from there: every step once, no gap, no
duplicate. TensorBoard gets the same from its own ``purge_step`` (events at steps >= S are hidden).

`FlushLogsOnCheckpoint` writes the logged rows whenever a checkpoint is saved, so nothing up to a
checkpoint can be lost by a kill after it.
"""
from __future__ import annotations

import csv
import os

import lightning as L
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from adapters.atomic import atomic_path


class _AppendingWriter(ExperimentWriter):
    """The CSV writer without the deletion of an existing ``metrics.csv``; rows of steps >= ``resume_step``
    are dropped once, at creation, when resuming."""

    def __init__(self, log_dir: str, resume_step: int | None = None) -> None:
        self._resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            keys, rows = list(reader.fieldnames or []), list(reader)
        if self._resume_step is not None:
            rows = [r for r in rows if r.get("step", "") != "" and int(float(r["step"])) < self._resume_step]
        with atomic_path(self.metrics_file_path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = keys  # appends keep the existing header (or rewrite it when keys are added)


class ResumableCSVLogger(CSVLogger):
    """`CSVLogger` that appends to the run's ``metrics.csv`` (see the module docstring).

    Args:
        resume_step: the global step of the checkpoint a resumed run starts from (None: a fresh run).
        *args, **kwargs: `CSVLogger` arguments.
    """

    def __init__(self, *args, resume_step: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir, resume_step=self._resume_step)
        return self._experiment


class FlushLogsOnCheckpoint(L.Callback):
    """Write every logger's buffered rows when a checkpoint is saved (periodic, preemption, end of fit)."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        for logger in trainer.loggers:
            logger.save()
