import json
import subprocess
import sys
import warnings

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import adapters
from adapters.base import WEIGHTS_NAME
from adapters.errors import ConfigError
from adapters.imo import IMOAdapter
from adapters.metrics import intra_modal_overlap
from callbacks.overlap import save_overlap_plot
from clip_adapters import evaluate, train
from datamodules import openimages
from tests.conftest import ROOT
from tests.helpers import make_openimages, make_shards


def _imo(**kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        return IMOAdapter(num_classes=5, backbone="tiny-clip", **kw).eval()


@torch.no_grad()
def test_adapted_equals_original_at_init_and_with_adapters_off():
    model = _imo()
    images = torch.randn(4, 3, 32, 32)
    original = model.backbone.encode_image(images)
    assert torch.equal(model.encode(images), original)  # zero-initialised up projection
    for p in model.adapters.parameters():
        torch.nn.init.normal_(p, std=0.2)
    assert not torch.allclose(model.encode(images), original)
    assert torch.equal(model.encode(images, adapted=False), original)  # the switch: bit-identical CLIP


def test_only_adapters_and_head_receive_gradients():
    model = _imo().train()
    for p in model.adapters.parameters():
        torch.nn.init.normal_(p, std=0.1)
    loss = model.classifier(model.encode(torch.randn(2, 3, 32, 32), normalize=False)).sum()
    loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.adapters.parameters())
    assert model.classifier.weight.grad is not None
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"adapters", "classifier"}


def test_reference_normalisation_quirk_is_a_flag():
    pixels = _imo(clip_normalization=False).train_transform(Image.new("RGB", (40, 40), (255, 255, 255)))
    assert pixels.min() >= 0 and pixels.max() <= 1  # [0, 1] pixels, as the reference trains
    normalised = _imo().train_transform(Image.new("RGB", (40, 40), (255, 255, 255)))
    assert normalised.max() > 1.5


def test_overlap_metric_constructed_cases():
    labels = torch.arange(8).repeat_interleave(10)
    same_everywhere = torch.nn.functional.normalize(torch.ones(80, 4), dim=-1)
    assert intra_modal_overlap(same_everywhere, labels)[0] == pytest.approx(1.0)  # identical distributions
    one_hot = torch.nn.functional.one_hot(labels, 8).float()  # same class: cos 1, different: cos 0
    assert intra_modal_overlap(one_hot, labels)[0] == pytest.approx(0.0)  # disjoint
    x = torch.randn(300, 16)
    y = torch.randint(0, 5, (300,))
    exact = intra_modal_overlap(x, y)[0]
    assert abs(intra_modal_overlap(x, y, max_pairs=40000)[0] - exact) < 0.05  # sampled pairs


