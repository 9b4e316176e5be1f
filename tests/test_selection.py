"""Selection protocols (full val, few-shot val, cross-validation), seeds (mean ± std, Dassl's split
files) and the benchmark runner."""
from __future__ import annotations

import json
import pickle
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from adapters.errors import ConfigError
from adapters.protocol import cross_validation_folds, read_dassl_fewshot
from clip_adapters import benchmark, evaluate
from datamodules.feature_file import FeatureFile, write_feature_file

C, D = 5, 16


def _file(path, train=12, val=10, test=10, with_val=True, keys=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(C, D, generator=g), dim=-1)

    def split(n):
        y = torch.arange(C).repeat(n)
        return F.normalize(centers[y] + 0.9 * torch.randn(len(y), D, generator=g) / D ** 0.5, dim=-1), y

    splits = {"train": split(train), "test": split(test)}
    if with_val:
        splits["val"] = split(val)
    names = {s: [f"{s}/class{int(y)}/img{i:03d}" for i, y in enumerate(splits[s][1])] for s in splits} if keys else None
    return write_feature_file(path, splits, metadata={"dataset": "toy", "backbone": "tiny-clip"}, keys=names)


def test_realistic_val_is_min_k_4_per_class_of_val_seeded(tmp_path):
    ff = FeatureFile(_file(tmp_path / "f.safetensors"))
    full, desc = ff.selection_split("full", 16, 1)
    assert len(full) == 10 * C and desc == "val"
    for shots, per_class in ((1, 1), (2, 2), (16, 4)):
        val, desc = ff.selection_split("realistic", shots, 1)
        assert torch.bincount(val.labels, minlength=C).tolist() == [per_class] * C, desc
        assert val.name == "val"  # a part of val: nothing may be scored on val after choosing on it
        assert f"{per_class} per class" in desc
    a, b, a2 = (ff.selection_split("realistic", 16, s)[0] for s in (1, 2, 1))
    assert torch.equal(a.features, a2.features) and not torch.equal(a.features, b.features)
    with pytest.raises(ConfigError, match="protocol"):
        ff.selection_split("oracle", 16, 1)


def test_records_say_their_protocol_and_selection_accuracy(tmp_path):
    path = _file(tmp_path / "f.safetensors")
    records = evaluate.evaluate_file(str(path), ["prototype", "tip"], [4], [1], protocols=("full", "realistic"))
    by = {(r["head"], r["protocol"]): r for r in records}
    assert by[("tip", "full")]["val"] == "val" and "4 per class" in by[("tip", "realistic")]["val"]
    for r in records:
        assert r["selected_splits"] in ([], ["val"]) and 0 <= r["val_acc1"] <= 1
    # the realistic record's selection accuracy is measured on its 4-per-class val, not on the whole val
    ff = FeatureFile(path)
    val, _ = ff.selection_split("realistic", 4, 1)
    train, _ = ff.train_split(4, 1)
    protos = F.normalize(torch.stack([train.features[train.labels == c].float().mean(0) for c in range(C)]), dim=-1)
    expected = float(((F.normalize(val.features.float(), dim=-1) @ protos.T).argmax(1) == val.labels).float().mean())
    assert by[("prototype", "realistic")]["val_acc1"] == pytest.approx(expected)


def test_cross_validation_without_val_chooses_on_the_training_shots(tmp_path):
    path = _file(tmp_path / "noval.safetensors", with_val=False)
    records = evaluate.evaluate_file(str(path), ["tip", "prototype"], [8, 1], [1], protocols=("full", "realistic"))
    by = {(r["head"], r["shots"], r["protocol"]): r for r in records}
    full, cv = by[("tip", 8, "full")], by[("tip", 8, "realistic")]
    assert full["selected_splits"] == [] and any("no val split" in n for n in full["notes"])
    assert cv["selected_splits"] == ["train"] and "4-fold cross-validation" in cv["selected_on"]
    assert cv["eval_split"] == "test" and not any("no val split" in n for n in cv["notes"])
    assert 0 < cv["val_acc1"] <= 1 and "cross-validation" in cv["val"]
    # the chosen beta is the candidate with the best pooled held-out accuracy: recompute it by hand
    ff = FeatureFile(path)
    train, _ = ff.train_split(8, 1)
    folds = cross_validation_folds(train.labels, 4)
    assert sorted(torch.cat(folds).tolist()) == list(range(len(train)))
    assert all(torch.bincount(train.labels[f], minlength=C).tolist() == [2] * C for f in folds)

    def cv_accuracy(beta):
        correct = 0
        for held in folds:
            keep = torch.tensor([i for i in range(len(train)) if i not in set(held.tolist())])
            k = F.normalize(train.features[keep].float(), dim=-1)
            q = F.normalize(train.features[held].float(), dim=-1)
            logits = torch.exp(-beta * (1 - q @ k.T)) @ F.one_hot(train.labels[keep], C).float()
            correct += int((logits.argmax(1) == train.labels[held]).sum())
        return correct / len(train)

    assert cv["val_acc1"] == pytest.approx(cv_accuracy(cv["hyperparameters"]["beta"]))
    one = by[("tip", 1, "realistic")]  # 1 shot: nothing to cross-validate
    assert one["selected_splits"] == [] and any("no cross-validation" in n for n in one["notes"])


