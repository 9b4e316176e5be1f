"""Classification metrics shared by evaluate.py and every LightningModule.

The few-shot literature reports micro top-1; CLIP_benchmark adds top-5 and mean per-class recall
(balanced accuracy). torchmetrics' ``MulticlassAccuracy`` defaults to ``average="macro"``, so every
metric here names its ``average`` explicitly.
"""
from __future__ import annotations

import math

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassRecall

METRIC_NAMES = ("acc1", "acc5", "mean_per_class_recall")


def classification_metrics(num_classes: int, prefix: str = "") -> MetricCollection:
    """top-1 (``acc1``), top-5 (``acc5``; only with at least 5 classes) and mean per-class recall."""
    metrics = {
        "acc1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
        "mean_per_class_recall": MulticlassRecall(num_classes, average="macro"),
    }
    if num_classes >= 5:
        metrics["acc5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    # compute_groups=False: torchmetrics would otherwise share one state between metrics it thinks are
    # alike after the first update, and macro recall ended up computed from the top-5 state.
    return MetricCollection(metrics, prefix=prefix, compute_groups=False)


def score(logits: torch.Tensor, labels: torch.Tensor, chunk: int = 4096) -> dict[str, float]:
    """All metrics of `classification_metrics` for one set of logits, as plain floats in [0, 1]
    (``acc5`` is NaN with fewer than 5 classes, as in CLIP_benchmark). Updated ``chunk`` rows at a time:
    torchmetrics expands a batch into several [rows, classes] integer tensors, 2 GB at ImageNet size."""
    metrics = classification_metrics(logits.shape[-1]).to(logits.device)
    labels = labels.long().to(logits.device)
    for start in range(0, len(labels), chunk):
        metrics.update(logits[start:start + chunk].float(), labels[start:start + chunk])
    values = {k: float(v) for k, v in metrics.compute().items()}
    values.setdefault("acc5", math.nan)
    return {k: values[k] for k in METRIC_NAMES}


def intra_modal_overlap(features: torch.Tensor, labels: torch.Tensor, bins: int = 200,
                        value_range: tuple[float, float] = (-1.0, 1.0), max_pairs: int | None = None,
                        seed: int = 0, chunk: int = 1024) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Intra-modal overlap (IMO): intersection area of the same-class and different-class cosine
    similarity histograms, in [0, 1] (1: identical distributions, 0: disjoint).

    All pairs i < j are used, accumulated in row chunks (no N x N matrix), unless ``max_pairs`` is
    set: then that many random pairs (seeded). Returns (overlap, same-class histogram, different-class
    histogram), histograms normalised to probabilities over ``bins`` bins on ``value_range``. The
    overlap is None (undefined, not 0) when there is no same-class pair or no different-class pair.
    """
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    y = labels.long()
    lo, hi = value_range
    same = torch.zeros(bins, dtype=torch.float64)
    diff = torch.zeros(bins, dtype=torch.float64)

    def add(sims: torch.Tensor, is_same: torch.Tensor) -> None:
        idx = ((sims - lo) / (hi - lo) * bins).long().clamp_(0, bins - 1)
        same.add_(torch.bincount(idx[is_same], minlength=bins).double())
        diff.add_(torch.bincount(idx[~is_same], minlength=bins).double())

    n = len(x)
    if max_pairs is not None and max_pairs < n * (n - 1) // 2:
        g = torch.Generator().manual_seed(seed)
        i = torch.randint(0, n, (max_pairs,), generator=g)
        j = torch.randint(0, n - 1, (max_pairs,), generator=g)
        j = j + (j >= i).long()  # j != i
        add((x[i] * x[j]).sum(-1), y[i] == y[j])
    else:
        for start in range(0, n, chunk):
            rows = torch.arange(start, min(start + chunk, n))
            sims = x[rows] @ x.T
            upper = torch.arange(n)[None, :] > rows[:, None]  # pairs i < j only
            add(sims[upper], (y[rows][:, None] == y[None, :])[upper])
    defined = bool(same.sum() > 0 and diff.sum() > 0)
    same /= same.sum().clamp_min(1)
    diff /= diff.sum().clamp_min(1)
    return (float(torch.minimum(same, diff).sum()) if defined else None), same, diff
