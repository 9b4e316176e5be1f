"""Run the few-shot benchmark protocol papers publish with: files x shots x seeds x methods, mean ± std.

Example::

    python benchmark.py --features ../shared/data/clip-vit-b32-features/{caltech101,oxford_flowers,fgvc}.safetensors \\
        --shots 1 4 16 --seeds 1 2 3 --methods all --protocol full realistic --out runs/bench

For every cell (file, shots, seed, protocol) the training-free heads are fit and searched and the
trained methods are trained on the cached features (``configs/<method>/default.yaml``, the cell's
shots, seed and protocol), then everything is scored by ``evaluate.py``'s code on ``test``: one
record schema, one number per model. A seed applies when the file has a full ``train`` split (K shots
drawn per seed, or Dassl's ``--fewshot_dir`` subsets); a file's fixed ``train_{K}shot`` subset is one
cell whatever the seeds.

Per cell, one extra record, head ``best (selected on val)``: the method with the best accuracy on
the cell's selection data (the whole val under ``full``; min(K, 4) val images per class under
``realistic``, cross-validated shots without val) and its test accuracy, the number a user may
honestly report. Its accuracy on val is optimistic for the methods that searched there; the test
number is not.

Resumable: a finished cell is a file under ``DIR/cells/`` and is skipped; a trained method whose
training was interrupted resumes from its last checkpoint (``DIR/runs/``). What was asked is part of
the names: a cell file is keyed by its methods (and their recipes), a training run by its recipe (the
config file's text and ``--train_args``), so asking for other methods runs them, and a changed recipe
trains anew; nothing earlier is reused for what it was not, or written over. Writes ``DIR/results.json``
(the records, plus ``train_seconds`` for trained methods), ``DIR/summary.md`` (mean ± std tables per
protocol) and ``DIR/plots/<file>.png`` (accuracy vs shots with error bars).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from adapters.atomic import atomic_write_text
from adapters.errors import UserError
from adapters.protocol import PROTOCOLS
from clip_adapters import evaluate
from datamodules.feature_file import FeatureFile

PROG = Path(sys.argv[0]).name if sys.argv and sys.argv[0] and not sys.argv[0].startswith("-") else "benchmark.py"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BEST = "best (selected on val)"


def trained_methods() -> dict[str, Path]:
    """The trained methods that train on cached features, by name: ``configs/<method>/default.yaml`` is
    ``<method>``, another recipe ``configs/<method>/<recipe>.yaml`` is ``<method>-<recipe>`` (demo configs
    excluded), for every model that does not train through the image encoder (IMO does: it needs images)."""
    import importlib

    import yaml

    out = {}
    for config in sorted(CONFIGS.glob("*/*.yaml")):
        if config.parent.name == "data" or config.stem == "demo":
            continue
        class_path = ((yaml.safe_load(config.read_text()) or {}).get("model") or {}).get("class_path", "")
        module, _, name = class_path.rpartition(".")
        if module and not getattr(getattr(importlib.import_module(module), name), "adapts_encoder", False):
            out[config.parent.name if config.stem == "default" else f"{config.parent.name}-{config.stem}"] = config
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = evaluate.OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", nargs="+", required=True, metavar="FILE", help="feature files")
    p.add_argument("--shots", nargs="+", type=int, default=[1, 4, 16], metavar="K")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], metavar="S",
                   help="few-shot seeds (CoOp's 1 2 3); used where a file has a full train split")
    p.add_argument("--methods", default="all",
                   help="comma-separated heads and trained methods, or 'all' (every head and every trained "
                        "method that runs on cached features)")
    p.add_argument("--protocol", nargs="+", default=["full"], choices=PROTOCOLS)
    p.add_argument("--fewshot_dir", default=None, metavar="DIR", help="Dassl's split_fewshot folder (see evaluate.py)")
    p.add_argument("--out", required=True, metavar="DIR", help="results, summary, plots, cells and training runs")
    p.add_argument("--train_args", nargs=argparse.REMAINDER, default=[],
                   help="extra train.py options for every trained method (e.g. --trainer.max_epochs 40); last")
    args = p.parse_args(argv)
    methods = trained_methods()
    known = sorted(evaluate.HEADS) + sorted(methods)
    wanted = known if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in wanted if m not in known]
    if unknown:
        p.error(f"--methods: unknown method {unknown[0]!r} (known: {', '.join(known)})")
    if args.methods == "all":  # a head that needs text or other inputs says so in its skipped record
        wanted = [h for h in wanted if h in methods or evaluate.HEADS[h].in_default_set]
    if not wanted:
        p.error(f"--methods: none given (--methods all, or some of: {', '.join(known)})")
    args.heads = [m for m in wanted if m in evaluate.HEADS]
    args.trained = {m: methods[m] for m in wanted if m in methods}
    args.recipes = {m: recipe_key(config, args.train_args) for m, config in args.trained.items()}
    if any(k < 1 for k in args.shots):
        p.error("--shots: must be positive integers")
    return args


def cells(ff: FeatureFile, shots: Sequence[int], seeds: Sequence[int], protocols: Sequence[str],
          fewshot_dir: str | None) -> list[tuple[int, int | None, str]]:
    """(shots, seed, protocol) of every cell of a file: one seed for a fixed ``train_{K}shot`` subset."""
    out = []
    for k in shots:
        fixed = ff.has_split(f"train_{k}shot") and fewshot_dir is None
        for seed in [None] if fixed else seeds:
            out.extend((k, seed, protocol) for protocol in protocols)
    return out


def _cell_name(k: int, seed: int | None, protocol: str) -> str:
    return f"{k}shot-{'file' if seed is None else f'seed{seed}'}-{protocol}"


def _digest(*parts) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def recipe_key(config: Path, train_args: Sequence[str]) -> str:
    """What a trained method's run depends on beyond its cell: its config file and the extra options."""
    return _digest(Path(config).read_text(), list(train_args))


