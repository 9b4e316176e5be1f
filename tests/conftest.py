"""Shared fixtures: the tiny random-weight backbone and the real data in ../shared/data."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
FEATURES_DIR = SHARED_DATA / "clip-vit-b32-features"


def shared(relative: str) -> Path:
    """A path under ../shared/data, skipping the test with a reason when it is absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


@pytest.fixture(scope="session")
def tiny_clip():
    from adapters.backbone import TINY_MODEL, FrozenCLIP

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FrozenCLIP(TINY_MODEL, pretrained=None)


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
