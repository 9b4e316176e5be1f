"""Shared fixtures and helpers: the tiny random-weight backbone, one CLI runner, extracted features,
Open Images-style shards, and the real data in ../shared/data."""
from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
FEATURES_DIR = SHARED_DATA / "clip-vit-b32-features"

#: Method configs composed with data configs, as the README shows them.
DAC = ("--config", "configs/dac/default.yaml")
DAC_DEMO = ("--config", "configs/dac/demo.yaml")
CODER_DEMO = ("--config", "configs/coder/demo.yaml")
IMO_DEMO = ("--config", "configs/imo/demo.yaml")
TIP_F_DEMO = ("--config", "configs/tip_adapter_f/demo.yaml")


def data_config(name: str) -> tuple[str, str]:
    """``--data configs/data/<name>.yaml``; a shared feature file's config skips the test when absent."""
    if name in ("caltech101", "oxford_flowers", "fgvc"):
        shared(f"clip-vit-b32-features/{name}.safetensors")
    return ("--data", f"configs/data/{name}.yaml")


def shared(relative: str) -> Path:
    """A path under ../shared/data, skipping the test with a reason when it is absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


def train_cli(*args, run_dir=None) -> int:
    """``train.py`` in this process (fast; exceptions propagate): returns its exit status."""
    from clip_adapters import train

    return train.main([str(a) for a in args] + ([] if run_dir is None else ["--run_dir", str(run_dir)]))


def run_script(script: str, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python <script> args`` from the repository root in a child process (exit status, one-line
    errors, DDP): the way a user runs it."""
    return subprocess.run([sys.executable, script, *[str(a) for a in args]], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A local open_clip checkpoint file of the tiny config (random weights, fixed by ``seed``): what
    ``pretrained: /path/to/file.pt`` loads, so that two processes share one backbone."""
    import open_clip

    from adapters.backbone import TINY_MODEL, register_model_configs

    register_model_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_MODEL, pretrained=None)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_clip():
    from adapters.backbone import TINY_MODEL, FrozenCLIP

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FrozenCLIP(TINY_MODEL, pretrained=None)


@pytest.fixture(scope="session")
def extracted(tmp_path_factory):
    """Synthetic shape images in train/val/test shards and their features, extracted (2 views per
    training image) with a tiny backbone whose weights are a local checkpoint file.
    Returns (shards, features, weights)."""
    from tests.helpers import make_shards

    root = tmp_path_factory.mktemp("extracted")
    shards = make_shards(root, per_class=10, max_count=10, fractions={"train": 0.6, "val": 0.2, "test": 0.2})
    weights = tiny_checkpoint(root / "tiny.pt")
    assert train_cli("predict", "--config", ROOT / "configs/extract.yaml", "--data.init_args.shards", shards,
                     "--data.init_args.num_workers", "0", "--model.init_args.pretrained", weights,
                     "--data.init_args.predict_splits", "[train,val,test]", "--data.init_args.views", "2",
                     run_dir=root / "run") == 0
    return shards, root / "run" / "features", weights


@pytest.fixture(scope="session")
def openimages_shards(tmp_path_factory):
    """Open Images-format inputs written as shards with a val split (datamodules.openimages)."""
    from datamodules import openimages
    from tests.helpers import make_openimages

    root = tmp_path_factory.mktemp("oi")
    inputs = make_openimages(root, images_per_class=4)
    assert openimages.main(["--labels", str(inputs["labels"]), "--classes", str(inputs["classes"]), "--images",
                            str(inputs["images"]), "--out", str(root / "shards"), "--val_fraction", "0.25",
                            "--max_count", "4"]) == 0
    return root / "shards"