def test_overlap_plot_is_a_valid_png(tmp_path):
    h = torch.full((200,), 1 / 200)
    path = save_overlap_plot({"original": (h, h, 1.0), "adapted": (h, h * 0, 0.0)}, tmp_path / "o.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(path).size[0] > 100


@pytest.fixture(scope="module")
def oi_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("openimages")
    inputs = make_openimages(root)
    assert openimages.main(["--labels", str(inputs["labels"]), "--classes", str(inputs["classes"]), "--images",
                            str(inputs["images"]), "--out", str(root / "shards"), "--val_fraction", "0.25",
                            "--max_count", "9"]) == 0
    return root, inputs


def test_openimages_positive_labels_and_policies(oi_shards, tmp_path):
    root, inputs = oi_shards
    manifest = json.loads((root / "shards" / "dataset.json").read_text())
    assert manifest["splits"]["train"]["count"] + manifest["splits"]["val"]["count"] == 72
    assert len(manifest["class_names"]) == 9 and manifest["splits"]["train"]["label"] == "cls"
    classes = openimages.read_classes(inputs["classes"])
    labels = openimages.read_positive_labels(inputs["labels"], classes)
    assert all(len(v) in (1, 2) for v in labels.values())  # negatives (Confidence 0) dropped
    records, names, multi = openimages.build_records(labels, classes, inputs["images"], label_policy="multi",
                                                     max_per_class=3)
    assert len(records) == 27 and any(len(v) == 2 for v in multi.values())
    assert all(multi[str(r.path)][0] == r.label for r in records)
    (tmp_path / "bad.csv").write_text("ImageID,LabelName\nx,/m/0\n")
    with pytest.raises(ConfigError, match="missing columns \\['Confidence'\\]"):
        openimages.read_positive_labels(tmp_path / "bad.csv", classes)


def test_imo_fit_export_and_ta_plus_plus(oi_shards, tmp_path):
    root, _ = oi_shards
    run = tmp_path / "imo"
    assert train.main(["fit", "--config", str(ROOT / "configs/imo/demo.yaml"), "--data", "configs/data/openimages.yaml",
                       "--data.init_args.global_batch_size", "16", "--data.init_args.num_workers", "0", "--run_dir", str(run),
                       "--data.init_args.shards", str(root / "shards"), "--trainer.max_epochs", "2"]) == 0
    assert (run / "overlap.png").is_file() and (run / "overlap-epoch001.png").is_file()
    tensors = load_file(str(run / "adapter" / WEIGHTS_NAME))
    assert not any(k.startswith("backbone.") for k in tensors) and "adapters.0.up.weight" in tensors
    assert any(tensors[k].abs().sum() > 0 for k in tensors if ".up." in k)  # it trained
    loaded = adapters.load_adapter(run / "adapter")
    for name, value in tensors.items():
        assert torch.equal(loaded.state_dict()[name], value), name
    # extraction with the exported encoder adapter: original and adapted features -> ZS, TA, TA++
    shards = make_shards(tmp_path / "target", per_class=6, max_count=6, fractions={"train": 0.5, "val": 0.25, "test": 0.25})
    assert train.main(["predict", "--config", str(ROOT / "configs/extract.yaml"), "--run_dir", str(tmp_path / "ex"),
                       "--data.init_args.shards", str(shards), "--data.init_args.num_workers", "0",
                       "--data.init_args.predict_splits", "[train,val,test]", "--data.init_args.views", "2",
                       "--model.init_args.adapter", str(run / "adapter")]) == 0
    out = tmp_path / "r.json"
    assert evaluate.main(["--features", str(tmp_path / "ex" / "features"), "--shots", "2", "--heads",
                          "zeroshot,tip,tip_imo,tipx", "--overlap", "--output", str(out)]) == 0
    records = json.loads(out.read_text())
    heads = {r.get("head") for r in records if "metrics" in r}
    # ZS, TA and TA++ on Tip-Adapter's grid and on IMO's, Tip-X and Tip-X++: each its own search
    assert heads == {"zeroshot", "tip", "tip+imo", "tip_imo", "tip_imo+imo", "tipx", "tipx+imo"}
    tipx = {r["head"]: r for r in records if r.get("head", "").startswith("tipx")}
    assert set(tipx["tipx"]["hyperparameters"]) == {"alpha", "beta", "gamma"}
    assert any("Tip-X++" in n for n in tipx["tipx+imo"]["notes"])
    spaces = {r["space"] for r in records if r.get("task") == "intra_modal_overlap"}
    assert spaces == {"original", "imo"} and (tmp_path / "overlap_features.png").is_file()


@pytest.mark.timeout(300)
def test_two_process_ddp_imo_fit(oi_shards, tmp_path):
    root, _ = oi_shards
    result = subprocess.run([sys.executable, "train.py", "fit", "--config", "configs/imo/demo.yaml", "--data",
                             "configs/data/openimages.yaml", "--data.init_args.global_batch_size", "16",
                             "--data.init_args.num_workers", "0", "--run_dir",
                             str(tmp_path), "--data.init_args.shards", str(root / "shards"), "--trainer.devices", "2",
                             "--trainer.strategy", "ddp"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "batch size 8 per device (global 16 over 2 devices" in result.stderr  # the global batch is kept
    assert (tmp_path / "adapter" / WEIGHTS_NAME).is_file()
