"""Keep the weights of the epoch whose validation accuracy was best, and end fit with them.

Cached-feature adapters overfit 16 shots at some point that depends on the dataset; a fixed epoch
budget is a guess. With this callback the budget (``trainer.max_epochs``) is an upper bound and the
epoch is chosen on val: after each validation the monitored metric (the final head's top-1 on val,
``val/acc1``) is compared with the best so far, the best epoch's trainable state is kept (in memory and
in every checkpoint, so a resumed run chooses among all epochs), and at the end of training it is
restored before the head's own hyper-parameters are searched and the adapter is exported. The model's
``selection["weights"]`` says so, and no record is then scored on val.

Ties keep the earlier epoch. With no validation (no val split) nothing is chosen and the last epoch
is kept, which the run's log says.

Resume: Lightning does not rerun the validation of an epoch whose last training batch was
checkpointed (it fast-forwards to the next epoch). The callback notices the gap at the next epoch's
first batch, where the weights are still that epoch's, and validates them itself the way the val loop does
(top-1 over the val loader, summed over ranks), so a resumed run chooses among the same epochs as an
uninterrupted one.
"""
from __future__ import annotations

import logging

import lightning as L
import torch

log = logging.getLogger(__name__)


class BestEpochOnVal(L.Callback):
    """Restore the epoch with the best top-1 accuracy on val (``val/acc1``) at the end of training."""

    monitor = "val/acc1"

    def __init__(self):
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.validated_epoch: int | None = None
        self.state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        self._consider(float(trainer.callback_metrics[self.monitor]), trainer.current_epoch, pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        # at an epoch's first batch the weights are still the previous epoch's (a restarted epoch does not
        # call on_train_epoch_start, so the gap is checked here)
        if batch_idx != 0:
            return
        previous = trainer.current_epoch - 1
        expected = previous >= 0 and (previous + 1) % (trainer.check_val_every_n_epoch or 1) == 0
        if expected and (self.validated_epoch is None or self.validated_epoch < previous):
            value = self._validate(trainer, pl_module)
            if value is not None:
                self._consider(value, previous, pl_module)

    def _consider(self, value: float, epoch: int, pl_module: L.LightningModule) -> None:
        self.validated_epoch = epoch
        if self.best is None or value > self.best:
            self.best, self.best_epoch = value, epoch
            self.state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}

    @torch.no_grad()
    def _validate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float | None:
        """Top-1 on val of the current weights, as the val loop computes it (torchmetrics' micro accuracy:
        correct / total over the ranks' val batches, in float32)."""
        was_training = pl_module.training
        pl_module.eval()
        pl_module.on_validation_epoch_start()  # e.g. fit the head on the current weights
        counts = torch.zeros(2, dtype=torch.long, device=pl_module.device)
        for batch in trainer.datamodule.val_dataloader():
            batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
            logits = pl_module.logits(pl_module.pooled_features(batch))
            counts += torch.stack([(logits.argmax(-1) == batch["label"]).sum(), torch.tensor(len(batch["label"]),
                                                                                            device=counts.device)])
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        pl_module.train(was_training)
        if int(counts[1]) == 0:
            return None  # no val split
        log.info("epoch %d was not validated before the checkpoint this run resumed from: validated now",
                 trainer.current_epoch - 1)
        return float(counts[0] / counts[1])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:
            return
        if self.state is None:
            log.warning("BestEpochOnVal: no %s was logged (no val split?): the last epoch is kept", self.monitor)
            return
        pl_module.load_state_dict(self.state, strict=False)
        pl_module.selection["weights"] = "val"
        log.info("weights of epoch %d restored (%s %.4f, the best on val)", self.best_epoch + 1, self.monitor, self.best)

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "validated_epoch": self.validated_epoch,
                "state": self.state}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best, self.best_epoch, self.state = state_dict["best"], state_dict["best_epoch"], state_dict["state"]
        self.validated_epoch = state_dict.get("validated_epoch")
