"""Train, validate, test adapters and extract features (LightningCLI).

Examples::

    python train.py fit --config configs/dac/default.yaml --data configs/data/caltech101.yaml --run_dir runs/dac
    python train.py fit ... --run_dir runs/dac --ckpt_path last        # resume (or start, when there is nothing)
    python train.py test --config configs/dac/default.yaml --data configs/data/caltech101.yaml \\
        --run_dir runs/dac --ckpt_path last
    python train.py predict --config configs/extract.yaml --run_dir runs/extract-cifar10   # feature extraction
    python train.py fit --config configs/dac/default.yaml --data configs/data/caltech101.yaml --print_config

A run lives in ``--run_dir``, and nothing a later command does deletes or overwrites what is there:

* ``fit`` writes ``config.yaml``, ``checkpoints/`` (``last.ckpt`` and the step-interval ones), the
  logs (``logs/csv/metrics.csv``, ``logs/tensorboard``) and the export (``adapter/``). A second ``fit``
  into a directory that holds a run refuses, unless it resumes (``--ckpt_path last``: the metrics
  history continues unbroken, the resumed run's config goes to ``config-resume-<n>.yaml``) or
  ``--overwrite`` moves the previous run's files aside into ``replaced-<time>/``;
* ``validate``, ``test`` and ``predict`` write their config, logs and ``metrics.json`` into a new
  ``<subcommand>/`` (``<subcommand>-2/`` ...) folder beside fit's; ``predict`` writes the features to
  ``features/``.

SIGTERM (preemption) or Ctrl-C during ``fit`` saves ``last.ckpt`` at the current step and exits with
status 143; under SLURM the job is requeued. ``--ckpt_path last`` starts fresh (with a warning) when there
is nothing to resume, so a requeued job can always pass it. Model and data are chosen by class path
(``configs/<method>/*.yaml`` and ``--data configs/data/<dataset>.yaml``); the number of classes, class
names, feature dimension and dataset name are linked from the data to the model.

Exit status 2 with a one-line message for bad configuration or input (printed once, by rank 0).
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

# Lightning's CLI calls jsonargparse APIs that jsonargparse has deprecated: a warning on every run that
# the user can do nothing about.
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

import torch  # noqa: E402
from jsonargparse import ArgumentError  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from lightning.pytorch.utilities.exceptions import SIGTERMException  # noqa: E402
from lightning.pytorch.utilities.rank_zero import rank_zero_only  # noqa: E402

from adapters.atomic import atomic_write_text  # noqa: E402
from adapters.backbone import check_weights  # noqa: E402
from adapters.base import BackboneModule  # noqa: E402
from adapters.errors import ConfigError, UserError  # noqa: E402
from adapters.loading import register_builtin_methods  # noqa: E402
from callbacks.export import AdapterExport  # noqa: E402
from callbacks.history import FlushLogsOnCheckpoint, ResumableCSVLogger  # noqa: E402
from callbacks.preemption import PREEMPTED_EXIT, PreemptionCheckpoint  # noqa: E402
from callbacks.progress_log import ProgressLog  # noqa: E402

#: How errors name this command: ``train.py`` from a checkout, ``clip-adapters-train`` installed.
PROG = Path(sys.argv[0]).name if sys.argv and sys.argv[0] and not sys.argv[0].startswith("-") else "train.py"
#: What a run directory holds once ``fit`` has written to it.
RUN_FILES = ("config.yaml", "checkpoints", "logs", "adapter")

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


def _numbered(run_dir: Path, stem: str, suffix: str = "") -> Path:
    n = 1
    while (run_dir / f"{stem}-{n}{suffix}").exists():
        n += 1
    return run_dir / f"{stem}-{n}{suffix}"


class RunDirConfig(SaveConfigCallback):
    """Save the resolved config in the command's output directory (`output_dir`), never over another."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved or not trainer.is_global_zero:
            return
        out = output_dir(Path(self.config["run_dir"]), stage)
        out.mkdir(parents=True, exist_ok=True)
        self.parser.save(self.config, out / self.config_filename, skip_none=False, overwrite=False,
                         multifile=False)
        self.already_saved = True