def cell_key(args: argparse.Namespace) -> str:
    """What a cell's records depend on beyond (file, shots, seed, protocol): the methods and recipes."""
    return _digest(sorted(args.heads), args.recipes, args.fewshot_dir)


def train_method(method: str, config: Path, path: str, k: int, seed: int | None, protocol: str,
                 fewshot_dir: str | None, run_dir: Path, extra: Sequence[str], metadata: dict) -> float:
    """Train one method on one cell (resuming an interrupted run); returns the training time in seconds
    (0 when the export was already there)."""
    from clip_adapters import train

    if (run_dir / "adapter").is_dir():
        return 0.0
    data = {"class_path": "datamodules.features.FeatureDataModule",
            "init_args": {"path": path, "shots": k, "fewshot_seed": seed or 1, "protocol": protocol,
                          "fewshot_dir": fewshot_dir}}
    # the features decide the backbone (the method's config names the one its recipe was written for)
    identity = [arg for key in ("backbone", "pretrained") if metadata.get(key)
                for arg in (f"--model.init_args.{key}", metadata[key])]
    start = time.monotonic()
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        status = train.main(["fit", "--config", str(config), "--data", json.dumps(data), "--run_dir", str(run_dir),
                             "--ckpt_path", "last", "--trainer.enable_progress_bar", "false",
                             "--trainer.enable_model_summary", "false", *identity, *extra])
    if status != 0:
        lines = [ln for ln in quiet.getvalue().splitlines() if "error" in ln.lower()]
        raise UserError(f"{method} on {Path(path).name} ({k} shots): {lines[-1] if lines else f'exit {status}'}")
    return time.monotonic() - start


