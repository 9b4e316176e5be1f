"""Shards anywhere: streamed from a real HTTP server and a real S3 API (moto's server), both on loopback,
started and stopped by the tests; reads that break half-way are retried without a hang or a repeat."""
from __future__ import annotations

import json
import shutil

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from adapters.base import WEIGHTS_NAME
from datamodules import shards as shard_tools
from datamodules.images import CorruptDataError, ImageShardDataModule
from datamodules.synthetic import make_image_folder
from tests.conftest import run_script, tiny_checkpoint
from tests.helpers import TRANSFORM, KeyRecorder, make_shards
from tests.servers import environment, http_server, s3_server

ONLINE = """
trainer: {{max_epochs: 2, accelerator: cpu, devices: 1, log_every_n_steps: 1}}
model:
  class_path: adapters.dac.DACAdapter
  init_args: {{backbone: tiny-clip, pretrained: {weights}, hidden_dim: 16, feature_noise: 0.05, dropout: 0.1}}
"""


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    return make_shards(root, per_class=8, max_count=8), tiny_checkpoint(root / "tiny.pt")  # 72 images, 9 shards


def _same_exports(a, b) -> bool:
    x, y = load_file(str(a / WEIGHTS_NAME)), load_file(str(b / WEIGHTS_NAME))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _fit_kill_resume_and_ddp(url: str, weights, tmp_path) -> None:
    """On shards at ``url``: fit; the same fit SIGKILLed at step 7 and resumed ends with the same export;
    2-process DDP sees every sample at most once, the same number of batches on each rank."""
    config = tmp_path / "online.yaml"
    config.write_text(ONLINE.format(weights=weights))
    args = ["fit", "--config", config, "--data", "configs/data/shards.yaml", "--data.init_args.shards", url,
            "--data.init_args.batch_size", "4", "--data.init_args.shuffle_buffer", "16", "--checkpoint_every_n_steps", "3"]
    assert run_script("train.py", *args, "--run_dir", tmp_path / "whole").returncode == 0
    killed = run_script("train.py", *args, "--run_dir", tmp_path / "killed", "--trainer.callbacks+=tests.helpers.SignalAtStep",
                        "--trainer.callbacks.step", "7", "--trainer.callbacks.signum", "9")
    assert killed.returncode == -9 and not (tmp_path / "killed" / "adapter").exists()
    resumed = run_script("train.py", *args, "--run_dir", tmp_path / "killed", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _same_exports(tmp_path / "whole" / "adapter", tmp_path / "killed" / "adapter")
    dm = ImageShardDataModule(url, batch_size=4, num_workers=1)
    dm.set_transforms(TRANSFORM, TRANSFORM)
    trainer = L.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(KeyRecorder(str(tmp_path)), datamodule=dm)
    ranks = [json.loads((tmp_path / f"rank{r}-epoch0.json").read_text()) for r in (0, 1)]
    keys = ranks[0]["keys"] + ranks[1]["keys"]
    assert ranks[0]["batches"] == ranks[1]["batches"] > 0 and len(keys) == len(set(keys))


@pytest.mark.timeout(600)
def test_fit_resume_and_ddp_on_shards_served_over_http(local_shards, tmp_path):
    shards, weights = local_shards
    with http_server(shards.parent) as (base, _):
        _fit_kill_resume_and_ddp(f"{base}/{shards.name}", weights, tmp_path)


@pytest.mark.timeout(600)
def test_shards_written_to_and_trained_from_an_s3_bucket(local_shards, tmp_path):
    _, weights = local_shards
    images = make_image_folder(tmp_path / "images", per_class=8, size=32, seed=0)
    with s3_server() as env, environment(env):
        assert shard_tools.main(["folder", str(images), "--out", "s3://shards/shapes", "--max_count", "8",
                                 "--dataset", "shapes"]) == 0
        manifest = shard_tools.read_manifest("s3://shards/shapes")
        assert manifest["splits"]["train"]["count"] == 72 and len(manifest["splits"]["train"]["shards"]) == 9
        _fit_kill_resume_and_ddp("s3://shards/shapes", weights, tmp_path)


def test_reads_cut_half_way_are_retried_then_skipped_and_counted(local_shards, tmp_path):
    shards, _ = local_shards
    names = sorted(p.name for p in shards.glob("train-*.tar"))
    flaky, dead = set(names[::3]), names[1]  # a third of the shards break once; one never arrives whole

    def cut(path: str, attempt: int) -> bool:
        name = path.rsplit("/", 1)[-1]
        return (name in flaky and attempt == 0) or name == dead

    with http_server(shards.parent, cut=cut) as (base, attempts):
        dm = ImageShardDataModule(f"{base}/{shards.name}", batch_size=1, num_workers=0, retry_backoff=0.01)
        dm.set_transforms(TRANSFORM, TRANSFORM)
        keys = [k for batch in dm.predict_dataloader()[0] for k in batch["key"]]
        retried, corrupt = dm.shared["retried"].value, dm.corrupt_count
        print(f"\n[reliability] HTTP, {len(flaky)} of {len(names)} shards cut once and 1 always: "
              f"{retried} reads retried, {corrupt} shard skipped, {len(keys)} of 72 samples, each once")
        assert len(keys) == len(set(keys)) == 72 - 8  # every sample once, but those of the dead shard
        assert corrupt == 1 and retried == len(flaky - {dead}) + 3  # the dead one: the whole budget
        assert attempts[f"/{shards.name}/{dead}"] == 4  # 1 + 3 retries, then given up: no hang
        strict = ImageShardDataModule(f"{base}/{shards.name}", batch_size=1, num_workers=0, retry_backoff=0.01,
                                      on_corrupt="raise")
        strict.set_transforms(TRANSFORM, TRANSFORM)
        with pytest.raises(CorruptDataError, match=dead):
            for _ in strict.predict_dataloader()[0]:
                pass
    shutil.rmtree(tmp_path, ignore_errors=True)
