"""Multi-node, simulated: two torchrun "nodes" of 2 processes each on 127.0.0.1 (gloo, c10d rendezvous)
train the export a one-process run of the same global batch trains: on cached features, and on shards
(the one process reads the folder, the nodes read the same shards over HTTP).

Why it can be equal: both DataModules hand every rank an equal slice of each global batch (features:
rank r takes every 4th index of the one (seed, epoch) permutation; shards: 8 shards of 9 samples, 2 per
rank, one global batch of 72 per epoch), DDP averages the ranks' gradients of their mean losses, and
DAC gathers the embeddings of all ranks (with gradients) for its contrastive loss, so the loss of a
step is the one-process loss. Noise and dropout are off (their random draws depend on the rank).
Tolerance: float sums run in another order (per-rank partial sums, then gloo's all-reduce), ~1e-7
relative per step; over 12 Adam steps that stays below 1e-4 on every weight, far below any
difference another batch makes (> 1e-2, checked below against a run at the per-device batch).
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from adapters.base import WEIGHTS_NAME
from tests.conftest import ROOT, tiny_checkpoint
from tests.helpers import make_shards
from tests.servers import free_port, http_server

DAC = ["--config", "configs/dac/demo.yaml", "--model.init_args.feature_noise", "0", "--model.init_args.dropout", "0",
       "--trainer.max_epochs", "4", "--seed_everything", "0"]


def _torchrun_two_nodes(args: list, run_dir, timeout: float = 400) -> None:
    """The README's torchrun recipe, both nodes on this machine: 2 nodes x 2 processes, CPU and gloo."""
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "test",
               "--local_addr", "127.0.0.1", "--max_restarts", "0", "train.py", "fit", *map(str, args),
               "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.num_nodes", "2",
               "--trainer.strategy", "ddp", "--run_dir", str(run_dir), "--ckpt_path", "last"]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=timeout)[0] for node in nodes]
    finally:
        for node in nodes:  # the agent and its workers: nothing outlives the test
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]


def _one_process(args: list, run_dir) -> None:
    result = subprocess.run([sys.executable, "train.py", "fit", *map(str, args), "--run_dir", str(run_dir)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _max_difference(a, b) -> float:
    x, y = load_file(str(a / "adapter" / WEIGHTS_NAME)), load_file(str(b / "adapter" / WEIGHTS_NAME))
    assert x.keys() == y.keys()
    return max(float((x[k].double() - y[k].double()).abs().max()) for k in x)


@pytest.mark.timeout(900)
def test_two_nodes_train_what_one_process_trains_on_features(extracted, tmp_path):
    _, features, _ = extracted
    data = ["--data", "configs/data/demo.yaml", "--data.init_args.path", features, "--data.init_args.shots", "4",
            "--data.init_args.global_batch_size", "12"]  # 36 samples: 3 global batches per epoch
    _one_process([*DAC, *data], tmp_path / "one")
    _torchrun_two_nodes([*DAC, *data], tmp_path / "nodes")
    difference = _max_difference(tmp_path / "one", tmp_path / "nodes")
    print(f"\n[multinode] features: max |one process - 2 nodes x 2| = {difference:.2e}")
    assert difference < 1e-4
    # the tolerance tells batches apart: one process at the per-device batch (3) trains something else
    _one_process([*DAC, *data, "--data.init_args.global_batch_size", "3"], tmp_path / "per-device")
    assert _max_difference(tmp_path / "one", tmp_path / "per-device") > 1e-2


@pytest.mark.timeout(900)
def test_two_nodes_over_http_train_what_one_process_trains_on_the_shard_folder(tmp_path):
    shards = make_shards(tmp_path, per_class=8, max_count=9)  # 72 images in 8 shards of 9
    weights = tiny_checkpoint(tmp_path / "tiny.pt")
    data = tmp_path / "shards.yaml"
    data.write_text("class_path: datamodules.images.ImageShardDataModule\n"
                    "init_args: {num_workers: 1, global_batch_size: 72, augment: false}\n")
    online = [*DAC, "--data", data, "--model.init_args.pretrained", weights]
    _one_process([*online, "--data.init_args.shards", shards], tmp_path / "one")
    with http_server(shards.parent) as (base, _):
        _torchrun_two_nodes([*online, "--data.init_args.shards", f"{base}/{shards.name}"], tmp_path / "nodes")
    difference = _max_difference(tmp_path / "one", tmp_path / "nodes")
    print(f"\n[multinode] shards: max |one process on the folder - 2 nodes x 2 over HTTP| = {difference:.2e}")
    assert difference < 1e-4
