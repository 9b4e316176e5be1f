import subprocess
import sys
import warnings

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

import adapters
import train
from adapters.backbone import TINY_MODEL, FrozenCLIP
from adapters.base import WEIGHTS_NAME
from adapters.dac import DACAdapter
from adapters.errors import ConfigError
from datamodules.features import FeatureDataModule, FeatureFile
from datamodules.images import ImageShardDataModule
from tests.conftest import ROOT, shared
from tests.helpers import make_shards

CONFIGS = sorted(p for p in (ROOT / "configs").glob("*/*.yaml") if p.parent.name != "data")


def fit(run_dir, *extra, config="configs/dac/caltech101.yaml"):
    return train.main(["fit", "--config", str(ROOT / config), "--run_dir", str(run_dir), *extra])


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """Synthetic shards with train/val/test and their features, extracted with the tiny backbone."""
    root = tmp_path_factory.mktemp("extracted")
    shards = make_shards(root, per_class=10, max_count=10, fractions={"train": 0.6, "val": 0.2, "test": 0.2})
    assert train.main(["predict", "--config", str(ROOT / "configs/extract.yaml"), "--run_dir", str(root / "run"),
                       "--data.init_args.shards", str(shards), "--data.init_args.num_workers", "0",
                       "--data.init_args.predict_splits", "[train,val,test]"]) == 0
    return shards, root / "run" / "features"


@pytest.fixture(scope="module")
def openimages_shards(tmp_path_factory):
    from datamodules import openimages
    from tests.helpers import make_openimages

    root = tmp_path_factory.mktemp("oi")
    inputs = make_openimages(root, images_per_class=4)
    assert openimages.main(["--labels", str(inputs["labels"]), "--classes", str(inputs["classes"]), "--images",
                            str(inputs["images"]), "--out", str(root / "shards"), "--val_fraction", "0.25",
                            "--max_count", "4"]) == 0
    return root / "shards"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_fast_dev_run_of_each_config(config, tmp_path, extracted, openimages_shards):
    if config.parent.name == "imo":
        # the real config names ViT-B/16 openai weights, which cannot be downloaded here: same config,
        # tiny random-weight backbone
        data = ["--data.init_args.shards", str(openimages_shards), "--data.init_args.num_workers", "0",
                "--data.init_args.batch_size", "4", "--model.init_args.backbone", "tiny-clip",
                "--model.init_args.pretrained", "null"]
    elif config.stem == "demo":
        data = ["--data.init_args.path", str(extracted[1]), "--data.init_args.shots", "4"]
    else:
        shared(f"clip-vit-b32-features/{config.stem}.safetensors")
        data = []
    assert fit(tmp_path, "--trainer.fast_dev_run", "true", *data, config=config.relative_to(ROOT)) == 0
    assert (tmp_path / "adapter" / WEIGHTS_NAME).is_file()


def test_extraction_output_reads_back_and_every_head_evaluates(extracted, tmp_path):
    import json

    import evaluate

    ff = FeatureFile(extracted[1])
    assert ff.splits == ["test", "train", "val"] and ff.num_classes == 9 and ff.text_features.shape == (9, 32)
    assert ff.keys("train") == sorted(ff.keys("train")) and len(ff.keys("train")) == 54
    assert ff.split("train").extra["preproj"].shape == (54, 64) and ff.text_set.embeddings.shape == (9, 32)
    out = tmp_path / "r.json"
    assert evaluate.main(["--features", str(extracted[1]), "--shots", "2", "--output", str(out)]) == 0
    records = json.loads(out.read_text())
    ran = {r["head"] for r in records if "metrics" in r}
    assert ran == {"zeroshot", "prototype", "tip", "gda", "isoclip", "mixing", "coder", "coder_adapter"}


@pytest.mark.parametrize("method", ["dac", "dac-epoch-end", "coder"])
def test_resume_after_a_crash_ends_with_the_same_adapter(tmp_path, extracted, method):
    """Crash at step 10 and resume with --ckpt_path last: the exported adapter equals an uninterrupted
    run's, exactly (CPU). The last checkpoint is mid-epoch (step 9), or, for "dac-epoch-end", on the
    last batch of an epoch (step 7 of 7), where validation and a new loader run before the next step.
    DAC's noise and dropout use randomness, so this also checks that it depends on the step alone."""
    every = "7" if method == "dac-epoch-end" else "3"
    method = method.split("-")[0]
    if method == "dac":
        shared("clip-vit-b32-features/caltech101.safetensors")
        args = ["--trainer.max_epochs", "3", "--model.init_args.feature_noise", "0.05", "--model.init_args.dropout", "0.1"]
        config = "configs/dac/caltech101.yaml"  # 7 steps per epoch
    else:
        args = ["--trainer.max_epochs", "5", "--data.init_args.path", str(extracted[1]), "--data.init_args.shots", "4",
                "--data.init_args.batch_size", "8"]
        config = "configs/coder/demo.yaml"  # 5 steps per epoch
    args += ["--checkpoint_every_n_steps", every]
    assert fit(tmp_path / "whole", *args, "--ckpt_path", "last", config=config) == 0  # nothing to resume: fresh
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path / "crashed", *args, "--trainer.callbacks+=tests.helpers.CrashAtStep",
            "--trainer.callbacks.step", "10", config=config)
    assert (tmp_path / "crashed" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "crashed" / "adapter").exists()  # an interrupted fit exports nothing
    assert fit(tmp_path / "crashed", *args, "--ckpt_path", "last", config=config) == 0
    a = load_file(str(tmp_path / "whole" / "adapter" / WEIGHTS_NAME))
    b = load_file(str(tmp_path / "crashed" / "adapter" / WEIGHTS_NAME))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    loaded = adapters.load_adapter(tmp_path / "crashed" / "adapter")  # and the export loads back
    assert loaded.method == {"dac": "dac", "coder": "coder_adapter"}[method]


