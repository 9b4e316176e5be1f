"""Runs you can trust on a shared cluster: run directories, preemption, permissions, offline weights,
one-line errors, shard-writing edge cases (issue 13). RELIABILITY.md quotes the printed figures
(``pytest tests/test_cluster_runs.py -s``)."""
from __future__ import annotations

import csv
import hashlib
import io
import json
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
from safetensors.torch import load_file

from adapters.base import WEIGHTS_NAME
from tests.conftest import DAC, ROOT, run_script, shared, tiny_checkpoint
from tests.helpers import make_shards

FIT = ["fit", *DAC, "--data", "configs/data/caltech101.yaml", "--trainer.log_every_n_steps", "1",
       "--model.init_args.feature_noise", "0.05", "--model.init_args.dropout", "0.1"]


def _start(args, **kw) -> subprocess.Popen:
    """``train.py`` in a child process whose output nobody reads (a full pipe would block it)."""
    return subprocess.Popen([sys.executable, "train.py", *[str(a) for a in args]], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, **kw)


def _wait_for(predicate, proc, limit=120.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)


def _train_loss_steps(run: Path) -> list[int]:
    with open(run / "logs" / "csv" / "metrics.csv", newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]


def _val_epochs(run: Path) -> list[int]:
    with open(run / "logs" / "csv" / "metrics.csv", newline="") as f:
        return [int(r["epoch"]) for r in csv.DictReader(f) if r.get("val/acc1")]


def _tensorboard_steps(run: Path, tag: str = "train/loss") -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "logs" / "tensorboard"))  # purges steps a resumed run logged again
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


def _same_exports(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / WEIGHTS_NAME)), load_file(str(b / WEIGHTS_NAME))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _digest(paths) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.is_file()}


