"""Results you can trust: no leaks, no silent truncation, no two numbers for one model.

Each test here failed before the fix it guards (see the README's evaluation section and RELIABILITY.md).
"""
import json
import subprocess
import sys

import lightning as L
import pytest
import torch
import torch.nn.functional as F

import adapters
from adapters.backbone import TINY_MODEL
from adapters.coder import CoderClassifier
from adapters.dac import DACAdapter
from adapters.heads import FitData, TipAdapterHead
from adapters.metrics import intra_modal_overlap
from adapters.textsets import EmbeddedTextSet
from clip_adapters import evaluate, train
from datamodules.feature_file import FeatureFile, write_feature_file
from datamodules.features import FeatureDataModule
from tests.conftest import CODER_DEMO, DAC, DAC_DEMO, ROOT, data_config, shared


# -- 1. CODER's one-to-one reranking with sparse pairs -------------------------------------------------
def _reference_gap(f, top, ovo_means: dict) -> list[float]:
    """The reference's g_c (methods-coder-gda-iso.md §3.5), written plainly: a pair whose texts are
    missing in either direction raises inside the try and contributes 0."""
    gaps = []
    for c in top:
        total = 0.0
        for o in top:
            if o == c:
                continue
            try:
                total += float(f @ ovo_means[(c, o)]) - float(f @ ovo_means[(o, c)])
            except KeyError:
                pass
        gaps.append(total / (len(top) - 1))
    return gaps


def test_rerank_scores_a_pair_only_when_both_directions_have_texts():
    # class 0 has one-sided texts against 1 and 2 that match the image well; 1 and 2 have both directions
    d = 4
    e = torch.eye(d)
    ovo = {(0, 1): e[0], (0, 2): e[0], (1, 2): e[1], (2, 1): -e[1]}
    pairs = torch.tensor(list(ovo))
    ts = EmbeddedTextSet(e[:3], torch.arange(3), torch.zeros(3, dtype=torch.long), pairs, torch.stack(list(ovo.values())))
    clf = CoderClassifier(ts, 3)
    x = F.normalize(torch.tensor([[0.9, 0.3, 0.0, 0.1]]), dim=-1)
    logits = torch.tensor([[3.0, 2.9, 2.8]])  # low confidence: reranked
    out = clf.rerank(x, logits, tau=1.0, k=3)
    reference = _reference_gap(x[0], [0, 1, 2], ovo)
    assert max(range(3), key=lambda i: (reference[i], -i)) == 1  # the reference picks class 1 ...
    assert out.argmax(-1).item() == 1  # ... and so do we

    def one_sided(c):  # the old rule: a missing direction counted as similarity 0, the other kept
        sim = {p: float(x[0] @ v) for p, v in ovo.items()}
        return sum(sim.get((c, o), 0.0) - sim.get((o, c), 0.0) for o in range(3) if o != c) / 2
    assert max(range(3), key=one_sided) == 0  # which would have picked class 0


# -- 2. Tip-Adapter's cache-only beta search is not truncated ------------------------------------------
def test_cache_only_tip_reaches_an_interior_beta_and_notes_grid_edges():
    path = shared("clip-vit-b32-features/fgvc.safetensors")
    ff = FeatureFile(path)
    train_split, val = ff.split("train_16shot"), ff.split("val")
    data = FitData(train_split.features, train_split.labels, ff.num_classes, val_x=val.features, val_y=val.labels,
                   dataset="fgvc")
    head = TipAdapterHead("fgvc").fit(data)
    assert head.beta > 30.0  # the official fgvc range ends at 29.85, where the old search stopped
    assert not any("edge" in n for n in head.notes), head.notes
    # a grid that cannot reach the optimum says so
    narrow = TipAdapterHead("fgvc", image_only_betas=(0.1, 5.0, 20)).fit(data)
    assert any("upper edge" in n for n in narrow.notes), narrow.notes


def test_cache_only_logits_have_the_cache_ranking_without_underflow():
    g = torch.Generator().manual_seed(0)
    keys = F.normalize(torch.randn(30, 8, generator=g), dim=-1)
    labels = torch.arange(3).repeat(10)
    head = TipAdapterHead(None).fit(FitData(keys, labels, 3), hparams={"beta": 5.0})
    x = F.normalize(torch.randn(20, 8, generator=g), dim=-1)
    plain = torch.exp(-5.0 * (1 - x @ keys.T)) @ F.one_hot(labels, 3).float()  # the reference formula
    torch.testing.assert_close(head(x).exp(), plain, rtol=1e-5, atol=0)
    head.beta = 5000.0  # exp(-10000) underflows in the plain formula; the ranking stays defined
    nearest = labels[(x @ keys.T).argmax(-1)]
    assert torch.equal(head(x).argmax(-1), nearest) and torch.isfinite(head(x)).all()


