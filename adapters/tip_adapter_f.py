"""Tip-Adapter-F: Tip-Adapter's cache keys fine-tuned (Zhang et al., ECCV 2022).

Spec: ../shared/reference/methods-dac-imo.md §1.4 and methods-coder-gda-iso.md §2.4 (the authors' code).
The keys start as the few-shot cache (each the pooled, normalised embedding of one training image)
and become parameters; values stay the one-hot labels. Training minimises the cross-entropy of the
full Tip-Adapter logits ``100 x W^T + alpha exp(-beta (1 - x K^T)) L`` (without text: the cache term
alone) with alpha and beta fixed at the dataset's ``init_alpha`` / ``init_beta``; AdamW lr 1e-3,
eps 1e-4, weight decay 0.01 (PyTorch's default, as the reference), a cosine schedule over 20 epochs,
batch 256 (``configs/tip_adapter_f/default.yaml``). After training, alpha and beta are searched on val
with Tip-Adapter's own head (`adapters.heads.TipAdapterHead`: the official per-dataset grid with
text, the untruncated cache-only search without).

Where we differ from the reference, on purpose:

* the reference keeps the epoch with the best *test* accuracy and reports the max over that and the
  searched head; we train the fixed schedule and choose only alpha/beta, on val;
* on cached features every step sees the same pooled row of an image (the reference draws a fresh
  augmented view per step); with a feature file holding view rows, ``train_views: true`` trains on
  every view of each image instead;
* fp32 keys (the reference trains an fp16 Linear; its eps 1e-4 is kept).
"""
from __future__ import annotations

from adapters.base import register_adapter
from adapters.cached import TrainableCacheAdapter
from adapters.heads import TipAdapterHead


@register_adapter
class TipAdapterF(TrainableCacheAdapter):
    """Tip-Adapter-F on cached features (see the module docstring).

    Args:
        init_alpha: alpha during training (None: the dataset's, from Tip-Adapter's configs).
        init_beta: beta during training (None: 1, as every reference config).
        **kwargs: `AdapterModule` arguments (lr 1e-3, eps 1e-4 by default).
    """

    method = "tip_adapter_f"

    def __init__(self, init_alpha: float | None = None, init_beta: float | None = None, **kwargs):
        kwargs.setdefault("lr", 1e-3)
        kwargs.setdefault("eps", 1e-4)
        super().__init__(init_alpha=init_alpha, init_beta=init_beta, **kwargs)

    def new_head(self) -> TipAdapterHead:
        return TipAdapterHead(self.hparams.dataset)
