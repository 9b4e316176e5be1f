"""What a batch means on many devices, shared by both DataModules.

``global_batch_size`` is the batch one optimiser step sees over all devices and accumulated batches
(the batch a paper reports); each device's batch is derived from it, so a recipe trains the same on
1 GPU, 8 GPUs or 2 nodes. Every device gets the same share: DDP averages the devices' gradients
unweighted, which equals the global batch's mean only when the shares are equal.
"""
from __future__ import annotations

import logging

from adapters.errors import ConfigError

log = logging.getLogger(__name__)


def per_device_batch_size(global_batch_size: int, trainer) -> int:
    """The per-device batch for ``global_batch_size`` under ``trainer`` (world size x accumulation)."""
    accumulate = max(1, int(trainer.accumulate_grad_batches))
    parts = trainer.world_size * accumulate
    if global_batch_size < 1 or global_batch_size % parts:
        raise ConfigError(f"global_batch_size: {global_batch_size} does not divide into {trainer.world_size} devices "
                          f"x {accumulate} accumulated batches")
    log.info("batch size %d per device (global %d over %d devices x %d accumulated)", global_batch_size // parts,
             global_batch_size, trainer.world_size, accumulate)
    return global_batch_size // parts
