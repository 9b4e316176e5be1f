"""What the DAC-style adapter computes, against plain transcriptions (methods-dac-imo.md §3.3)."""
import math

import lightning as L
import torch
import torch.nn.functional as F

from adapters.backbone import TINY_MODEL
from adapters.dac import DACAdapter, ResidualAdapter, TextModulation, supervised_contrastive_loss
from adapters.heads import FitData, TipAdapterHead
from datamodules.feature_file import FeatureFile, write_feature_file
from datamodules.features import FeatureDataModule


def _plain_supcon(z, labels, temperature):
    """Khosla et al. 2020, Eq. 2 (L_out), one anchor at a time: the mean over positives p of
    -log(exp(z_i.z_p / t) / sum_{a != i} exp(z_i.z_a / t)); anchors without positives left out."""
    losses = []
    for i in range(len(z)):
        positives = [p for p in range(len(z)) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denominator = sum(math.exp(float(z[i] @ z[a]) / temperature) for a in range(len(z)) if a != i)
        losses.append(sum(-math.log(math.exp(float(z[i] @ z[p]) / temperature) / denominator) for p in positives)
                      / len(positives))
    return sum(losses) / len(losses)


def test_supervised_contrastive_loss_matches_the_paper_equation():
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(12, 6, generator=g, dtype=torch.float64), dim=-1)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 0, 2, 4, 1])  # class 4 has no positive
    ours = supervised_contrastive_loss(z, labels, z, labels, temperature=0.1)
    assert math.isclose(float(ours), _plain_supcon(z, labels, 0.1), rel_tol=1e-9)
    # anchors against a larger candidate set (negatives gathered from other ranks): rows 4..8 are ours
    part = supervised_contrastive_loss(z[4:8], labels[4:8], z, labels, 0.1, offset=4)
    plain = []
    for i in range(4, 8):
        positives = [p for p in range(12) if p != i and labels[p] == labels[i]]
        denominator = sum(math.exp(float(z[i] @ z[a]) / 0.1) for a in range(12) if a != i)
        plain.append(sum(-math.log(math.exp(float(z[i] @ z[p]) / 0.1) / denominator) for p in positives) / len(positives))
    assert math.isclose(float(part), sum(plain) / 4, rel_tol=1e-9)


def test_adapter_and_text_modulation_start_as_the_identity():
    x = F.normalize(torch.randn(5, 16), dim=-1)
    torch.testing.assert_close(ResidualAdapter(16, 8, residual=1.0, dropout=0.0)(x), x)
    text = F.normalize(torch.randn(3, 16), dim=-1)
    torch.testing.assert_close(TextModulation(3, 16)(text), text)


def _toy(path, text=True, c=4, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(c, d, generator=g), dim=-1)

    def split(n):
        y = torch.arange(c).repeat(n)
        return F.normalize(centers[y] + 0.6 * torch.randn(len(y), d, generator=g) / d ** 0.5, dim=-1), y
    return write_feature_file(path, {"train": split(8), "val": split(6), "test": split(6)},
                              text_features=centers if text else None,
                              metadata={"dataset": "toy", "backbone": TINY_MODEL}, class_names=list("abcd")[:c] if text else None)


def _trained(path, **kwargs):
    dm = FeatureDataModule(str(path), shots=4, batch_size=8)
    model = DACAdapter(num_classes=dm.num_classes, class_names=dm.class_names, backbone=TINY_MODEL, embed_dim=dm.dim,
                       dataset=dm.dataset_name, hidden_dim=8, **kwargs)
    L.Trainer(max_epochs=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(model, datamodule=dm)
    return model, dm


def test_inference_is_tip_adapter_on_adapted_keys_with_the_modulated_text(tmp_path):
    model, dm = _trained(_toy(tmp_path / "toy.safetensors"), schedule="joint")
    assert set(model.head_hparams) == {"alpha", "beta"} and model.selection["head"] == "val"
    x = FeatureFile(dm.file.path).split("test").features.float()
    with torch.no_grad():
        keys = model.adapter(model.train_features)  # the few-shot set through the trained adapter
        text = model.modulation(model.text_features)
        plain = TipAdapterHead("toy").fit(FitData(keys, model.train_labels, 4, text=text), hparams=model.head_hparams)
        expected = plain(model.adapter(F.normalize(x, dim=-1)), text_x=F.normalize(x, dim=-1))
        torch.testing.assert_close(model.logits(x), expected)


def test_stage_a_leaves_the_text_modulation_untouched(tmp_path):
    model, _ = _trained(_toy(tmp_path / "toy.safetensors"), intra_fraction=1.0)
    assert torch.equal(model.modulation.scale, torch.ones(16))  # (b) never trained: no step, no decay
    assert torch.equal(model.modulation.residual, torch.zeros(4, 16))
    assert model.adapter.up.weight.abs().sum() > 0  # (a) did


def test_without_text_only_the_image_adapter_trains_and_the_head_is_image_only(tmp_path):
    model, _ = _trained(_toy(tmp_path / "toy.safetensors", text=False))
    assert not model.has_text and not model.modulation.scale.requires_grad
    assert set(model.head_hparams) == {"beta"} and any("image-only" in n for n in model.head.notes)