# -- 1. a run directory keeps its history ----------------------------------------------------------------
@pytest.mark.timeout(600)
def test_history_is_unbroken_across_kill_and_resume_and_later_commands_touch_nothing(tmp_path):
    shared("clip-vit-b32-features/caltech101.safetensors")
    args = [*FIT, "--trainer.max_epochs", "8", "--checkpoint_every_n_steps", "5"]
    run = tmp_path / "run"
    proc = _start([*args, "--run_dir", run])
    _wait_for(lambda: len(list((run / "checkpoints").glob("step-*.ckpt"))) >= 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    assert run_script("train.py", *args, "--run_dir", run, "--ckpt_path", "last").returncode == 0
    steps = _train_loss_steps(run)
    assert steps == list(range(56)), steps  # 8 epochs x 7 steps: every step once, from 0, no gap
    tb = _tensorboard_steps(run)
    assert sorted(set(tb)) == list(range(56)) and len(tb) == 56
    assert (run / "config.yaml").is_file() and (run / "config-resume-1.yaml").is_file()
    fit_files = _digest([*run.glob("*.yaml"), *(run / "logs").rglob("*"), *(run / "adapter").glob("*"),
                         *(run / "checkpoints").glob("*")])
    # later commands: test, a second fit without resume (refused), a fit failing on a bad option
    assert run_script("train.py", "test", *DAC, "--data", "configs/data/caltech101.yaml", "--run_dir", run,
                      "--ckpt_path", "last").returncode == 0
    again = run_script("train.py", *args, "--run_dir", run)
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert len([line for line in again.stderr.splitlines() if line.strip() and "Seed set" not in line]) == 1
    bad = run_script("train.py", *args, "--run_dir", run, "--ckpt_path", "last", "--model.init_args.nope", "1")
    assert bad.returncode == 2
    assert _digest(fit_files and [Path(p) for p in fit_files]) == fit_files  # nothing of fit's touched
    assert json.loads((run / "test" / "metrics.json").read_text())["metrics"]["test/acc1"] > 0.5
    assert (run / "test" / "config.yaml").is_file()


def test_overwrite_moves_the_previous_run_aside(tmp_path):
    shared("clip-vit-b32-features/caltech101.safetensors")
    args = [*FIT, "--trainer.fast_dev_run", "true", "--run_dir", tmp_path]
    assert run_script("train.py", *args).returncode == 0
    first = (tmp_path / "adapter" / WEIGHTS_NAME).read_bytes()
    assert run_script("train.py", *args, "--overwrite", "true").returncode == 0
    (aside,) = tmp_path.glob("replaced-*")
    assert (aside / "adapter" / WEIGHTS_NAME).read_bytes() == first  # the previous run, whole, kept
    assert (tmp_path / "adapter" / WEIGHTS_NAME).is_file() and not list((tmp_path / "checkpoints").glob("last-v*"))


# -- 2. preemption ---------------------------------------------------------------------------------------
ONLINE = """
trainer: {{max_epochs: 5, accelerator: cpu, devices: 1, log_every_n_steps: 1}}
model:
  class_path: adapters.dac.DACAdapter
  init_args: {{backbone: tiny-clip, pretrained: {weights}, hidden_dim: 16, feature_noise: 0.05, dropout: 0.1}}
data:
  class_path: datamodules.images.ImageShardDataModule
  init_args: {{shards: {shards}, batch_size: 4, num_workers: 2, shuffle_buffer: 16}}
"""


@pytest.fixture(scope="module")
def online_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("online")
    shards = make_shards(root / "data", per_class=8, max_count=8)  # 72 images in 9 shards
    config = root / "online.yaml"
    config.write_text(ONLINE.format(shards=shards, weights=tiny_checkpoint(root / "tiny.pt")))
    return config


@pytest.mark.timeout(600)
@pytest.mark.parametrize("data, sig, in_validation", [("cached", signal.SIGTERM, False), ("cached", signal.SIGINT, True),
                                                       ("shards", signal.SIGTERM, False)],
                         ids=["cached-SIGTERM", "cached-SIGINT-in-validation", "shards-SIGTERM"])
def test_a_signal_saves_the_current_step_and_resume_is_exact(data, sig, in_validation, tmp_path, request):
    """The process receives SIGTERM (or SIGINT) at a random step (seeded; sent through the OS by the run
    itself, so the step is known), stops at the end of that batch with status 143 and the checkpoint of
    that step; ``--ckpt_path last`` then ends with the uninterrupted run's export and an unbroken history.
    A signal during validation lets the validation finish: the checkpoint is at the next step, and no
    epoch's validation row is missing."""
    if data == "cached":
        shared("clip-vit-b32-features/caltech101.safetensors")
        args, per_epoch, epochs = [*FIT, "--trainer.max_epochs", "12", "--checkpoint_every_n_steps", "50"], 7, 12
    else:
        args = ["fit", "--config", request.getfixturevalue("online_config"), "--checkpoint_every_n_steps", "50"]
        per_epoch, epochs = 16, 5  # 8 batches per worker and epoch, 2 workers
    assert run_script("train.py", *args, "--run_dir", tmp_path / "whole").returncode == 0
    run = tmp_path / "stopped"
    step = random.Random(f"{data}-{sig}").randrange(3, per_epoch * epochs - 2)
    stopped = run_script("train.py", *args, "--run_dir", run, "--trainer.callbacks+=tests.helpers.SignalAtStep",
                         "--trainer.callbacks.step", step, "--trainer.callbacks.signum", int(sig),
                         "--trainer.callbacks.in_validation", str(in_validation).lower())
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    print(f"\n[reliability] {data} {signal.Signals(sig).name} at step {step}: exit {stopped.returncode}, checkpoint at "
          f"step {ckpt['global_step']} of {per_epoch * epochs} (periodic every 50)")
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    epoch_end = -(-step // per_epoch) * per_epoch  # a validation runs after an epoch's last step
    # that step, not a periodic one (a signal during a validation: the next step, after that validation)
    assert ckpt["global_step"] == (epoch_end + 1 if in_validation else step)
    assert not (run / "adapter").exists()
    assert run_script("train.py", *args, "--run_dir", run, "--ckpt_path", "last").returncode == 0
    identical = _same_exports(tmp_path / "whole" / "adapter", run / "adapter")
    steps = _train_loss_steps(run)
    print(f"[reliability] {data} {signal.Signals(sig).name}: export identical {identical}, "
          f"metrics rows {len(steps)} (steps 0..{per_epoch * epochs - 1} once each: {steps == list(range(per_epoch * epochs))})")
    assert identical and steps == list(range(per_epoch * epochs))
    assert _val_epochs(run) == _val_epochs(tmp_path / "whole")  # every validation once, none lost


@pytest.mark.timeout(300)
def test_a_signal_to_one_ddp_rank_stops_every_rank_at_one_step(tmp_path):
    """Under DDP the ranks agree at every step end whether any of them was signalled, so a signal that
    reaches one rank only (here rank 1; SLURM signals every task at slightly different moments) stops all
    of them after the same batch: no hang, exit 143, and the resumed run ends with the export of an
    uninterrupted 2-rank run. (With Lightning's own handler this hung.)"""
    shared("clip-vit-b32-features/caltech101.safetensors")
    args = [*FIT, "--trainer.max_epochs", "3", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
            "--trainer.strategy", "ddp"]
    whole = run_script("train.py", *args, "--run_dir", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    run = tmp_path / "stopped"
    stopped = run_script("train.py", *args, "--run_dir", run, "--trainer.callbacks+=tests.helpers.SignalAtStep",
                         "--trainer.callbacks.step", "5", "--trainer.callbacks.rank", "1", timeout=120)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    print(f"\n[reliability] DDP, SIGTERM to rank 1 at step 5: exit {stopped.returncode}, checkpoint at step "
          f"{ckpt['global_step']}")
    assert stopped.returncode == 143 and ckpt["global_step"] == 5, stopped.stderr[-2000:]
    assert run_script("train.py", *args, "--run_dir", run, "--ckpt_path", "last").returncode == 0
    assert _same_exports(tmp_path / "whole" / "adapter", run / "adapter")
    assert _train_loss_steps(run) == _train_loss_steps(tmp_path / "whole")


def test_sigterm_under_slurm_requeues_the_job(tmp_path):
    shared("clip-vit-b32-features/caltech101.safetensors")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'scontrol.args'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    run = tmp_path / "run"
    proc = _start([*FIT, "--trainer.max_epochs", "60", "--run_dir", run], env=env)
    _wait_for(lambda: (run / "logs" / "csv").is_dir(), proc)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 143
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]


# -- 3. permissions ----------------------------------------------------------------------------------------
@pytest.mark.timeout(600)
def test_outputs_are_readable_by_colleagues_under_umask_022(tmp_path, extracted):
    shards_src = shared("cifar10-test-jpg")
    script = f"""
import os, sys
os.umask(0o022)
sys.argv = ["train.py"]
from datamodules import shards
from clip_adapters import evaluate, train
assert shards.main(["folder", "{shards_src}", "--out", "{tmp_path}/shards", "--max_count", "50",
                    "--fractions", "train=0.5,val=0.2,test=0.3", "--dataset", "cifar10"]) == 0
assert train.main(["predict", "--config", "configs/extract.yaml", "--run_dir", "{tmp_path}/extract",
                   "--data.init_args.shards", "{tmp_path}/shards", "--data.init_args.num_workers", "0",
                   "--data.init_args.predict_splits", "[train,val,test]"]) == 0
assert train.main(["fit", "--config", "configs/dac/demo.yaml", "--data", "configs/data/demo.yaml",
                   "--data.init_args.path", "{tmp_path}/extract/features", "--data.init_args.shots", "4",
                   "--trainer.max_epochs", "2", "--run_dir", "{tmp_path}/fit"]) == 0
assert evaluate.main(["--features", "{tmp_path}/extract/features", "--shots", "2", "--heads", "prototype",
                      "--output", "{tmp_path}/eval_results.json"]) == 0
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    dirs = [p for p in tmp_path.rglob("*") if p.is_dir()]
    wrong = [f"{p.relative_to(tmp_path)} {oct(p.stat().st_mode & 0o777)}" for p in files if p.stat().st_mode & 0o777 != 0o644]
    wrong += [f"{p.relative_to(tmp_path)}/ {oct(p.stat().st_mode & 0o777)}" for p in dirs if p.stat().st_mode & 0o777 != 0o755]
    assert not wrong, wrong
    kinds = {p.suffix for p in files}
    assert {".tar", ".json", ".safetensors", ".ckpt", ".csv", ".yaml"} <= kinds  # shards, features, export, logs ...


def test_an_export_replaces_the_previous_one_as_a_whole(tmp_path):
    from adapters.atomic import atomic_directory

    target = tmp_path / "adapter"
    for version in ("1", "2"):
        with atomic_directory(target) as tmp:
            (tmp / "adapter_config.json").write_text(version)
            (tmp / "adapter_model.safetensors").write_text(version * 3)
            assert not target.exists() or (target / "adapter_config.json").read_text() != version  # not yet visible
    assert (target / "adapter_config.json").read_text() == "2" and (target / "adapter_model.safetensors").read_text() == "222"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary left


# -- 4. weights that cannot be had, hub names, local files ------------------------------------------------
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.mark.timeout(300)
def test_unavailable_weights_fail_fast_in_one_line(tmp_path, extracted):
    shards = extracted[0]
    commands = [  # the tour's shards; on one device, and under DDP on two (every rank fails, one prints)
        ["predict", "--config", "configs/extract.yaml", "--run_dir", tmp_path / "x", "--data.init_args.shards", shards,
         "--model.init_args.backbone", "ViT-B-32", "--model.init_args.pretrained", "openai", "--trainer.devices", "1"],
        ["fit", "--config", "configs/imo/default.yaml", "--data", "configs/data/openimages.yaml", "--run_dir",
         tmp_path / "imo", "--data.init_args.shards", shards, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
         "--trainer.strategy", "ddp"],
    ]
    for args in commands:
        devices = args[args.index("--trainer.devices") + 1]
        start = time.monotonic()
        result = subprocess.run([sys.executable, "train.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                                timeout=120, env=OFFLINE)
        seconds = time.monotonic() - start
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        print(f"\n[reliability] offline {args[0]} on {devices} device(s): exit {result.returncode} in {seconds:.1f} s, "
              f"{len(lines)} stderr lines")
        assert result.returncode == 2 and seconds < 10, result.stderr[-2000:]
        assert len(lines) <= 3 and any("ViT-B-" in line and "pretrained" in line for line in lines), lines
        assert any("pretrained: /path/to/file.pt" in line for line in lines)


def _fake_hub_cache(cache: Path, repo: str, weights: Path) -> None:
    """A Hugging Face cache holding an open_clip model repo: config and weights (what a download leaves)."""
    from safetensors.torch import save_file

    from adapters.backbone import MODEL_CONFIG_DIR

    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0123abcd")
    model_cfg = json.loads((MODEL_CONFIG_DIR / "tiny-clip.json").read_text())
    (snapshot / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    save_file(torch.load(weights), str(snapshot / "open_clip_model.safetensors"))


def test_hub_names_cache_dir_and_local_checkpoints_load_without_network(tmp_path, monkeypatch):
    from adapters.backbone import FrozenCLIP, embed_dim_of

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights = tiny_checkpoint(tmp_path / "tiny.pt", seed=3)
    _fake_hub_cache(tmp_path / "hub", "lab/tiny-clip", weights)
    expected = torch.load(weights)
    local = FrozenCLIP("tiny-clip", str(weights))  # a local checkpoint file
    hub = FrozenCLIP("hf-hub:lab/tiny-clip", None, cache_dir=str(tmp_path / "hub"))  # open_clip's hub name, cached
    for model in (local, hub):
        state = model.model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in expected.items())
    assert embed_dim_of("hf-hub:lab/tiny-clip", str(tmp_path / "hub")) == 32
    from adapters.errors import ConfigError
    with pytest.raises(ConfigError, match="hf-hub:lab/other.*cache_dir"):
        FrozenCLIP("hf-hub:lab/other", None, cache_dir=str(tmp_path / "hub"))


# -- 5. the remaining tracebacks ---------------------------------------------------------------------------
def test_predict_with_a_fit_config_and_a_missing_logger_package_are_one_line(tmp_path):
    shared("clip-vit-b32-features/caltech101.safetensors")
    predict = run_script("train.py", "predict", *DAC, "--data", "configs/data/caltech101.yaml", "--run_dir", tmp_path / "p")
    assert predict.returncode == 2 and "extracts features from images" in predict.stderr
    no_data = run_script("train.py", "fit", "--config", "configs/imo/demo.yaml", "--run_dir", tmp_path / "n")
    assert no_data.returncode == 2 and "data: fit needs a data module: --data configs/data/" in no_data.stderr
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    logger = run_script("train.py", *FIT, "--run_dir", tmp_path / "w", "--trainer.logger",
                        "lightning.pytorch.loggers.WandbLogger", "--trainer.fast_dev_run", "true")
    lines = [line for line in logger.stderr.splitlines() if line.strip() and "Seed set" not in line]
    assert logger.returncode == 2 and len(lines) == 1 and "wandb" in lines[0], logger.stderr[-1500:]
    for result in (predict, no_data, logger):
        assert "Traceback" not in result.stderr and "JsonargparseDeprecationWarning" not in result.stderr


# -- 6, 7. shard writing and reading ------------------------------------------------------------------------
def test_hidden_entries_empty_classes_fractions_and_skipped_files(tmp_path):
    from PIL import Image

    from datamodules import shards

    src = tmp_path / "images"
    for c in ("cat", "dog"):
        (src / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(src / c / f"{i}.jpg")
    (src / ".ipynb_checkpoints").mkdir()
    (src / ".DS_Store").write_text("")
    (src / "cat" / ".DS_Store").write_text("")
    (src / "dog" / "notes.txt").write_text("not an image")
    (src / "empty").mkdir()
    args = ["folder", str(src), "--max_count", "4", "--fractions", "train=0.5,test=0.5"]
    assert shards.main([*args, "--out", str(tmp_path / "refused")]) == 2  # an empty class: one-line error
    assert shards.main([*args, "--out", str(tmp_path / "out"), "--skip_empty_classes"]) == 0
    manifest = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert manifest["class_names"] == ["cat", "dog"]  # no hidden or empty class
    assert manifest["skipped"] == {"non_image_files": 1, "hidden_entries": 1, "empty_classes": ["empty"]}
    assert {s: e["count"] for s, e in manifest["splits"].items()} == {"train": 4, "test": 4}
    # --fractions is honoured for a CSV without a split column, refused where the source assigns splits
    rows = ["path,label"] + [f"cat/{i}.jpg,cat" for i in range(4)] + [f"dog/{i}.jpg,dog" for i in range(4)]
    (src / "list.csv").write_text("\n".join(rows) + "\n")
    assert shards.main(["csv", str(src / "list.csv"), "--out", str(tmp_path / "csv"), "--fractions",
                        "train=0.75,val=0.25"]) == 0
    csv_manifest = json.loads((tmp_path / "csv" / "dataset.json").read_text())
    assert {s: e["count"] for s, e in csv_manifest["splits"].items()} == {"train": 6, "val": 2}
    (src / "split.csv").write_text("path,label,split\ncat/0.jpg,cat,train\ndog/0.jpg,dog,test\n")
    assert shards.main(["csv", str(src / "split.csv"), "--out", str(tmp_path / "x"), "--fractions", "train=1"]) == 2


def test_member_names_split_like_webdataset(tmp_path):
    import webdataset as wds

    from datamodules.shards import iter_tar_samples

    path = tmp_path / "other-tool.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("a.b/img_1.seg.png", b"x"), ("a.b/img_1.cls", b"3"), ("a.b/img_2.jpg", b"y")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ours = [sorted(s) for s in iter_tar_samples(path)]
    theirs = [sorted(k for k in s if not k.startswith("__") or k == "__key__")
              for s in wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples())]
    assert ours == theirs == [["__key__", "cls", "seg.png"], ["__key__", "jpg"]]
    keys = [s["__key__"] for s in iter_tar_samples(path)]
    assert keys == ["a.b/img_1", "a.b/img_2"]


# -- 8. small ones ------------------------------------------------------------------------------------------
def test_overlap_plots_never_land_in_the_current_directory(tmp_path, extracted):
    before = set(ROOT.glob("*.png"))
    result = run_script("evaluate.py", "--features", extracted[1], "--shots", "2", "--heads", "prototype", "--overlap",
                        "--output", "")
    assert result.returncode == 0 and set(ROOT.glob("*.png")) == before
    assert "JsonargparseDeprecationWarning" not in result.stderr
    out = tmp_path / "results" / "r.json"
    assert run_script("evaluate.py", "--features", extracted[1], "--shots", "2", "--heads", "prototype", "--overlap",
                      "--output", out).returncode == 0
    assert (out.parent / "overlap_features.png").is_file()


@pytest.mark.timeout(300)
def test_a_killed_extraction_resumes_from_the_shards_it_wrote(tmp_path):
    """predict over 9 shards, SIGKILLed at its 10th batch of 4 (9 batches stored: 4 shards whole), then run
    again: it embeds only the 5 missing shards and the feature file equals an uninterrupted extraction's, bit for bit."""
    from datamodules.feature_file import FeatureFile

    shards = make_shards(tmp_path, per_class=8, max_count=8)  # 72 images in 9 shards of 8
    weights = tiny_checkpoint(tmp_path / "tiny.pt")
    args = ["predict", "--config", "configs/extract.yaml", "--data.init_args.shards", shards, "--data.init_args.num_workers",
            "0", "--data.init_args.batch_size", "4", "--model.init_args.pretrained", weights]
    assert run_script("train.py", *args, "--run_dir", tmp_path / "whole").returncode == 0
    killed = run_script("train.py", *args, "--run_dir", tmp_path / "killed", "--trainer.callbacks+=tests.helpers.SignalAtStep",
                        "--trainer.callbacks.step", "10", "--trainer.callbacks.signum", "9")
    features = tmp_path / "killed" / "features"
    assert killed.returncode == -9 and not (features / "manifest.json").exists()
    assert len(list((features / "pieces" / "train").glob("*.safetensors"))) == 4
    other = run_script("train.py", *args, "--run_dir", tmp_path / "killed", "--data.init_args.views", "2")
    assert other.returncode == 2 and "other settings (views differ)" in other.stderr
    resumed = run_script("train.py", *args, "--run_dir", tmp_path / "killed")
    assert resumed.returncode == 0 and "4 of 9 shards already written" in resumed.stderr
    a, b = FeatureFile(tmp_path / "whole" / "features"), FeatureFile(features)
    assert a._tensors.keys() == b._tensors.keys()
    assert all(torch.equal(a._tensors[k], b._tensors[k]) for k in a._tensors)
    again = run_script("train.py", *args, "--run_dir", tmp_path / "killed")
    assert again.returncode == 2 and "already holds a complete extraction" in again.stderr
