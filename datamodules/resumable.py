"""Exact mid-epoch resume for both DataModules: a checkpoint's train-loader state reaches the loader.

Lightning restores a stateful train loader only when it builds the loader after reading the
checkpoint; a cosine schedule's ``estimated_stepping_batches`` builds it before. So the model hands
the saved state over (`adapters.base.AdapterData.restore_loader_state`, from
``AdapterModule.on_load_checkpoint``) and the DataModule applies it to the next train loader it builds.
"""
from __future__ import annotations


class ResumableTrainLoader:
    """DataModule mixin: keep a handed-over loader state and apply it to the next train loader built
    (the loader's own ``load_state_dict`` decides what resuming means for it)."""

    _pending_loader_state: dict | None = None

    def restore_loader_state(self, state: dict) -> None:
        self._pending_loader_state = state

    def _resume_loader(self, loader):
        if self._pending_loader_state:
            loader.load_state_dict(self._pending_loader_state)
            self._pending_loader_state = None
        return loader