def run_cell(path: str, k: int, seed: int | None, protocol: str, args: argparse.Namespace, out: Path) -> list[dict]:
    """Every record of one cell (heads, trained methods, heads on their features, and the best on val)."""
    import adapters

    stem = Path(path).stem
    ff = FeatureFile(path)
    exports, seconds, records = [], {}, []
    for method, config in args.trained.items():
        run_dir = out / "runs" / stem / _cell_name(k, seed, protocol) / f"{method}-{args.recipes[method]}"
        try:
            seconds[method] = train_method(method, config, path, k, seed, protocol, args.fewshot_dir, run_dir,
                                           args.train_args, ff.metadata)
            exports.append(str(run_dir / "adapter"))
        except UserError as e:  # e.g. a method that needs text on an image-only file: a skipped record
            records.append({"task": "fewshot_classification", "features": path, "dataset": ff.dataset,
                            "head": f"{method} (adapter)", "shots": k, "seed": seed, "protocol": protocol,
                            "selected_on": "nothing", "selected_splits": [], "skipped": str(e)})
    loaded = [adapters.load_adapter(e) for e in exports]
    names = dict(zip(exports, (m for m in args.trained if m in seconds)))
    records += evaluate.evaluate_file(path, args.heads, [k], [seed or 1], loaded, exports, protocols=[protocol],
                                      fewshot_dir=args.fewshot_dir)
    for r in records:  # rows named by recipe (two recipes of one method are two rows), not by method class
        if r.get("adapter") in names:
            method = names[r["adapter"]]
            r["head"] = f"{method} (adapter)" if r["head"].endswith(" (adapter)") else \
                f"{r['head'].split('+', 1)[0]}+{method}"
    _, _, val, val_desc = ff.fewshot(k, seed or 1, protocol, args.fewshot_dir)
    for r in records:
        r.update(shots=k, seed=seed, protocol=protocol)
        if r["head"].endswith(" (adapter)") and r.get("metrics"):
            method = r["head"].removesuffix(" (adapter)")
            r["train_seconds"] = round(seconds.get(method, 0.0), 1)
            adapter = loaded[exports.index(r["adapter"])]
            if val is not None:  # its head was chosen on this cell's selection data at training time
                with torch.no_grad():
                    r["val_acc1"] = float((adapter.logits(val.features.float()).argmax(-1) == val.labels).float().mean())
                r["val"] = val_desc
        elif "+" in r["head"] and r.get("metrics"):  # a head on a trained method's features: its training time too
            method = r["head"].split("+", 1)[1]
            r["train_seconds"] = round(seconds.get(method, 0.0), 1)
    best = best_record([r for r in records if r.get("metrics")])
    if best is not None:
        records.append(best)
    return records


def best_record(records: list[dict]) -> dict | None:
    """The record a user may report for a cell: the best accuracy on the selection data (first on ties)."""
    candidates = [r for r in records if r.get("val_acc1") is not None]
    if not candidates:
        return None
    winner = max(candidates, key=lambda r: r["val_acc1"])  # max keeps the first of equals
    on_val = (winner.get("val") or "").startswith("val")  # else cross-validated training shots (no val split)
    splits = sorted(set(winner["selected_splits"]) | ({"val"} if on_val else {"train"}))
    return {**winner, "head": BEST, "chosen": winner["head"], "selected_splits": splits,
            "selected_on": f"{winner['selected_on']}; the method: {winner.get('val', 'val')}",
            "notes": [f"{winner['head']}: best of {len(candidates)} methods on the selection data "
                      f"({100 * winner['val_acc1']:.2f} %)"]}