def test_seed_summaries_are_mean_and_std_of_the_seeds(tmp_path):
    path = _file(tmp_path / "f.safetensors")
    out = tmp_path / "r.json"
    assert evaluate.main(["--features", str(path), "--shots", "2", "--seeds", "1", "2", "3", "--heads", "prototype",
                          "--protocol", "full", "realistic", "--output", str(out)]) == 0
    records = json.loads(out.read_text())
    runs = [r for r in records if r["task"] == "fewshot_classification"]
    summaries = [r for r in records if r["task"] == "fewshot_seed_summary"]
    assert len(runs) == 6 and len(summaries) == 2
    s = next(r for r in summaries if r["protocol"] == "full")
    acc = torch.tensor([r["metrics"]["acc1"] for r in runs if r["protocol"] == "full"], dtype=torch.float64)
    assert s["seeds"] == [1, 2, 3] and acc.std() > 0
    assert s["mean"]["acc1"] == pytest.approx(float(acc.mean())) and s["std"]["acc1"] == pytest.approx(float(acc.std()))


def _dassl_pickle(path, items):
    """Write a split file as Dassl does (its Datum class pickled by reference), without Dassl installed."""
    module = types.ModuleType("dassl.data.datasets.base_dataset")

    class Datum:
        def __init__(self, impath, label, classname):
            self._impath, self._label, self._domain, self._classname = impath, label, 0, classname

    Datum.__module__, Datum.__qualname__ = module.__name__, "Datum"
    module.Datum = Datum
    names = ["dassl", "dassl.data", "dassl.data.datasets"]
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    sys.modules[module.__name__] = module
    try:
        data = {split: [Datum(p, y, f"class{y}") for p, y in rows] for split, rows in items.items()}
        path.write_bytes(pickle.dumps(data))
    finally:
        for name in names + [module.__name__]:
            del sys.modules[name]


def test_dassl_split_files_select_the_exact_subsets(tmp_path):
    path = _file(tmp_path / "f.safetensors", keys=True)
    ff = FeatureFile(path)
    train_keys, val_keys = ff.keys("train"), ff.keys("val")
    pick_train = [3, 7, 12, 20, 33, 41, 44, 58]
    pick_val = [0, 6, 13, 19, 24]
    split_dir = tmp_path / "split_fewshot"
    split_dir.mkdir()
    # Dassl stores absolute image paths of the machine that made them, with extensions
    as_dassl = lambda keys, idx, ff_split: [(f"/data/caltech/{keys[i]}.jpg", int(ff_split.labels[i])) for i in idx]  # noqa: E731
    _dassl_pickle(split_dir / "shot_2-seed_1.pkl", {"train": as_dassl(train_keys, pick_train, ff.split("train")),
                                                    "val": as_dassl(val_keys, pick_val, ff.split("val"))})
    assert read_dassl_fewshot(str(split_dir / "shot_2-seed_1.pkl"))["train"][0][1] == int(ff.split("train").labels[3])
    train, train_desc, val, val_desc = ff.fewshot(2, 1, "realistic", str(split_dir))
    assert torch.equal(train.features, ff.split("train").features[pick_train])
    assert torch.equal(val.features, ff.split("val").features[pick_val]) and "shot_2-seed_1.pkl" in val_desc
    records = evaluate.evaluate_file(str(path), ["prototype"], [2], [1], protocols=("realistic",),
                                     fewshot_dir=str(split_dir))
    assert "shot_2-seed_1.pkl" in records[0]["train"]
    with pytest.raises(ConfigError, match="shot_2-seed_2.pkl"):
        ff.fewshot(2, 2, "full", str(split_dir))
    bad = tmp_path / "bad"
    bad.mkdir()
    _dassl_pickle(bad / "shot_2-seed_1.pkl", {"train": [("/x/train/class0/missing.jpg", 0)]})
    with pytest.raises(ConfigError, match="missing.jpg"):
        ff.fewshot(2, 1, "full", str(bad))
    (bad / "shot_4-seed_1.pkl").write_bytes(pickle.dumps({"train": [types.SimpleNamespace()]}))
    with pytest.raises(ConfigError, match="not a Dassl few-shot split file"):
        ff.fewshot(4, 1, "full", str(bad))