def test_export_round_trip_identical_logits_and_no_backbone(tmp_path, extracted):
    dm = FeatureDataModule(str(extracted[1]), shots=4, batch_size=16)
    model = DACAdapter(num_classes=dm.num_classes, class_names=dm.class_names, backbone=TINY_MODEL, embed_dim=dm.dim,
                       dataset=dm.dataset_name, schedule="joint")
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    model.backbone  # build it: it must still stay out of the export
    model.export(tmp_path / "export")
    tensors = load_file(str(tmp_path / "export" / WEIGHTS_NAME))
    assert not any(k.startswith("backbone.") for k in tensors) and "adapter.up.weight" in tensors
    assert not any(k.startswith("backbone.") for k in model.state_dict())
    test = FeatureFile(extracted[1]).split("test").features.float()
    loaded = adapters.load_adapter(tmp_path / "export")
    assert loaded.head_hparams == model.head_hparams
    with torch.no_grad():
        assert torch.equal(loaded.logits(test), model.eval().logits(test))


def test_load_adapter_refuses_a_different_backbone(tmp_path):
    shared("clip-vit-b32-features/caltech101.safetensors")
    assert fit(tmp_path, "--trainer.fast_dev_run", "true") == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny = FrozenCLIP(TINY_MODEL)
    with pytest.raises(ConfigError, match="trained on ViT-B-32, got tiny-clip"):
        adapters.load_adapter(tmp_path / "adapter", backbone=tiny)


def test_online_training_on_image_shards(tmp_path, extracted):
    shards = extracted[0]
    dm = ImageShardDataModule(str(shards), val_split="val", batch_size=6, num_workers=0, shots=4, views=2)
    model = DACAdapter(num_classes=dm.num_classes, class_names=dm.class_names, backbone=TINY_MODEL,
                       dataset=dm.dataset_name)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert model.train_features.shape == (36, 32) and model.head_hparams is not None
    assert "val/acc1" in trainer.callback_metrics


def _cli(*args, timeout=240):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.timeout(300)
def test_two_process_ddp_fit_on_cached_features(tmp_path):
    path = shared("clip-vit-b32-features/caltech101.safetensors")
    result = _cli("fit", "--config", "configs/dac/caltech101.yaml", "--run_dir", str(tmp_path),
                  "--data.init_args.path", str(path), "--trainer.max_epochs", "2", "--trainer.accelerator", "cpu",
                  "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "adapter" / WEIGHTS_NAME).is_file()
    adapters.load_adapter(tmp_path / "adapter")


@pytest.mark.timeout(300)
def test_extraction_in_one_and_two_processes_gives_the_same_features(tmp_path, extracted):
    shards = extracted[0]
    common = ["predict", "--config", "configs/extract.yaml", "--data.init_args.shards", str(shards),
              "--data.init_args.predict_splits", "[train,val,test]", "--data.init_args.num_workers", "1",
              "--trainer.accelerator", "cpu"]
    one = _cli(*common, "--run_dir", str(tmp_path / "one"))
    two = _cli(*common, "--run_dir", str(tmp_path / "two"), "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    a, b = FeatureFile(tmp_path / "one" / "features"), FeatureFile(tmp_path / "two" / "features")
    assert len(list((tmp_path / "two" / "features").glob("part-*.safetensors"))) == 2
    for split in ("train", "val", "test"):
        assert a.keys(split) == b.keys(split)
        assert torch.equal(a.labels(split), b.labels(split))
        # same images, same weights; batch composition differs, so allow fp16 rounding of BLAS differences
        torch.testing.assert_close(a.features(split).float(), b.features(split).float(), atol=2e-3, rtol=0)
    torch.testing.assert_close(a.text_features.float(), b.text_features.float())


@pytest.mark.parametrize("args, message", [
    (["--data.init_args.path", "missing.safetensors"], "missing.safetensors: no such feature file"),
    (["--model.init_args.backbone", "tiny-clip"], "model.backbone: tiny-clip but the features were extracted with ViT-B-32"),
    (["--data.init_args.shots", "99"], "no split 'train_99shot' or 'train' for shots=99"),
])
def test_bad_configuration_is_one_line_exit_2(tmp_path, args, message):
    shared("clip-vit-b32-features/caltech101.safetensors")
    result = _cli("fit", "--config", "configs/dac/caltech101.yaml", "--run_dir", str(tmp_path), *args)
    assert result.returncode == 2, result.stderr[-1500:]
    assert message in result.stderr and "Traceback" not in result.stderr
