"""The contract every trained method keeps, one table row per method.

Adding a method adds a row here, and the method gets every test below: a ``fast_dev_run`` through
``train.py``, a crash and ``--ckpt_path last`` resume ending bit-identical to an uninterrupted run,
and an export that loads back by its method name with exactly its tensors (and never the backbone).
What a method computes is tested in its own file (``tests/test_dac.py``, ``tests/test_coder.py``, ...).
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file

import adapters
from adapters.base import ADAPTERS, WEIGHTS_NAME
from adapters.loading import register_builtin_methods
from tests.conftest import CODER_DEMO, DAC_DEMO, IMO_DEMO, TIP_F_DEMO, train_cli


@dataclass(frozen=True)
class Row:
    method: str
    config: tuple[str, ...]
    data: str  # the fixture whose output the data arguments use
    args: tuple[str, ...] = ()
    #: optimiser steps per epoch with the data arguments below, and a crash step in the second epoch
    steps_per_epoch: int = 5
    crash_step: int = 7
    #: the row's test id when a method has several rows (recipes)
    label: str = ""


def _data_args(row: Row, request) -> list:
    if row.data == "extracted":
        _, features, weights = request.getfixturevalue("extracted")
        return ["--data", "configs/data/demo.yaml", "--data.init_args.path", features, "--data.init_args.shots", "4",
                "--data.init_args.batch_size", "8", "--model.init_args.pretrained", weights]
    shards = request.getfixturevalue("openimages_shards")
    return ["--data", "configs/data/openimages.yaml", "--data.init_args.shards", shards,
            "--data.init_args.num_workers", "0", "--data.init_args.global_batch_size", "4"]


METHODS = [
    Row("dac", DAC_DEMO, "extracted", ("--model.init_args.feature_noise", "0.05", "--model.init_args.dropout", "0.1")),
    # the ensemble recipe (configs/dac/ensemble.yaml) on the demo backbone: members, the head per member,
    # and the best epoch on val kept in checkpoints (a resumed run chooses among every epoch)
    Row("dac", DAC_DEMO, "extracted", ("--model.init_args.members", "2", "--model.init_args.with_original", "true",
                                       "--model.init_args.inference_head", "gda", "--model.init_args.search_each_epoch",
                                       "true", "--trainer.callbacks+=callbacks.best_on_val.BestEpochOnVal"),
        label="dac-ensemble"),
    Row("coder_adapter", CODER_DEMO, "extracted"),
    Row("tip_adapter_f", TIP_F_DEMO, "extracted"),
    Row("imo", IMO_DEMO, "openimages_shards", steps_per_epoch=6, crash_step=8),
]
ROWS = pytest.mark.parametrize("row", METHODS, ids=[r.label or r.method for r in METHODS])


def _fit(row, request, run_dir, *extra) -> int:
    return train_cli("fit", *row.config, *_data_args(row, request), *row.args, *extra, run_dir=run_dir)


def _tensors_equal(a, b) -> bool:
    x, y = load_file(str(a / WEIGHTS_NAME)), load_file(str(b / WEIGHTS_NAME))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_every_builtin_method_has_a_row():
    register_builtin_methods()
    assert {r.method for r in METHODS} == set(ADAPTERS)


@ROWS
def test_fast_dev_run(row, request, tmp_path):
    assert _fit(row, request, tmp_path, "--trainer.fast_dev_run", "true") == 0
    assert (tmp_path / "adapter" / WEIGHTS_NAME).is_file()


@ROWS
@pytest.mark.parametrize("where", ["mid-epoch", "epoch-end"])
def test_crash_and_resume_ends_with_the_same_export(row, where, request, tmp_path):
    """Crash at a step of the second epoch and resume with --ckpt_path last: the export equals an
    uninterrupted run's, bit for bit (CPU). The last checkpoint is mid-epoch, or on an epoch's last
    batch, where validation and a new loader run before the next step."""
    every = 3 if where == "mid-epoch" else row.steps_per_epoch
    args = ("--trainer.max_epochs", "3", "--checkpoint_every_n_steps", str(every))
    assert _fit(row, request, tmp_path / "whole", *args, "--ckpt_path", "last") == 0  # nothing to resume: fresh
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(row, request, tmp_path / "crashed", *args, "--trainer.callbacks+=tests.helpers.CrashAtStep",
             "--trainer.callbacks.step", str(row.crash_step))
    assert (tmp_path / "crashed" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "crashed" / "adapter").exists()  # an interrupted fit exports nothing
    assert _fit(row, request, tmp_path / "crashed", *args, "--ckpt_path", "last") == 0
    assert _tensors_equal(tmp_path / "whole" / "adapter", tmp_path / "crashed" / "adapter")


@ROWS
def test_export_loads_back_by_name_with_exactly_its_tensors(row, request, tmp_path):
    assert _fit(row, request, tmp_path, "--trainer.max_epochs", "1") == 0
    exported = load_file(str(tmp_path / "adapter" / WEIGHTS_NAME))
    assert exported and not any(k.startswith(("backbone.", "val_metrics.", "test_metrics.")) for k in exported)
    loaded = adapters.load_adapter(tmp_path / "adapter")
    assert type(loaded) is ADAPTERS[row.method] and loaded.method == row.method and not loaded.training
    state = loaded.state_dict()
    assert state.keys() == exported.keys() and all(torch.equal(state[k], v) for k, v in exported.items())
    again = adapters.load_adapter(tmp_path / "adapter")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in state.items())