def test_benchmark_runs_every_cell_once_and_reports_the_val_choice(tmp_path, monkeypatch):
    paths = [str(_file(tmp_path / f"{name}.safetensors", seed=i)) for i, name in enumerate(("toy_a", "toy_b"))]
    out = tmp_path / "bench"
    argv = ["--features", *paths, "--shots", "2", "4", "--seeds", "1", "2", "--methods",
            "prototype,tip,gda,tip_adapter_f", "--protocol", "full", "realistic", "--out", str(out),
            "--train_args", "--trainer.max_epochs", "1"]
    assert benchmark.main(argv) == 0
    records = json.loads((out / "results.json").read_text())
    runs = [r for r in records if r["task"] == "fewshot_classification"]
    cells = {(r["features"], r["shots"], r["seed"], r["protocol"]) for r in runs}
    assert len(cells) == 2 * 2 * 2 * 2
    for cell in cells:
        rows = [r for r in runs if (r["features"], r["shots"], r["seed"], r["protocol"]) == cell]
        best = [r for r in rows if r["head"] == benchmark.BEST]
        others = [r for r in rows if r["head"] != benchmark.BEST and r.get("val_acc1") is not None]
        assert len(best) == 1 and {r["head"] for r in others} >= {"prototype", "tip", "gda", "tip_adapter_f (adapter)"}
        winner = max(others, key=lambda r: r["val_acc1"])
        assert best[0]["chosen"] == winner["head"] and best[0]["metrics"] == winner["metrics"]
        assert "test" not in best[0]["selected_splits"]
    tipf = next(r for r in runs if r["head"] == "tip_adapter_f (adapter)")
    assert tipf["train_seconds"] > 0 and tipf["protocol"] in ("full", "realistic")
    summaries = [r for r in records if r["task"] == "fewshot_seed_summary"]
    assert {r["seeds"] for r in map(lambda r: {**r, "seeds": tuple(r["seeds"])}, summaries)} == {(1, 2)}
    summary = (out / "summary.md").read_text()
    assert "## Protocol: realistic" in summary and "±" in summary and benchmark.BEST in summary
    assert (out / "plots" / "toy_a-full.png").stat().st_size > 0
    # resumable: every cell is done, so a second run trains and fits nothing and writes the same records
    monkeypatch.setattr(benchmark, "run_cell", lambda *a, **k: pytest.fail("a finished cell ran again"))
    assert benchmark.main(argv) == 0
    assert json.loads((out / "results.json").read_text()) == records


def test_benchmark_cells_and_runs_are_keyed_by_what_was_asked(tmp_path):
    path = str(_file(tmp_path / "toy.safetensors"))
    out = tmp_path / "bench"
    common = ["--features", path, "--shots", "2", "--seeds", "1", "--out", str(out)]

    def heads() -> set[str]:
        return {r["head"] for r in json.loads((out / "results.json").read_text()) if r.get("task") == "fewshot_classification"}
    assert benchmark.main([*common, "--methods", "prototype"]) == 0
    assert heads() == {"prototype", benchmark.BEST}
    # other methods into the same --out run (the cell above is not taken for theirs)
    assert benchmark.main([*common, "--methods", "prototype,gda,tip_adapter_f", "--train_args",
                           "--trainer.max_epochs", "1"]) == 0
    assert heads() >= {"prototype", "gda", "tip_adapter_f (adapter)", benchmark.BEST}
    runs = sorted(p.name for p in (out / "runs").rglob("tip_adapter_f-*"))
    # another recipe (other --train_args) trains anew beside the first run, which stays as it was
    assert benchmark.main([*common, "--methods", "tip_adapter_f", "--train_args", "--trainer.max_epochs", "2"]) == 0
    again = sorted(p.name for p in (out / "runs").rglob("tip_adapter_f-*"))
    assert len(runs) == 1 and len(again) == 2 and set(runs) < set(again)


def test_benchmark_bad_method_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        benchmark.parse_args(["--features", "x", "--methods", "nope", "--out", "o"])
    assert e.value.code == 2 and "--methods: unknown method 'nope'" in capsys.readouterr().err
