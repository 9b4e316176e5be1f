"""The ensemble DAC recipe: members trained side by side, one head per member (log-probabilities
averaged) mixed with the head on original features, and the epoch chosen on val (BestEpochOnVal)."""
from __future__ import annotations

import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F

import adapters
from adapters.backbone import TINY_MODEL
from adapters.dac import DACAdapter, supervised_contrastive_loss
from adapters.errors import ConfigError
from adapters.heads import BlockEnsembleHead, FitData, GDAHead
from callbacks.best_on_val import BestEpochOnVal
from clip_adapters import evaluate
from datamodules.feature_file import write_feature_file
from datamodules.features import FeatureDataModule
from tests.conftest import train_cli
from tests.test_dac import _toy


def _split(n, c=4, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(c).repeat(n)
    return F.normalize(torch.randn(len(y), d, generator=g) + 2 * F.one_hot(y, d).float(), dim=-1), y


def test_block_ensemble_head_is_the_mean_of_member_log_probs_mixed_with_the_original():
    (x1, y), (x2, _), (x0, _) = _split(6, seed=1), _split(6, seed=2), _split(6, seed=3)
    (v1, vy), (v2, _), (v0, _) = _split(5, seed=4), _split(5, seed=5), _split(5, seed=6)
    head = BlockEnsembleHead(blocks=3, with_original=True).fit(
        FitData(torch.cat([x1, x2, x0], 1), y, 4, val_x=torch.cat([v1, v2, v0], 1), val_y=vy))
    # plain transcription: one GDA per block, log-softmax averaged over the members, then mixed
    def lp(train, q):
        return F.log_softmax(GDAHead().fit(FitData(train, y, 4))(q), -1)
    members = (lp(x1, v1) + lp(x2, v2)) / 2
    weights = torch.linspace(0, 1, 11)
    accs = [float((((1 - w) * members + w * lp(x0, v0)).argmax(1) == vy).float().mean()) for w in weights]
    best = weights[accs.index(max(accs))]
    assert head.hparams["original_weight"] == pytest.approx(float(best)) and head.searched
    expected = (1 - best) * members + best * lp(x0, v0)
    torch.testing.assert_close(head(torch.cat([v1, v2, v0], 1)), expected, atol=1e-5, rtol=1e-5)
    # restored from its hyper-parameters, it infers the same without val
    again = BlockEnsembleHead(blocks=3, with_original=True).fit(FitData(torch.cat([x1, x2, x0], 1), y, 4),
                                                                hparams=head.hparams)
    torch.testing.assert_close(again(torch.cat([v1, v2, v0], 1)), expected, atol=1e-5, rtol=1e-5)


def test_members_are_independent_adapters_with_their_own_supcon(tmp_path):
    path = _toy(tmp_path / "toy.safetensors", text=False)
    dm = FeatureDataModule(str(path), shots=4, batch_size=8)
    model = DACAdapter(num_classes=4, backbone=TINY_MODEL, embed_dim=dm.dim, hidden_dim=8, members=3,
                       with_original=True, inference_head="gda")
    for a in model.image_adapters():  # members differ (own init), else the ensemble is one model thrice
        torch.nn.init.normal_(a.up.weight, std=0.1)
    assert len(model.image_adapters()) == 3
    assert not torch.equal(model.image_adapters()[0].down.weight, model.image_adapters()[1].down.weight)
    x, y = dm.train.features.float()[:8], dm.train.labels[:8]
    x = F.normalize(x, dim=-1)
    loss, _ = model.training_loss(x, y)
    plain = sum(supervised_contrastive_loss(a(x), y, a(x), y, 0.07) for a in model.image_adapters())
    torch.testing.assert_close(loss, plain)
    adapted = model.adapt(x)
    assert adapted.shape == (8, 4 * dm.dim)  # three members and the original, side by side
    torch.testing.assert_close(adapted[:, 3 * dm.dim:], x)
    with pytest.raises(ConfigError, match="members"):
        DACAdapter(num_classes=4, backbone=TINY_MODEL, embed_dim=dm.dim, members=0)


def test_best_epoch_on_val_restores_the_best_epoch_and_says_so(tmp_path):
    path = _toy(tmp_path / "toy.safetensors", text=False)
    dm = FeatureDataModule(str(path), shots=4, batch_size=4)
    model = DACAdapter(num_classes=4, backbone=TINY_MODEL, embed_dim=dm.dim, hidden_dim=8, inference_head="gda",
                       lr=0.05, scheduler="constant")
    seen = {}

    class Record(L.Callback):  # the weights and val accuracy of every epoch, to check the choice by hand
        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                seen[trainer.current_epoch] = (float(trainer.callback_metrics["val/acc1"]),
                                               {k: v.clone() for k, v in pl_module.adapter.state_dict().items()})

    best = BestEpochOnVal()
    L.Trainer(max_epochs=6, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[Record(), best]).fit(model, datamodule=dm)
    accs = {e: a for e, (a, _) in seen.items()}
    expected = min(e for e, a in accs.items() if a == max(accs.values()))  # ties: the earlier epoch
    assert best.best_epoch == expected and model.selection["weights"] == "val"
    for k, v in model.adapter.state_dict().items():
        torch.testing.assert_close(v, seen[expected][1][k])


def _hard(path, c=6, d=16):
    """Overlapping classes: accuracy well below 100 %, so equal numbers mean the same model."""
    g = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(c, d, generator=g), dim=-1)

    def split(n):
        y = torch.arange(c).repeat(n)
        return F.normalize(centers[y] + 1.5 * torch.randn(len(y), d, generator=g) / d ** 0.5, dim=-1), y
    return write_feature_file(path, {"train": split(8), "val": split(10), "test": split(20)},
                              metadata={"dataset": "toy", "backbone": TINY_MODEL})


def test_ensemble_recipe_trains_exports_and_scores_one_number(tmp_path):
    path = _hard(tmp_path / "toy.safetensors")
    run = tmp_path / "run"
    assert train_cli("fit", "--config", "configs/dac/ensemble.yaml", "--data.class_path",
                     "datamodules.features.FeatureDataModule", "--data.init_args.path", str(path),
                     "--data.init_args.shots", "4", "--data.init_args.batch_size", "8",
                     "--model.init_args.backbone", TINY_MODEL, "--model.init_args.pretrained", "null",
                     "--model.init_args.hidden_dim", "8", "--model.init_args.members", "2",
                     "--trainer.max_epochs", "3", "--trainer.accelerator", "cpu", run_dir=run) == 0
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["selected_on"]["weights"] == "val" and "original_weight" in config["extra"]["head_hparams"]
    records = evaluate.evaluate_file(str(path), ["gda"], [4], [1], [adapters.load_adapter(run / "adapter")],
                                     [str(run / "adapter")])
    own = next(r for r in records if r["head"] == "dac (adapter)")
    on_adapted = next(r for r in records if r["head"] == "gda+dac")
    assert own["selected_splits"] == ["val"] and own["eval_split"] == "test"
    assert on_adapted["selected_splits"] == ["val"]  # the adapter's epoch was chosen on val
    # train.py test on the last checkpoint scores what the export scores
    assert train_cli("test", "--config", str(run / "config.yaml"), "--ckpt_path", "last", run_dir=run) == 0
    tested = json.loads((run / "test" / "metrics.json").read_text())["metrics"]["test/acc1"]
    assert 0.3 < own["metrics"]["acc1"] < 0.95 and tested == pytest.approx(own["metrics"]["acc1"], abs=1e-6)
