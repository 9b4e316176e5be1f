import warnings

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

import adapters
from adapters.backbone import TINY_MODEL, FrozenCLIP
from adapters.base import WEIGHTS_NAME
from adapters.dac import DACAdapter
from adapters.errors import ConfigError
from adapters.textsets import EmbeddedTextSet
from datamodules.feature_file import FeatureFile
from datamodules.features import FeatureDataModule
from datamodules.images import ImageShardDataModule
from tests.conftest import DAC, ROOT, data_config, run_script, shared, train_cli

#: Every method config, composed with a data config as README shows; a hub backbone that cannot be
#: downloaded here is replaced by the tiny one (same config otherwise).
METHOD_CONFIGS = sorted(p.relative_to(ROOT) for p in (ROOT / "configs").glob("*/*.yaml") if p.parent.name != "data")


def _compose(config, request) -> list:
    method, variant = config.parent.name, config.stem
    if method in ("dac", "tip_adapter_f") and variant == "default":  # image-only: runs on the shared files
        return [*data_config("caltech101")]
    _, features, weights = request.getfixturevalue("extracted")
    tiny = ["--model.init_args.backbone", "tiny-clip", "--model.init_args.pretrained", weights]
    if method == "imo":
        shards = request.getfixturevalue("openimages_shards")
        return ["--data", "configs/data/openimages.yaml", "--data.init_args.shards", shards,
                "--data.init_args.num_workers", "0", "--data.init_args.global_batch_size", "4", *tiny,
                "--trainer.precision", "32-true"]
    return ["--data", "configs/data/demo.yaml", "--data.init_args.path", features, "--data.init_args.shots", "4", *tiny]


@pytest.mark.parametrize("config", METHOD_CONFIGS, ids=str)
def test_every_method_config_composes_with_a_data_config(config, tmp_path, request):
    assert train_cli("fit", "--config", config, *_compose(config, request), "--trainer.fast_dev_run", "true",
                     run_dir=tmp_path) == 0
    assert (tmp_path / "adapter" / WEIGHTS_NAME).is_file()


def test_extraction_output_reads_back_and_every_head_evaluates(extracted, tmp_path):
    import json

    from clip_adapters import evaluate

    ff = FeatureFile(extracted[1])
    assert ff.splits == ["test", "train", "val"] and ff.num_classes == 9 and ff.text_features.shape == (9, 32)
    assert ff.keys("train") == sorted(ff.keys("train")) and len(ff.keys("train")) == 54
    assert ff.split("train").extra["preproj"].shape == (54, 64)
    assert EmbeddedTextSet.from_tensors(ff.extras).embeddings.shape == (9, 32)
    out = tmp_path / "r.json"
    assert evaluate.main(["--features", str(extracted[1]), "--shots", "2", "--output", str(out)]) == 0
    records = json.loads(out.read_text())
    ran = {r["head"] for r in records if "metrics" in r}
    assert ran == {"zeroshot", "prototype", "tip", "gda", "isoclip", "mixing", "coder", "coder_adapter"}


def test_export_round_trip_identical_logits_and_no_backbone(tmp_path, extracted):
    dm = FeatureDataModule(str(extracted[1]), shots=4, batch_size=16)
    model = DACAdapter(num_classes=dm.num_classes, class_names=dm.class_names, backbone=TINY_MODEL, embed_dim=dm.dim,
                       dataset=dm.dataset_name, schedule="joint")
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    assert model.backbone is not None  # build it: it must still stay out of the export
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
    assert train_cli("fit", *DAC, *data_config("caltech101"), "--trainer.fast_dev_run", "true", run_dir=tmp_path) == 0
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


@pytest.mark.timeout(300)
def test_extraction_in_one_and_two_processes_gives_the_same_features(tmp_path, extracted):
    shards = extracted[0]
    common = ["predict", "--config", "configs/extract.yaml", "--data.init_args.shards", str(shards),
              "--data.init_args.predict_splits", "[train,val,test]", "--data.init_args.num_workers", "1",
              "--trainer.accelerator", "cpu"]
    one = run_script("train.py", *common, "--run_dir", tmp_path / "one")
    two = run_script("train.py", *common, "--run_dir", tmp_path / "two", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    a, b = FeatureFile(tmp_path / "one" / "features"), FeatureFile(tmp_path / "two" / "features")
    # one piece per shard (callbacks.feature_writer), whichever rank embedded it: the same pieces either way
    pieces = [sorted(p.relative_to(tmp_path / run / "features") for p in (tmp_path / run / "features" / "pieces").rglob(
        "*.safetensors")) for run in ("one", "two")]
    assert len(pieces[0]) > 2 and pieces[0] == pieces[1]
    for split in ("train", "val", "test"):
        assert a.keys(split) == b.keys(split)
        assert torch.equal(a.labels(split), b.labels(split))
        # same images, same weights; batch composition differs, so allow fp16 rounding of BLAS differences
        torch.testing.assert_close(a.features(split).float(), b.features(split).float(), atol=2e-3, rtol=0)
    torch.testing.assert_close(a.text_features.float(), b.text_features.float())


@pytest.mark.parametrize("kwargs, message", [({"lr": -1.0}, "lr: must be > 0"), ({"eps": 0.0}, "eps: must be > 0"),
                                            ({"weight_decay": -0.1}, "weight_decay: must be >= 0")])
def test_bad_optimiser_settings_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        DACAdapter(num_classes=3, backbone=TINY_MODEL, embed_dim=8, **kwargs)


def test_bad_batch_settings_are_config_errors():
    path = shared("clip-vit-b32-features/caltech101.safetensors")
    for kwargs in ({"batch_size": 0}, {"num_workers": -1}):
        with pytest.raises(ConfigError, match="batch_size must be >= 1 and num_workers >= 0"):
            FeatureDataModule(str(path), **kwargs)


@pytest.mark.parametrize("args, message", [
    (["--data.init_args.path", "missing.safetensors"], "missing.safetensors: no such feature file"),
    (["--model.init_args.backbone", "tiny-clip"], "model.backbone: tiny-clip but the features were extracted with ViT-B-32"),
    (["--data.init_args.shots", "99"], "no split 'train_99shot' or 'train' for shots=99"),
])
def test_bad_configuration_is_one_line_exit_2(tmp_path, args, message):
    shared("clip-vit-b32-features/caltech101.safetensors")
    result = run_script("train.py", "fit", *DAC, *data_config("caltech101"), "--run_dir", tmp_path, *args)
    assert result.returncode == 2, result.stderr[-1500:]
    assert message in result.stderr and "Traceback" not in result.stderr


def test_damaged_or_missing_exports_are_one_line_errors(tmp_path):
    from adapters.errors import UserError

    good = DACAdapter(num_classes=3, backbone=TINY_MODEL, embed_dim=8).export(tmp_path / "good")
    assert adapters.load_adapter(good).method == "dac"
    cases = {"missing": lambda d: (d / "adapter_model.safetensors").unlink(),
             "config": lambda d: (d / "adapter_config.json").write_text("{"),
             "weights": lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x10" * 40)}
    messages = {"missing": "not an adapter export", "config": "malformed adapter config",
                "weights": "unreadable adapter weights"}
    for name, damage in cases.items():
        export = tmp_path / name
        export.mkdir()
        for f in good.iterdir():
            (export / f.name).write_bytes(f.read_bytes())
        damage(export)
        with pytest.raises(UserError, match=messages[name]) as err:
            adapters.load_adapter(export)
        assert "\n" not in str(err.value) and str(export) in str(err.value)
