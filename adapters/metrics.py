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


def score(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """All metrics of `classification_metrics` for one set of logits, as plain floats in [0, 1]
    (``acc5`` is NaN with fewer than 5 classes, as in CLIP_benchmark)."""
    metrics = classification_metrics(logits.shape[-1])
    values = {k: float(v) for k, v in metrics(logits.float(), labels.long()).items()}
    values.setdefault("acc5", math.nan)
    return {k: values[k] for k in METRIC_NAMES}
