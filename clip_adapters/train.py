"""Train, validate, test adapters and extract features (LightningCLI).

Examples::

    python train.py fit --config configs/dac/caltech101.yaml --run_dir runs/dac-caltech
    python train.py fit --config configs/dac/caltech101.yaml --run_dir runs/dac-caltech --ckpt_path last  # resume
    python train.py test --config configs/dac/caltech101.yaml --run_dir runs/dac-caltech --ckpt_path last
    python train.py predict --config configs/extract.yaml --run_dir runs/extract-cifar10   # feature extraction
    python train.py fit --config configs/dac/caltech101.yaml --print_config

Everything of a run lives in ``--run_dir``: ``config.yaml``, ``checkpoints/last.ckpt`` and the
step-interval checkpoints, CSV and TensorBoard logs (``logs/``), the exported adapter (``adapter/``)
and, for ``predict``, the extracted features (``features/``). ``--ckpt_path last`` resumes from the
newest ``last.ckpt`` of the run directory and starts fresh (with a warning) when there is none, so a
requeued cluster job can always pass it. The model and data are chosen by class path in the YAML
(``model: {class_path: adapters.dac.DACAdapter, init_args: ...}``); the number of classes, class
names, feature dimension and dataset name are linked from the data to the model.

Exit status 2 with a one-line message for bad configuration or input.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path

from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from adapters.atomic import atomic_write_text
from adapters.base import BackboneModule
from adapters.errors import ConfigError, UserError
from adapters.loading import register_builtin_methods
from callbacks.export import AdapterExport
from callbacks.progress_log import ProgressLog


class RunDirConfig(SaveConfigCallback):
    """Save the resolved config as ``config.yaml`` in the command's output directory (`output_dir`)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved or not trainer.is_global_zero:
            return
        out = output_dir(Path(self.config["run_dir"]), stage)
        out.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, out / self.config_filename, skip_none=False, overwrite=True,
                         multifile=False)
        self.already_saved = True


#: How errors name this command: ``train.py`` from a checkout, ``clip-adapters-train`` installed.
PROG = Path(sys.argv[0]).name if sys.argv and sys.argv[0] and not sys.argv[0].startswith("-") else "train.py"

_OUTPUT_DIRS: dict[tuple[str, str], Path] = {}


def output_dir(run_dir: Path, subcommand: str | None) -> Path:
    """Where a command writes its config, logs and results: the run directory itself for ``fit``; for
    ``validate``/``test``/``predict`` a new ``<subcommand>``, ``<subcommand>-2``, ... beside fit's files, so
    that no later command touches what fit wrote. Chosen once per process."""
    if subcommand in (None, "fit"):
        return run_dir
    key = (str(run_dir), subcommand)
    if key not in _OUTPUT_DIRS:
        n, candidate = 1, run_dir / subcommand
        while candidate.exists():
            n += 1
            candidate = run_dir / f"{subcommand}-{n}"
        _OUTPUT_DIRS[key] = candidate
    return _OUTPUT_DIRS[key]


class AdapterCLI(LightningCLI):
    """LightningCLI with a fixed run directory and the data -> model links."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_dir", type=str, default="runs/default",
                            help="directory of this run: config, checkpoints, logs, export, features")
        parser.add_argument("--checkpoint_every_n_steps", type=int, default=100,
                            help="also checkpoint every this many training steps (0: only at epoch ends)")
        for source, target in [("data.num_classes", "model.init_args.num_classes"),
                               ("data.class_names", "model.init_args.class_names"),
                               ("data.dim", "model.init_args.embed_dim"),
                               ("data.dataset_name", "model.init_args.dataset")]:
            parser.link_arguments(source, target, apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        check_run_dir(Path(self._get(self.config, "run_dir")))

    def _evaluate_and_save(self, stage: str, **kwargs) -> list[dict]:
        results = getattr(self.trainer, stage)(**kwargs)
        if self.trainer.is_global_zero:
            out = output_dir(Path(self._get(self.config, "run_dir")), self.subcommand)
            metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
            atomic_write_text(out / "metrics.json", json.dumps({"stage": stage, "ckpt_path": kwargs.get("ckpt_path"),
                                                                "metrics": metrics}, indent=2, sort_keys=True))
        return results

    def validate(self, **kwargs):
        return self._evaluate_and_save("validate", **kwargs)

    def test(self, **kwargs):
        return self._evaluate_and_save("test", **kwargs)

    def instantiate_trainer(self, **kwargs):
        run_dir = Path(self._get(self.config, "run_dir"))
        out = output_dir(run_dir, self.subcommand)
        every = self._get(self.config, "checkpoint_every_n_steps") or None
        interactive = sys.stdout.isatty()  # rich progress on a terminal; plain log lines in cluster logs
        callbacks = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        callbacks.append(ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step-{step:07d}", save_last=True,
                                         save_top_k=-1, every_n_train_steps=every, auto_insert_metric_name=False))
        if not interactive:
            callbacks.append(ProgressLog())
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        configured = config.get("callbacks") or []
        if self.subcommand == "fit":
            callbacks.append(AdapterExport(run_dir / "adapter"))
        if self.subcommand == "predict":
            from callbacks.feature_writer import FeatureWriter

            if not any(isinstance(c, FeatureWriter) for c in configured):
                callbacks.append(FeatureWriter(run_dir / "features"))
        config["default_root_dir"] = str(out)
        config["enable_progress_bar"] = interactive and config.get("enable_progress_bar", True) is not False
        if config.get("logger") in (None, True):
            config["logger"] = [CSVLogger(out, name="logs", version="csv"),
                                TensorBoardLogger(out, name="logs", version="tensorboard", default_hp_metric=False)]
        config["callbacks"] = list(configured)
        return self._instantiate_trainer(config, callbacks)


# Known and harmless here: our loaders set an exact length on purpose, prediction on an iterable loader
# has no batch indices to report, and a deprecation inside Lightning itself.
_QUIET = (r"\.with_length\(\) only sets", r"Couldn't infer the batch indices", r".*LeafSpec.* is deprecated")


def main(args: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for pattern in _QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    register_builtin_methods()
    try:
        AdapterCLI(BackboneModule, subclass_mode_model=True, subclass_mode_data=True,
                   save_config_callback=RunDirConfig, seed_everything_default=0, args=args,
                   parser_kwargs={"default_env": True, "exit_on_error": False})
    except ArgumentError as e:  # a bad option or config value: one line, like every other input error
        print(f"{PROG}: error: {_one_line(str(e))} (see --help)", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - jsonargparse wraps errors raised while instantiating classes
        user_error = _user_error(e)
        if user_error is None:
            raise
        print(f"{PROG}: error: {user_error}", file=sys.stderr)
        return 2
    return 0


def _one_line(message: str, limit: int = 400) -> str:
    text = " ".join(message.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_run_dir(run_dir: Path) -> None:
    """The run directory must be (or become) a writable directory: fail before any work is done."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir: {run_dir} exists and is not a directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run_dir: cannot write to {run_dir} ({e.strerror})") from None


def _user_error(exc: BaseException | None) -> UserError | None:
    """The `UserError` behind ``exc``, following the cause/context chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