def test_caltech101_cache_only_tip_is_within_0_3_of_the_reference(tmp_path):
    path = shared("clip-vit-b32-features/caltech101.safetensors")
    out = tmp_path / "r.json"
    assert evaluate.main(["--features", str(path), "--shots", "16", "--heads", "tip", "--output", str(out)]) == 0
    (record,) = json.loads(out.read_text())
    assert abs(100 * record["metrics"]["acc1"] - 91.60) <= 0.3, record


# -- 3. no record is scored on the split it was selected on ---------------------------------------------
def _val_only_file(path, seed=0):
    """Shaped like a public Tip-Adapter cache without a test split: train + val, no text."""
    g = torch.Generator().manual_seed(seed)
    c, d = 6, 16
    centers = F.normalize(torch.randn(c, d, generator=g), dim=-1)

    def split(n):
        y = torch.arange(c).repeat(n)
        return F.normalize(centers[y] + 0.9 * torch.randn(len(y), d, generator=g) / d ** 0.5, dim=-1), y
    return write_feature_file(path, {"train": split(8), "val": split(10)},
                              metadata={"dataset": "cars-like", "backbone": TINY_MODEL})


def _fit_dac(run_dir, features, *extra):
    return train.main(["fit", *DAC_DEMO, "--data", "configs/data/demo.yaml", "--run_dir", str(run_dir),
                       "--data.init_args.path", str(features), "--data.init_args.shots", "4",
                       "--data.init_args.test_split", "null", "--trainer.max_epochs", "2",
                       "--model.init_args.embed_dim", "16", *extra])


def test_no_record_is_scored_on_the_split_its_choices_were_made_on(tmp_path):
    features = _val_only_file(tmp_path / "cars.safetensors")
    assert _fit_dac(tmp_path / "run", features) == 0
    export = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert export["selected_on"]["head"] == "val"  # the export says where its head was chosen
    out = tmp_path / "r.json"
    assert evaluate.main(["--features", str(features), "--shots", "4", "--heads", "prototype,tip,gda",
                          "--adapter", str(tmp_path / "run" / "adapter"), "--output", str(out)]) == 0
    records = json.loads(out.read_text())
    for r in records:
        assert r["eval_split"] not in r["selected_splits"], r
    own = next(r for r in records if r["head"] == "dac (adapter)")
    assert "metrics" not in own and "leaky" in own["skipped"]  # refused, with the reason
    tip_dac = next(r for r in records if r["head"] == "tip+dac")
    assert "metrics" in tip_dac and tip_dac["selected_splits"] == []  # defaults: honest on val
    assert not any("zero-shot term on the original" in n for n in tip_dac["notes"])  # no text: no such term
    assert any("no zero-shot term" in n for n in tip_dac["notes"])


# -- 4. train.py test on the last checkpoint scores exactly what the export scores ----------------------
@pytest.mark.parametrize("config", [DAC_DEMO, CODER_DEMO], ids=["dac", "coder_adapter"])
def test_test_on_the_last_checkpoint_equals_the_export(config, tmp_path, extracted):
    data = ["--data", "configs/data/demo.yaml", "--data.init_args.path", str(extracted[1]), "--data.init_args.shots",
            "4", "--model.init_args.pretrained", str(extracted[2])]
    assert train.main(["fit", *config, "--run_dir", str(tmp_path), *data, "--trainer.max_epochs", "3"]) == 0
    assert train.main(["test", *config, "--run_dir", str(tmp_path), *data, "--ckpt_path", "last"]) == 0
    tested = json.loads((tmp_path / "test" / "metrics.json").read_text())["metrics"]["test/acc1"]
    out = tmp_path / "r.json"
    assert evaluate.main(["--features", str(extracted[1]), "--shots", "4", "--heads", "prototype",
                          "--adapter", str(tmp_path / "adapter"), "--output", str(out)]) == 0
    own = next(r for r in json.loads(out.read_text()) if r["head"].endswith("(adapter)"))
    assert abs(tested - own["metrics"]["acc1"]) <= 1e-6, (tested, own["metrics"]["acc1"])
    # the demo backbone's features score the same under many heads: check what the checkpoint holds, too
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    export = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert ckpt["adapter_extra"] == export["extra"] and ckpt["adapter_extra"]["head_hparams"], ckpt["adapter_extra"]
    assert ckpt["adapter_selection"] == export["selected_on"]


