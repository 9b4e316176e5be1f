"""Save the run at the current step when a cluster preempts it (SIGTERM) or a user presses Ctrl-C (SIGINT).

During training `PreemptionCheckpoint` owns both signals: its handler only notes the request (a
second Ctrl-C interrupts at once). At the end of every training batch the ranks agree whether any of
them was signalled (one small all-reduce; a no-op on one device) and, if so, every rank stops after
that same batch, through Lightning's own SIGTERM path (`SIGTERMException`): a validation due after the
batch runs first, so its metrics are not lost. Then it writes ``last.ckpt`` at that step and the
metrics logged so far, so that ``--ckpt_path last`` continues exactly from there. Under SLURM it also
asks for the job to be requeued (``scontrol requeue $SLURM_JOB_ID``), as Lightning's own auto-requeue
does for SIGUSR1. The process then exits with status 143 (128 + SIGTERM), so a scheduler sees an
interrupted job, not a finished one.

Why not Lightning's handler: it runs a collective (a broadcast) inside the signal handler and lets a
rank stop alone, so a DDP job whose ranks are signalled at different moments (SLURM signals every
task, a user only the launcher) hangs instead of stopping (Lightning-AI/pytorch-lightning#20806).
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
        self.saved = False
        self._requested = False
        self._deferred = False
        self._previous: dict[int, object] = {}

    # -- the signals: noted by the handler, acted on at a batch end every rank shares ---------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # here, not at fit start: Lightning installs its own handlers just before training starts
        self._requested = self._deferred = False
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread: leave the signals alone
                pass

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self._requested:
            raise KeyboardInterrupt  # a second Ctrl-C: at once
        if not self._requested:
            log.warning("%s: stopping at the end of this batch and saving a checkpoint%s", signal.Signals(signum).name,
                        " (Ctrl-C again to abort)" if signum == signal.SIGINT else "")
        self._requested = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.strategy.reduce_boolean_decision(self._requested, all=False):  # any rank signalled
            _stop_flag(trainer, True)

    def _restore_handlers(self) -> None:
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._on_signal:
                signal.signal(signum, previous)
        self._previous = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        # A stop agreed at an epoch's last batch: Lightning would abandon the validation that follows
        # half-way, and a resumed run does not redo it (that epoch's metrics row and a best-epoch choice
        # would be lost). Let it finish, then let the training loop stop where it checks next.
        if trainer.state.fn == "fit" and not trainer.sanity_checking and trainer.received_sigterm:
            _stop_flag(trainer, False)
            self._deferred = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._deferred:
            _stop_flag(trainer, True)
            self._deferred = False
            log.warning("signal received during validation: validation finished, stopping now")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
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


def _stop_flag(trainer: L.Trainer, stop: bool) -> None:
    """Set the flag behind `trainer.received_sigterm` (Lightning has no public setter): with it, every
    loop of Lightning's stops at its next check and raises `SIGTERMException`."""
    trainer._signal_connector.received_sigterm = stop
