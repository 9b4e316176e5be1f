"""Save the run at the current step when a cluster preempts it (SIGTERM) or a user presses Ctrl-C (SIGINT).

Lightning stops a run that received SIGTERM at the end of the current batch, the same batch on every
rank, with `SIGTERMException` (a signal during validation lets that validation finish first, so that
its metrics are not lost). `PreemptionCheckpoint` turns the first SIGINT into the same graceful stop
(a second one interrupts at once), and when the stop comes, writes ``last.ckpt`` at that step and the
metrics logged so far, so that ``--ckpt_path last`` continues exactly from there. Under SLURM it also
asks for the job to be requeued (``scontrol requeue $SLURM_JOB_ID``), as Lightning's own auto-requeue
does for SIGUSR1. The process then exits with status 143 (128 + SIGTERM), so a scheduler sees an
interrupted job, not a finished one.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

#: Exit status of a run stopped by SIGTERM or SIGINT after its checkpoint was saved.
PREEMPTED_EXIT = 143


class PreemptionCheckpoint(L.Callback):
    """Checkpoint on SIGTERM/SIGINT during fit (see the module docstring).

    Args:
        checkpoint: where to write it (``train.py``: ``<run_dir>/checkpoints/last.ckpt``).
        requeue: under SLURM, requeue the job after saving.
    """

    def __init__(self, checkpoint: str | Path, requeue: bool = True):
        self.checkpoint, self.requeue = Path(checkpoint), requeue
        self._previous_sigint = None
        self.saved = False
        self._deferred = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        try:
            self._previous_sigint = signal.signal(signal.SIGINT, self._sigint)
        except ValueError:  # not the main thread: leave SIGINT alone
            self._previous_sigint = None

    def _sigint(self, signum, frame) -> None:
        # first Ctrl-C: stop like SIGTERM (end of this batch, checkpoint); a second one: at once
        signal.signal(signal.SIGINT, self._previous_sigint or signal.default_int_handler)
        log.warning("interrupted: stopping at the end of this batch and saving a checkpoint (Ctrl-C again to abort)")
        os.kill(os.getpid(), signal.SIGTERM)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        # Lightning abandons a validation half-way on SIGTERM, and a resumed run does not redo it: that
        # epoch's metrics row (and a best-epoch choice) would be lost. Finish it first (one validation
        # pass), then let the training loop stop where it checks next, at the end of this epoch.
        if trainer.state.fn == "fit" and not trainer.sanity_checking and trainer.received_sigterm:
            trainer._signal_connector.received_sigterm = False  # the flag behind `trainer.received_sigterm`
            self._deferred = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._deferred:
            trainer._signal_connector.received_sigterm = True
            self._deferred = False
            log.warning("signal received during validation: validation finished, stopping now")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        # every rank stops at the same step: a collective save is safe
        trainer.save_checkpoint(self.checkpoint, weights_only=False)
        for logger in trainer.loggers:
            logger.save()
        self.saved = True
        if trainer.is_global_zero:
            log.warning("stopped at step %d: checkpoint saved to %s (resume with --ckpt_path last)",
                        trainer.global_step, self.checkpoint)
            self._requeue()

    def _requeue(self) -> None:
        job = os.environ.get("SLURM_JOB_ID")
        if not (self.requeue and job):
            return
        if shutil.which("scontrol") is None:
            log.warning("SLURM job %s: scontrol not found, not requeued", job)
            return
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        if result.returncode == 0:
            log.warning("SLURM job %s requeued", job)
        else:
            log.warning("SLURM job %s: requeue failed: %s", job, result.stderr.strip()[:200])