def test_dac_test_on_real_features_equals_the_export(tmp_path):
    path = shared("clip-vit-b32-features/oxford_flowers.safetensors")
    config = [*DAC, *data_config("oxford_flowers")]
    assert train.main(["fit", *config, "--run_dir", str(tmp_path), "--trainer.max_epochs", "2"]) == 0
    assert train.main(["test", *config, "--run_dir", str(tmp_path), "--ckpt_path", "last"]) == 0
    tested = json.loads((tmp_path / "test" / "metrics.json").read_text())["metrics"]["test/acc1"]
    records = evaluate.evaluate_file(str(path), ["prototype"], [16], [1], [adapters.load_adapter(tmp_path / "adapter")],
                                     [str(tmp_path / "adapter")])
    own = next(r for r in records if r["head"] == "dac (adapter)")
    assert abs(tested - own["metrics"]["acc1"]) <= 1e-6


# -- 5. DAC: a head built without dropout, a well-defined two-stage schedule ---------------------------
def _text_file(path, c=4, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(c, d, generator=g), dim=-1)

    def split(n):
        y = torch.arange(c).repeat(n)
        return F.normalize(centers[y] + 0.5 * torch.randn(len(y), d, generator=g) / d ** 0.5, dim=-1), y
    return write_feature_file(path, {"train": split(8), "val": split(5), "test": split(5)}, text_features=centers,
                              metadata={"dataset": "toy", "backbone": TINY_MODEL}, class_names=list("abcd"))


