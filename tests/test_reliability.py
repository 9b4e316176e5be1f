"""Reliability: kill-and-resume, interrupted writes, corrupt-data fuzzing, config errors, DDP without hangs.

Each test prints the figures RELIABILITY.md quotes (run with -s to see them)."""
import io
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import adapters
from adapters.base import WEIGHTS_NAME
from adapters.errors import UserError
from datamodules.feature_file import FeatureFile, write_feature_file
from datamodules.images import ImageShardDataModule
from tests.conftest import DAC, ROOT, shared
from tests.helpers import TRANSFORM, make_shards

FIT = ["fit", *DAC, "--data", "configs/data/caltech101.yaml", "--trainer.max_epochs", "6", "--checkpoint_every_n_steps", "2",
       "--model.init_args.feature_noise", "0.05", "--model.init_args.dropout", "0.1"]


def _train(*args, **kw):
    # output to DEVNULL: an unread pipe would fill up and block the child
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, **kw)


def _kill_repeatedly(args: list, run: Path, times: int, rng: random.Random, max_delay: float) -> int:
    """Start `train.py <args> --ckpt_path last` `times` times, SIGKILLing each at a random moment after the
    run directory holds its first step checkpoint; returns how many were killed (not already finished)."""
    kills = 0
    for _ in range(times):
        proc = _train(*args, "--run_dir", str(run), "--ckpt_path", "last")
        deadline = time.monotonic() + 120
        while not list((run / "checkpoints").glob("step-*.ckpt")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, max_delay))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(60)
    return kills


def _same_exports(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / WEIGHTS_NAME)), load_file(str(b / WEIGHTS_NAME))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.timeout(600)
def test_sigkill_at_random_steps_then_resume_equals_an_uninterrupted_run(tmp_path):
    """SIGKILL `train.py fit` at random moments after its first checkpoint, three times, restarting with
    --ckpt_path last each time: the exported adapter is bit-identical to an uninterrupted run's (CPU)."""
    shared("clip-vit-b32-features/caltech101.safetensors")
    assert _train(*FIT, "--run_dir", str(tmp_path / "whole")).wait(300) == 0
    run = tmp_path / "killed"
    kills = _kill_repeatedly(FIT, run, 3, random.Random(0), max_delay=1.5)
    assert _train(*FIT, "--run_dir", str(run), "--ckpt_path", "last").wait(300) == 0
    identical = _same_exports(tmp_path / "whole" / "adapter", run / "adapter")
    print(f"\n[reliability] SIGKILLed runs: {kills} of 3; resumed export identical: {identical}")
    assert kills >= 1
    assert _same_exports(tmp_path / "whole" / "adapter", run / "adapter")


ONLINE_FIT = """
trainer: {{max_epochs: 4, accelerator: cpu, devices: 1}}
model:
  class_path: adapters.dac.DACAdapter
  init_args: {{backbone: tiny-clip, hidden_dim: 16, feature_noise: 0.05, dropout: 0.1}}
data:
  class_path: datamodules.images.ImageShardDataModule
  init_args: {{shards: {shards}, batch_size: 4, num_workers: 2, shuffle_buffer: 16}}
"""


@pytest.mark.timeout(600)
def test_sigkill_during_an_online_shard_run_then_resume_equals_an_uninterrupted_run(tmp_path):
    """The same on streamed image shards (2 loader workers, mid-epoch kills): the resumed run replays the
    rest of the interrupted epoch in its original order, so the export is again bit-identical."""
    shards = make_shards(tmp_path / "data", per_class=8, max_count=8)  # 72 images, 9 shards, 8 batches/epoch
    config = tmp_path / "online.yaml"
    config.write_text(ONLINE_FIT.format(shards=shards))
    args = ["fit", "--config", str(config), "--checkpoint_every_n_steps", "3"]
    assert _train(*args, "--run_dir", str(tmp_path / "whole")).wait(300) == 0
    run = tmp_path / "killed"
    kills = _kill_repeatedly(args, run, 2, random.Random(1), max_delay=1.0)
    assert _train(*args, "--run_dir", str(run), "--ckpt_path", "last").wait(300) == 0
    identical = _same_exports(tmp_path / "whole" / "adapter", run / "adapter")
    print(f"\n[reliability] online shard run: SIGKILLed {kills} of 2; resumed export identical: {identical}")
    assert kills >= 1 and identical