class AdapterCLI(LightningCLI):
    """LightningCLI with a fixed run directory, the data -> model links, and the run-directory rules."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_dir", type=str, default="runs/default",
                            help="directory of this run: config, checkpoints, logs, export, features")
        parser.add_argument("--checkpoint_every_n_steps", type=int, default=100,
                            help="also checkpoint every this many training steps (0: only at epoch ends)")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="fit: start over in a run directory that holds a run (its files are moved "
                                 "aside into replaced-<time>/, nothing is deleted)")
        for source, target in [("data.num_classes", "model.init_args.num_classes"),
                               ("data.class_names", "model.init_args.class_names"),
                               ("data.dim", "model.init_args.embed_dim"),
                               ("data.dataset_name", "model.init_args.dataset")]:
            parser.link_arguments(source, target, apply_on="instantiate")

    # -- before anything is built -------------------------------------------------------------------
    def before_instantiate_classes(self) -> None:
        run_dir = Path(self._get(self.config, "run_dir"))
        check_run_dir(run_dir)
        if self._get(self.config, "data") is None:
            raise ConfigError(f"data: {self.subcommand} needs a data module: --data configs/data/<dataset>.yaml "
                              "(or a data: section in --config)")
        self._check_weights_early()
        self.resume_step = None
        if self.subcommand != "fit":
            return
        ckpt = self._resume_checkpoint(run_dir)
        holds_run = any((run_dir / name).exists() for name in RUN_FILES)
        if ckpt is not None:
            self.resume_step = int(torch.load(ckpt, map_location="cpu", weights_only=False).get("global_step", 0))
        elif holds_run and self._get(self.config, "ckpt_path") == "last":
            self.resume_step = 0  # a requeued run that died before its first checkpoint: it starts again
        elif holds_run and rank_zero_only.rank != 0:
            pass  # rank 0 decides (its files may already be there); a refusal there ends every rank's job
        elif holds_run:
            if not self._get(self.config, "overwrite"):
                raise ConfigError(f"run_dir: {run_dir} already holds a run; resume it with --ckpt_path last, or pass "
                                  "--overwrite to start over (its files are moved aside, not deleted)")
            if rank_zero_only.rank == 0:
                self._move_aside(run_dir)
        if self.resume_step is not None and (run_dir / "config.yaml").exists():
            self.save_config_kwargs["config_filename"] = _numbered(run_dir, "config-resume", ".yaml").name

    def _resume_checkpoint(self, run_dir: Path) -> Path | None:
        ckpt_path = self._get(self.config, "ckpt_path")
        if ckpt_path in (None, "best", "hpc", "registry"):
            return None
        path = run_dir / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
        return path if path.is_file() else None

    @staticmethod
    def _move_aside(run_dir: Path) -> None:
        aside = run_dir / time.strftime("replaced-%Y%m%d-%H%M%S")
        aside.mkdir()
        for child in list(run_dir.iterdir()):
            if child != aside and not child.name.startswith("replaced-"):
                child.rename(aside / child.name)
        logging.getLogger(__name__).warning("--overwrite: the previous run's files were moved to %s", aside)

    def _check_weights_early(self) -> None:
        """Backbone weights a command will need are checked before Lightning starts (a minute of download
        retries otherwise): feature extraction, or training on images, always builds the backbone."""
        data = self._get(self.config, "data")
        class_path = getattr(data, "class_path", None) if data is not None else None
        takes_images = False
        if class_path:
            module, _, name = class_path.rpartition(".")
            try:
                takes_images = bool(getattr(getattr(importlib.import_module(module), name), "takes_images", False))
            except (ImportError, AttributeError):
                return  # jsonargparse reports a bad class path itself
        if self.subcommand == "predict" and class_path and not takes_images:
            raise ConfigError(f"predict: extracts features from images, and {class_path} holds features already; use "
                              "--config configs/extract.yaml with image shards")
        if self.subcommand == "predict" or takes_images:
            model = self._get(self.config, "model").init_args
            check_weights(model.backbone, model.pretrained, getattr(model, "cache_dir", None))

    # -- subcommands that report metrics ------------------------------------------------------------
    def _evaluate_and_save(self, stage: str, **kwargs) -> list[dict]:
        results = getattr(self.trainer, stage)(**kwargs)
        if self.trainer.is_global_zero:
            out = output_dir(Path(self._get(self.config, "run_dir")), self.subcommand)
            metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items()
                       if getattr(v, "numel", lambda: 1)() == 1}
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
        callbacks.append(FlushLogsOnCheckpoint())
        if not interactive:
            callbacks.append(ProgressLog())
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        configured = config.get("callbacks") or []
        if self.subcommand == "fit":
            callbacks += [AdapterExport(run_dir / "adapter"), PreemptionCheckpoint(run_dir / "checkpoints" / "last.ckpt")]
        if self.subcommand == "predict":
            from callbacks.feature_writer import FeatureWriter

            if not any(isinstance(c, FeatureWriter) for c in configured):
                callbacks.append(FeatureWriter(run_dir / "features"))
        config["default_root_dir"] = str(out)
        config["enable_progress_bar"] = interactive and config.get("enable_progress_bar", True) is not False
        if config.get("logger") in (None, True):
            resume = getattr(self, "resume_step", None)
            config["logger"] = [ResumableCSVLogger(out, name="logs", version="csv", resume_step=resume),
                                TensorBoardLogger(out, name="logs", version="tensorboard", default_hp_metric=False,
                                                  **({"purge_step": resume} if resume else {}))]
        config["callbacks"] = list(configured)
        return self._instantiate_trainer(config, callbacks)


# Known and harmless here: our loaders set an exact length on purpose, prediction on an iterable loader
# has no batch indices to report, and a deprecation inside Lightning itself.
_QUIET = (r"\.with_length\(\) only sets", r"Couldn't infer the batch indices", r".*LeafSpec.* is deprecated")


def _no_advertising(record: logging.LogRecord) -> bool:
    """Lightning advertises a cloud logger on every run (an info line in every cluster log)."""
    return "[litlogger]" not in str(record.msg)


def main(args: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for pattern in _QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_no_advertising)
    register_builtin_methods()
    try:
        AdapterCLI(BackboneModule, subclass_mode_model=True, subclass_mode_data=True,
                   save_config_callback=RunDirConfig, seed_everything_default=0, args=args,
                   parser_kwargs={"default_env": True, "exit_on_error": False})
    except SIGTERMException:  # preempted or interrupted: the checkpoint was saved (callbacks.preemption)
        return PREEMPTED_EXIT
    except ArgumentError as e:  # a bad option or config value: one line, like every other input error
        return _fail(f"{_one_line(str(e))} (see --help)")
    except Exception as e:  # noqa: BLE001 - jsonargparse wraps errors raised while instantiating classes
        user_error = _user_error(e)
        if user_error is not None:
            return _fail(str(user_error))
        missing = _missing_package(e)
        if missing is not None:
            return _fail(missing)
        raise
    return 0


def _fail(message: str) -> int:
    """One line on stderr, from rank 0 only (every rank fails the same way), and exit status 2."""
    if rank_zero_only.rank == 0:
        print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


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


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        yield exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__


def _user_error(exc: BaseException | None) -> UserError | None:
    """The `UserError` behind ``exc``, following the cause/context chain."""
    return next((e for e in _chain(exc) if isinstance(e, UserError)), None)


def _missing_package(exc: BaseException | None) -> str | None:
    """A one-line message for a configured class whose package is not installed (e.g. a W&B logger)."""
    for e in _chain(exc):
        if isinstance(e, ModuleNotFoundError) and e.name:
            return (f"the configuration needs the Python package {e.name.split('.')[0]!r}, which is not "
                    f"installed (pip install {e.name.split('.')[0]})")
        if isinstance(e, ImportError) or "is not installed" in str(e) or "ModuleNotFoundError" in str(e):
            return f"the configuration needs a package that is not installed ({_one_line(str(e), 200)})"
    return None


if __name__ == "__main__":
    sys.exit(main())