def _fit_module(path, max_epochs=None, max_steps=-1, **kwargs):
    dm = FeatureDataModule(str(path), shots=4, batch_size=4)
    model = DACAdapter(num_classes=dm.num_classes, class_names=dm.class_names, backbone=TINY_MODEL,
                       embed_dim=dm.dim, dataset=dm.dataset_name, **kwargs)
    trainer = L.Trainer(max_epochs=max_epochs, max_steps=max_steps, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return model, trainer, dm


def test_two_loads_of_an_export_give_identical_logits_with_dropout(tmp_path):
    path = _text_file(tmp_path / "toy.safetensors")
    model, trainer, dm = _fit_module(path, max_epochs=2, dropout=0.5, schedule="joint")
    trainer.fit(model, datamodule=dm)
    model.export(tmp_path / "export")
    x = FeatureFile(path).split("test").features.float()
    a, b = adapters.load_adapter(tmp_path / "export"), adapters.load_adapter(tmp_path / "export")
    with torch.no_grad():
        assert torch.equal(a.logits(x), b.logits(x))
        model.train()  # a module left in train mode (as Lightning leaves it) still infers without dropout
        assert torch.equal(model.logits(x), a.logits(x))


class _Stages(L.Callback):
    def __init__(self):
        self.stages = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.stages.append(pl_module._stage())


@pytest.mark.parametrize("limits", [{"max_epochs": 1}, {"max_steps": 3}, {"max_epochs": 2}])
def test_sequential_schedule_gives_each_stage_at_least_one_step(tmp_path, limits):
    path = _text_file(tmp_path / "toy.safetensors")  # 4 steps per epoch at batch 4
    model, trainer, dm = _fit_module(path, intra_fraction=0.1, **limits)
    stages = _Stages()
    trainer.callbacks.append(stages)
    trainer.fit(model, datamodule=dm)
    assert stages.stages[0] == "intra" and stages.stages[-1] == "inter"
    assert stages.stages.count("intra") == max(1, round(0.1 * len(stages.stages)))


def test_sequential_schedule_with_one_step_is_a_clear_error(tmp_path):
    from adapters.errors import ConfigError

    path = _text_file(tmp_path / "toy.safetensors")
    model, trainer, dm = _fit_module(path, max_steps=1)
    with pytest.raises(ConfigError, match="at least 2"):
        trainer.fit(model, datamodule=dm)


# -- 6, 7. multi-view online training; one definition of view pooling -----------------------------------
def test_online_training_batches_carry_several_views_and_positives_across_views(extracted):
    from datamodules.images import ImageShardDataModule

    dm = ImageShardDataModule(str(extracted[0]), batch_size=6, num_workers=0, shots=4, train_views=2)
    model = DACAdapter(num_classes=dm.num_classes, class_names=dm.class_names, backbone=TINY_MODEL,
                       dataset=dm.dataset_name)
    dm.set_transforms(model.backbone.train_transform, model.backbone.eval_transform)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape[:2] == (6, 2) and not torch.equal(batch["image"][:, 0], batch["image"][:, 1])
    features = model.image_features(batch)
    assert features.shape[:2] == (6, 2)
    loss, extra = model.training_loss(features, batch["label"])
    assert loss.requires_grad and "supcon" in extra


def test_cache_keys_from_shards_equal_the_extracted_features(extracted):
    from datamodules.images import ImageShardDataModule

    shards, features, weights = extracted
    dm = ImageShardDataModule(str(shards), val_split="val", batch_size=8, num_workers=0, views=2)
    model = DACAdapter(num_classes=dm.num_classes, class_names=dm.class_names, backbone=TINY_MODEL,
                       pretrained=str(weights), dataset=dm.dataset_name)
    dm.set_transforms(model.backbone.train_transform, model.backbone.eval_transform)
    train_source, _ = dm.head_data()
    keys = model.embed_split(train_source)
    ff = FeatureFile(features)
    order = sorted(range(len(keys)), key=lambda i: i)  # both in shard (key) order
    torch.testing.assert_close(keys.features[order], ff.features("train").float(), atol=2e-3, rtol=0)


# -- 8. one bad file does not lose the others' results -------------------------------------------------
def test_a_bad_file_costs_only_its_own_rows(tmp_path):
    good = _text_file(tmp_path / "good.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a feature file")
    out = tmp_path / "r.json"
    result = subprocess.run([sys.executable, "evaluate.py", "--features", str(good), str(tmp_path / "bad.safetensors"),
                             "--shots", "2", "--heads", "prototype", "--output", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "bad.safetensors" in result.stderr
    records = json.loads(out.read_text())
    assert [r["head"] for r in records] == ["prototype"] and records[0]["features"] == str(good)


# -- 9. an adapter exported for another dataset is refused ---------------------------------------------
def test_an_adapter_of_another_dataset_is_refused_unless_allowed(tmp_path):
    path = _text_file(tmp_path / "toy.safetensors")
    model, trainer, dm = _fit_module(path, max_epochs=1, schedule="joint")
    trainer.fit(model, datamodule=dm)
    model.export(tmp_path / "export")
    other = _text_file(tmp_path / "other.safetensors", seed=1)
    meta = dict(FeatureFile(other).metadata)
    other = write_feature_file(tmp_path / "other.safetensors",
                               {s: (FeatureFile(other).features(s), FeatureFile(other).labels(s))
                                for s in ("train", "val", "test")},
                               metadata={"dataset": "flowers", "backbone": meta["backbone"]}, class_names=list("wxyz"))
    args = ["--features", str(other), "--shots", "2", "--heads", "prototype", "--adapter", str(tmp_path / "export"),
            "--output", str(tmp_path / "r.json")]
    result = subprocess.run([sys.executable, "evaluate.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--allow_dataset_mismatch" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert evaluate.main([*args, "--allow_dataset_mismatch"]) == 0
    own = next(r for r in json.loads((tmp_path / "r.json").read_text()) if r["head"] == "dac (adapter)")
    assert any("dataset mismatch allowed" in n for n in own["notes"])


# -- 10. overlap without same-class pairs is undefined, not 0 -------------------------------------------
def test_overlap_without_same_class_pairs_is_undefined(tmp_path):
    x = F.normalize(torch.randn(5, 8), dim=-1)
    assert intra_modal_overlap(x, torch.arange(5))[0] is None
    assert intra_modal_overlap(x, torch.zeros(5, dtype=torch.long))[0] is None  # no different-class pair
    c, d = 4, 8
    one_each = write_feature_file(tmp_path / "one.safetensors",
                                  {"train": (F.normalize(torch.randn(c, d), dim=-1), torch.arange(c)),
                                   "test": (F.normalize(torch.randn(c, d), dim=-1), torch.arange(c))},
                                  metadata={"dataset": "tiny"})
    (record,) = evaluate.overlap_records(str(one_each))
    assert record["overlap"] is None and "undefined" in record["notes"][0]


def test_cache_only_log_logits_with_unequal_shots_match_the_plain_formula():
    g = torch.Generator().manual_seed(1)
    keys = F.normalize(torch.randn(7, 8, generator=g), dim=-1)
    labels = torch.tensor([0, 0, 0, 1, 2, 2, 1])  # unequal shots: the index_add path
    head = TipAdapterHead(None).fit(FitData(keys, labels, 3), hparams={"beta": 3.0})
    x = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    plain = torch.exp(-3.0 * (1 - x @ keys.T)) @ F.one_hot(labels, 3).float()
    torch.testing.assert_close(head(x).exp(), plain, rtol=1e-5, atol=0)