DIE_HALFWAY = r"""
import os, sys
import fsspec.implementations.local as local
import safetensors.torch as st
target = sys.argv[1]
if target == "checkpoint":
    calls = {"n": 0}
    def write(self, data):
        if isinstance(data, (bytes, bytearray)) and data[:2] == b"PK":  # a torch checkpoint
            calls["n"] += 1
            if calls["n"] == int(sys.argv[2]):       # the Nth checkpoint write: die half-way, no cleanup
                self.f.write(data[: len(data) // 2]); self.f.flush(); os._exit(137)
        return self.f.write(data)
    local.LocalFileOpener.write = write
else:
    original = st.save_file
    def save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)                       # a partial write into the export's temp file
        os._exit(137)
    st.save_file = save_file
    import adapters.base as base
    base.save_file = save_file
from clip_adapters import train
sys.exit(train.main(sys.argv[3:]))
"""


def test_killed_while_writing_a_checkpoint_leaves_the_previous_one_usable(tmp_path):
    shared("clip-vit-b32-features/caltech101.safetensors")
    args = FIT + ["--run_dir", str(tmp_path), "--trainer.max_epochs", "2"]
    result = subprocess.run([sys.executable, "-c", DIE_HALFWAY, "checkpoint", "3", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 137  # died in the middle of the third checkpoint write
    for ckpt in (tmp_path / "checkpoints").glob("*.ckpt"):  # nothing under a real name is truncated
        torch.load(ckpt, weights_only=False, map_location="cpu")
    assert list((tmp_path / "checkpoints").glob("*.ckpt"))
    resumed = subprocess.run([sys.executable, "train.py", *args, "--ckpt_path", "last"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-1500:]


def test_killed_while_exporting_keeps_the_previous_export(tmp_path):
    shared("clip-vit-b32-features/caltech101.safetensors")
    args = FIT + ["--run_dir", str(tmp_path), "--trainer.max_epochs", "1"]
    assert subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, timeout=300).returncode == 0
    before = load_file(str(tmp_path / "adapter" / WEIGHTS_NAME))
    result = subprocess.run([sys.executable, "-c", DIE_HALFWAY, "export", "0", *args, "--trainer.max_epochs", "2",
                             "--ckpt_path", "last"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 137
    after = load_file(str(tmp_path / "adapter" / WEIGHTS_NAME))  # still the complete previous export
    assert all(torch.equal(before[k], after[k]) for k in before)
    adapters.load_adapter(tmp_path / "adapter")


# -- corrupt data fuzz --------------------------------------------------------------------------------------
def _corrupt_feature_file(src: bytes, kind: str, rng: random.Random, path: Path) -> None:
    data = bytearray(src)
    if kind == "truncated":
        data = data[: rng.randrange(0, len(data))]
    elif kind == "bit_flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif kind == "empty":
        data = bytearray()
    elif kind == "not_safetensors":
        data = bytearray(rng.randbytes(rng.randint(1, 4096)))
    path.write_bytes(bytes(data))
    if kind == "nan":
        x = torch.randn(20, 8)
        x[rng.randrange(20), rng.randrange(8)] = float("nan")
        write_feature_file(path, {"train": (x, torch.arange(20) % 4), "test": (x, torch.arange(20) % 4)})
    elif kind == "float_labels":
        save_file({"train.features": torch.randn(20, 8), "train.labels": torch.rand(20)}, str(path))
    elif kind == "labels_out_of_range":
        write_feature_file(path, {"train": (torch.randn(20, 8), torch.arange(20))}, metadata={"num_classes": 4})


FEATURE_KINDS = ("truncated", "bit_flip", "empty", "not_safetensors", "nan", "float_labels", "labels_out_of_range")


def test_fuzz_feature_files(tmp_path):
    """100 corrupted feature files: each is a one-line error naming the file, or (bit flips that miss
    every byte a reader uses) reads back exactly as the original. The one residual case, counted apart:
    flips that destroy both the format marker and the checksum record make the file read as an
    unverified foreign file (like files from other tools)."""
    g = torch.Generator().manual_seed(0)
    clean = tmp_path / "clean.safetensors"
    write_feature_file(clean, {"train": (torch.randn(40, 8, generator=g), torch.arange(40) % 4),
                               "test": (torch.randn(12, 8, generator=g), torch.arange(12) % 4)})
    reference = {k: v.clone() for k, v in FeatureFile(clean)._tensors.items()}
    rng, outcomes = random.Random(1), {"error": 0, "unchanged": 0, "unverifiable": 0}
    for i in range(100):
        kind = FEATURE_KINDS[i % len(FEATURE_KINDS)]
        path = tmp_path / f"fuzz-{i}.safetensors"
        _corrupt_feature_file(clean.read_bytes(), kind, rng, path)
        try:
            ff = FeatureFile(path)
            ff.verify()
        except UserError as e:
            assert str(path) in str(e) and "\n" not in str(e)
            outcomes["error"] += 1
            continue
        assert kind == "bit_flip", kind  # every other corruption must be refused
        if all(k in ff._tensors and torch.equal(ff._tensors[k], v) for k, v in reference.items()):
            outcomes["unchanged"] += 1  # the flips hit bytes no reader uses
            continue
        assert "format" not in ff.metadata and "crc32" not in ff.metadata, "changed data passed its checksums"
        outcomes["unverifiable"] += 1
    print(f"\n[reliability] feature-file fuzz: 100 files -> {outcomes}")
    assert outcomes["error"] >= 85 and outcomes["unverifiable"] <= 2


def _corrupt_shard(path: Path, kind: str, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    if kind == "truncated":
        path.write_bytes(bytes(data[: rng.randrange(512, len(data))]))
    elif kind == "bit_flip":
        for _ in range(rng.randint(1, 16)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind in ("not_image", "wrong_member", "bad_label"):
        with tarfile.open(path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        victim = members[rng.randrange(len(members))][0].name.split(".")[0]
        with tarfile.open(path, "w") as tar:
            for m, payload in members:
                stem, ext = m.name.split(".", 1)
                if stem == victim:
                    if kind == "not_image" and ext == "jpg":
                        payload = rng.randbytes(300)
                    elif kind == "wrong_member" and ext == "jpg":
                        m.name = f"{stem}.bin"  # the image is not where a reader looks
                    elif kind == "bad_label" and ext == "cls":
                        payload = b"cat"
                m.size = len(payload)
                tar.addfile(m, io.BytesIO(payload))


SHARD_KINDS = ("truncated", "bit_flip", "empty", "not_image", "wrong_member", "bad_label")


@pytest.mark.timeout(600)
def test_fuzz_shards(tmp_path):
    """100 corrupted shards, streamed with verify_shards: with on_corrupt=skip the damage is skipped and
    counted and every sample read is an original one; with on_corrupt=raise it is a one-line error naming
    the shard. Never a hang (timeout), never a silently altered sample."""
    import shutil

    source = make_shards(tmp_path / "src", per_class=4, max_count=12)  # 36 samples in 3 shards
    originals = {}
    dm = ImageShardDataModule(str(source), batch_size=1, num_workers=0, predict_splits=["train"])
    dm.set_transforms(TRANSFORM, TRANSFORM)
    for batch in dm.predict_dataloader()[0]:
        originals[batch["key"][0]] = batch["image"][0]
    rng, outcomes = random.Random(2), {"skipped_and_counted": 0, "error_named_shard": 0}
    for i in range(100):
        kind = SHARD_KINDS[i % len(SHARD_KINDS)]
        work = tmp_path / f"fuzz-{i}"
        shutil.copytree(source, work)
        victim = work / f"train-00000{rng.randrange(3)}.tar"
        _corrupt_shard(victim, kind, rng)
        dm = ImageShardDataModule(str(work), batch_size=1, num_workers=0, predict_splits=["train"], verify_shards=True)
        dm.set_transforms(TRANSFORM, TRANSFORM)
        seen = [(b["key"][0], b["image"][0]) for b in dm.predict_dataloader()[0]]
        assert dm.corrupt_count >= 1, kind
        assert all(torch.equal(originals[k], x) for k, x in seen)
        outcomes["skipped_and_counted"] += 1
        strict = ImageShardDataModule(str(work), batch_size=1, num_workers=0, predict_splits=["train"],
                                      verify_shards=True, on_corrupt="raise")
        strict.set_transforms(TRANSFORM, TRANSFORM)
        with pytest.raises(UserError) as err:
            for _ in strict.predict_dataloader()[0]:
                pass
        assert victim.name in str(err.value) and "\n" not in str(err.value)
        outcomes["error_named_shard"] += 1
        shutil.rmtree(work)
    print(f"\n[reliability] shard fuzz: 100 shards -> {outcomes}")


# -- configuration errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--model", "adapters.nope.Missing"], "adapters.nope.Missing"),
    (["--model.init_args.inference_head", "knn"], "inference_head"),
    (["--run_dir", "README.md"], "run_dir: README.md exists and is not a directory"),
    (["--data.init_args.path", "missing.safetensors"], "missing.safetensors: no such feature file"),
])
def test_config_errors_are_one_line_and_exit_2(args, message):
    shared("clip-vit-b32-features/caltech101.safetensors")
    result = subprocess.run([sys.executable, "train.py", "fit", *DAC, "--data", "configs/data/caltech101.yaml",
                             "--run_dir", str(Path("/tmp") / f"reliability-run-{os.getpid()}"), *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if line.strip() and not line.startswith("Seed set")]
    assert len(lines) == 1 and message in lines[0], result.stderr[-800:]


def test_class_count_and_backbone_mismatches_are_one_line_exit_2(tmp_path):
    shared("clip-vit-b32-features/oxford_flowers.safetensors")
    assert subprocess.run([sys.executable, "train.py", "fit", *DAC, "--data", "configs/data/caltech101.yaml", "--run_dir",
                           str(tmp_path), "--trainer.fast_dev_run", "true"], cwd=ROOT, capture_output=True,
                          timeout=120).returncode == 0
    flowers = str(ROOT.parent / "shared/data/clip-vit-b32-features/oxford_flowers.safetensors")
    result = subprocess.run([sys.executable, "evaluate.py", "--features", flowers, "--adapter", str(tmp_path / "adapter"),
                             "--output", ""], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "100 classes" in result.stderr and "102 classes" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# -- DDP without hangs -------------------------------------------------------------------------------------
ONLINE_DAC = """
trainer: {{max_epochs: 2, accelerator: cpu, devices: 2, strategy: ddp}}
model:
  class_path: adapters.dac.DACAdapter
  init_args: {{backbone: tiny-clip, hidden_dim: 16}}
data:
  class_path: datamodules.images.ImageShardDataModule
  init_args: {{shards: {shards}, batch_size: 4, num_workers: {workers}}}
"""

@pytest.mark.timeout(300)
@pytest.mark.parametrize("case, message", [
    ("corrupt_rank", "stopping instead of hanging DDP"),
    ("too_few_shards", "readers need at least one shard each"),
])
def test_ddp_with_bad_shards_ends_with_a_clear_error(tmp_path, case, message):
    shards = make_shards(tmp_path / "data", per_class=4, max_count=18)  # 36 samples, 2 shards
    if case == "corrupt_rank":  # every image of one shard is garbage: that rank's reader runs dry
        with tarfile.open(shards / "train-000001.tar") as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(shards / "train-000001.tar", "w") as tar:
            for m, payload in members:
                payload = b"garbage" if m.name.endswith(".jpg") else payload
                m.size = len(payload)
                tar.addfile(m, io.BytesIO(payload))
        workers = "0"
    else:
        workers = "2"  # 2 shards < 2 workers x 2 ranks
    config = tmp_path / "online.yaml"
    config.write_text(ONLINE_DAC.format(shards=shards, workers=workers))
    start = time.monotonic()
    result = subprocess.run([sys.executable, "train.py", "fit", "--config", str(config), "--run_dir",
                             str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=240)
    elapsed = time.monotonic() - start
    print(f"\n[reliability] DDP {case}: exit {result.returncode} after {elapsed:.0f}s")
    assert result.returncode != 0 and message in result.stderr