def summary_table(records: list[dict], protocol: str) -> str:
    """Markdown: one row per method, one column per (dataset, shots); mean ± std over seeds."""
    rows = [r for r in records if r.get("protocol") == protocol and r.get("task") == "fewshot_classification"
            and r.get("metrics")]
    columns = sorted({(r["dataset"], r["shots"]) for r in rows}, key=lambda c: (c[0], c[1]))
    methods = list(dict.fromkeys(r["head"] for r in rows))
    methods = [m for m in methods if m != BEST] + ([BEST] if BEST in methods else [])
    lines = ["| method | " + " | ".join(f"{d} {k}-shot" for d, k in columns) + " |",
             "| --- |" + " --- |" * len(columns)]
    for m in methods:
        cells_ = []
        for d, k in columns:
            acc = [100 * r["metrics"]["acc1"] for r in rows if r["head"] == m and r["dataset"] == d and r["shots"] == k]
            cells_.append(_mean_std(acc))
        lines.append(f"| {m} | " + " | ".join(cells_) + " |")
    chosen = [f"{r['dataset']} {r['shots']}-shot seed {r['seed'] or 'file'}: {r['chosen']}" for r in rows
              if r["head"] == BEST]
    if chosen:
        lines += ["", "Chosen on val by `best (selected on val)`: " + "; ".join(chosen) + "."]
    return "\n".join(lines)


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    t = torch.tensor(values, dtype=torch.float64)
    return f"{float(t.mean()):.2f} ± {float(t.std()):.2f}"


def plot(records: list[dict], path: Path, features: str, protocol: str) -> None:
    """Accuracy vs shots of every method on one file, mean over seeds with ± std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if r.get("features") == features and r.get("protocol") == protocol
            and r.get("task") == "fewshot_classification" and r.get("metrics")]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m in dict.fromkeys(r["head"] for r in rows):
        shots = sorted({r["shots"] for r in rows if r["head"] == m})
        acc = [[100 * r["metrics"]["acc1"] for r in rows if r["head"] == m and r["shots"] == k] for k in shots]
        mean = [sum(a) / len(a) for a in acc]
        std = [float(torch.tensor(a, dtype=torch.float64).std()) if len(a) > 1 else 0.0 for a in acc]
        ax.errorbar(shots, mean, yerr=std, marker="o", capsize=3, label=m, lw=2.5 if m == BEST else 1.2)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("shots per class")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{rows[0]['dataset']} ({protocol} protocol)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def run(args: argparse.Namespace) -> list[dict]:
    """Run every cell not done yet; returns all records (done before and now)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    out = Path(args.out)
    todo, key = [], cell_key(args)
    for path in args.features:
        ff = FeatureFile(path)
        todo += [(path, *cell) for cell in cells(ff, args.shots, args.seeds, args.protocol, args.fewshot_dir)]
    records: list[dict] = []
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task("benchmark", total=len(todo))
        for path, k, seed, protocol in todo:
            cell_file = out / "cells" / Path(path).stem / f"{_cell_name(k, seed, protocol)}-{key}.json"
            bar.update(task, description=f"{Path(path).stem} {_cell_name(k, seed, protocol)}")
            if cell_file.exists():  # done in an earlier run
                records += json.loads(cell_file.read_text())
            else:
                cell = run_cell(path, k, seed, protocol, args, out)
                cell_file.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(cell_file, json.dumps(cell, indent=2))
                records += cell
            bar.advance(task)
    records += evaluate.seed_summaries(records)
    atomic_write_text(out / "results.json", json.dumps(records, indent=2))
    summary = ["# Benchmark summary", "",
               "Test top-1 (%), mean ± std over few-shot seeds where a file has a full train split. Choices "
               "(hyper-parameters, epochs, the `best` row's method) are made on the selection data of each "
               "protocol only: `full` = the whole val split, `realistic` = min(K, 4) val images per class "
               "(cross-validated training shots without val).", ""]
    for protocol in args.protocol:
        summary += [f"## Protocol: {protocol}", "", summary_table(records, protocol), ""]
        for path in args.features:
            plot(records, out / "plots" / f"{Path(path).stem}-{protocol}.png", path, protocol)
    atomic_write_text(out / "summary.md", "\n".join(summary))
    return records


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    error = evaluate.create_folder("--out", Path(args.out))
    if error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    try:
        run(args)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print((Path(args.out) / "summary.md").read_text())
    print(f"results: {Path(args.out) / 'results.json'}; plots: {Path(args.out) / 'plots'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
