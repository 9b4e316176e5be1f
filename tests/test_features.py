import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from adapters.errors import ConfigError, FeatureFileError
from datamodules.feature_file import MANIFEST, MANIFEST_FORMAT, FeatureFile, write_feature_file


def _splits(n=40, d=8, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    return feats, torch.arange(n) % c


def test_round_trip_keeps_tensors_metadata_and_class_names(tmp_path):
    x, y = _splits()
    text = F.normalize(torch.randn(4, 8), dim=-1)
    path = write_feature_file(tmp_path / "f.safetensors", {"train": (x, y), "test": (x[:10], y[:10])},
                              text_features=text, metadata={"backbone": "tiny-clip", "dataset": "toy"},
                              class_names=["a", "b", "c", "d"])
    ff = FeatureFile(path)
    assert ff.splits == ["test", "train"] and ff.dim == 8 and ff.num_classes == 4
    assert ff.dataset == "toy" and ff.class_names == ["a", "b", "c", "d"]
    assert ff.features("train").dtype == torch.float16
    torch.testing.assert_close(ff.features("train").float(), x, atol=1e-3, rtol=0)
    assert torch.equal(ff.labels("test"), y[:10])
    torch.testing.assert_close(ff.text_features.float(), text, atol=1e-3, rtol=0)
    assert not list(tmp_path.glob(".tmp-*")), "atomic write left a temporary file"


def test_reads_are_memory_mapped(tmp_path):
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps (Linux)")
    x, y = _splits()
    path = write_feature_file(tmp_path / "mapped.safetensors", {"train": (x, y)})
    ff = FeatureFile(path)
    assert str(path) in maps.read_text()  # the file is mapped, not read into a buffer
    assert ff.features("train").shape == (40, 8)


def test_train_split_prefers_stored_k_shot_split_then_samples(tmp_path):
    x, y = _splits(n=40, c=4)
    ff = FeatureFile(write_feature_file(tmp_path / "a.safetensors", {"train": (x, y), "train_2shot": (x[:8], y[:8])}))
    split, desc = ff.train_split(2)
    assert len(split) == 8 and "fixed in file" in desc
    split, desc = ff.train_split(3, seed=1)
    assert torch.bincount(split.labels).tolist() == [3, 3, 3, 3] and "seed 1" in desc
    with pytest.raises(ConfigError, match="shots: 11 is larger than the 10 samples of class 0"):
        ff.train_split(11)


def test_directory_of_parts_reads_like_one_file(tmp_path):
    x, y = _splits(n=20)
    d = tmp_path / "extraction"
    write_feature_file(d / "part-0.safetensors", {"train": (x[:12], y[:12])})
    write_feature_file(d / "part-1.safetensors", {"train": (x[12:], y[12:])})
    (d / MANIFEST).write_text(json.dumps({"format": MANIFEST_FORMAT, "parts": ["part-0.safetensors", "part-1.safetensors"],
                                          "metadata": {"dataset": "toy"}}))
    ff = FeatureFile(d)
    assert ff.dataset == "toy" and torch.equal(ff.labels("train"), y)


def test_errors_name_the_file_and_problem(tmp_path):
    x, y = _splits()
    with pytest.raises(FeatureFileError, match="no such feature file"):
        FeatureFile(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"definitely not safetensors")
    with pytest.raises(FeatureFileError, match="junk.safetensors: not a safetensors feature file"):
        FeatureFile(tmp_path / "junk.safetensors")
    save_file({"weights": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(FeatureFileError, match="not a feature file"):
        FeatureFile(tmp_path / "model.safetensors")
    save_file({"train.features": x}, str(tmp_path / "nolabels.safetensors"))
    with pytest.raises(FeatureFileError, match="no 'train.labels'"):
        FeatureFile(tmp_path / "nolabels.safetensors")
    save_file({"train.features": x, "train.labels": y, "test.features": torch.zeros(3, 5),
               "test.labels": torch.zeros(3, dtype=torch.long)}, str(tmp_path / "dims.safetensors"))
    with pytest.raises(FeatureFileError, match="dimension mismatch"):
        FeatureFile(tmp_path / "dims.safetensors")
    save_file({"train.features": x, "train.labels": y[:5]}, str(tmp_path / "rows.safetensors"))
    with pytest.raises(FeatureFileError, match="40 feature rows but 5 labels"):
        FeatureFile(tmp_path / "rows.safetensors")
    ff = FeatureFile(write_feature_file(tmp_path / "ok.safetensors", {"train": (x, y)}))
    with pytest.raises(FeatureFileError, match="no split 'test' \\(has: train\\)"):
        ff.split("test")
    (tmp_path / "dir").mkdir()
    with pytest.raises(FeatureFileError, match="no manifest.json"):
        FeatureFile(tmp_path / "dir")


def test_views_as_rows_extraction_gda_and_multi_view_training(tmp_path):
    """An extraction with view_rows keeps every view as a normalised row beside the pooled one: the
    pooled row is `pool_views` of the rows times their norms; GDA fits on the rows (so 1 shot has a
    within-class scatter); old readers see the pooled rows; DAC can train on the views."""
    import lightning as L

    from adapters.backbone import TINY_MODEL, pool_views
    from adapters.dac import DACAdapter
    from adapters.heads import FitData, build_head
    from datamodules.features import FeatureDataModule
    from tests.conftest import ROOT, train_cli
    from tests.helpers import make_shards

    shards = make_shards(tmp_path, per_class=3, max_count=9, fractions={"train": 0.34, "val": 0.33, "test": 0.33})
    assert train_cli("predict", "--config", ROOT / "configs/extract.yaml", "--data.init_args.shards", shards,
                     "--data.init_args.num_workers", "0", "--data.init_args.predict_splits", "[train,val,test]",
                     "--data.init_args.views", "10", "--model.init_args.view_rows", "true",
                     run_dir=tmp_path / "run") == 0
    ff = FeatureFile(tmp_path / "run" / "features")
    train = ff.split("train")
    assert train.extra["views"].shape == (9, 10, 32) and train.extra["view_norms"].shape == (9, 10)
    assert "views" not in ff.split("test").extra  # eval splits: one eval-transform row each
    rows = train.extra["views"].float() * train.extra["view_norms"][..., None]
    torch.testing.assert_close(pool_views(rows), train.features.float(), atol=2e-3, rtol=0)
    # GDA at 1 shot: ten view rows per class give a covariance, no nearest-mean fallback
    data = FitData(train.features, train.labels, 9, train_views=train.extra["views"])
    gda = build_head("gda").fit(data)
    assert any("10 views per image" in n for n in gda.notes) and not any("nearest class mean" in n for n in gda.notes)
    pooled_only = build_head("gda").fit(FitData(train.features, train.labels, 9))
    assert any("nearest class mean" in n for n in pooled_only.notes)
    # DAC on cached features with several views per image: [B, V, D] batches
    dm = FeatureDataModule(str(tmp_path / "run" / "features"), shots=None, batch_size=4, train_views=True)
    assert next(iter(dm.train_dataloader()))["features"].shape == (4, 10, 32)
    model = DACAdapter(num_classes=9, class_names=dm.class_names, backbone=TINY_MODEL, dataset=dm.dataset_name,
                       schedule="joint")
    L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(model, datamodule=dm)
    with pytest.raises(ConfigError, match="no view rows"):
        FeatureDataModule(str(write_feature_file(tmp_path / "plain.safetensors", {"train": _splits()})), shots=None,
                          train_views=True)
