import torch
import torch.nn.functional as F

from adapters.metrics import classification_metrics, score
from datamodules.feature_file import FeatureFile
from tests.conftest import shared


def _reference(logits, labels):
    pred = logits.argmax(-1)
    acc1 = (pred == labels).float().mean().item()
    acc5 = (logits.topk(5, dim=-1).indices == labels[:, None]).any(-1).float().mean().item()
    recalls = [(pred[labels == c] == c).float().mean().item() for c in labels.unique()]
    return acc1, acc5, sum(recalls) / len(recalls)


def test_logged_metrics_match_hand_computation_over_several_updates():
    # Real caltech101 val features scored against their class means, in 256-sample updates: the case
    # where torchmetrics' compute groups merged macro recall's state with top-5 accuracy's
    # (a logged recall of 0.998 for a true 0.974).
    val = FeatureFile(shared("clip-vit-b32-features/caltech101.safetensors")).split("val")
    x, labels = val.features.float(), val.labels
    means = F.normalize(torch.stack([x[labels == c].mean(0) for c in range(100)]), dim=-1)
    logits = x @ means.T
    metrics = classification_metrics(100)
    for chunk in range(0, len(labels), 256):
        metrics.update(logits[chunk:chunk + 256], labels[chunk:chunk + 256])
        members = dict(metrics.items())  # what LightningModule.log_dict does at every step
    got = {k: float(m.compute()) for k, m in members.items()}  # Lightning computes each member alone
    acc1, acc5, recall = _reference(logits, labels)
    assert abs(got["acc1"] - acc1) < 1e-6 and abs(got["acc5"] - acc5) < 1e-6
    assert abs(got["mean_per_class_recall"] - recall) < 1e-6
    assert abs(score(logits, labels)["mean_per_class_recall"] - recall) < 1e-6


def test_top5_is_nan_below_five_classes():
    s = score(torch.randn(10, 3), torch.randint(0, 3, (10,)))
    assert s["acc5"] != s["acc5"]
