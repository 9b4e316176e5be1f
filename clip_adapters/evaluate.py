"""Compare few-shot heads on feature files: one table, one JSON.

Example::

    python evaluate.py --features ../shared/data/clip-vit-b32-features/caltech101.safetensors \\
        --shots 16 --heads prototype,tip,gda

For each file, shot count and seed, every head is fit on the K-shot training features, its
hyper-parameters are chosen on ``val``, and it is scored on ``test``. No record is scored on the split
its hyper-parameters were chosen on: a file without a test split is scored on ``val`` with every
search left at its defaults, and an exported adapter whose head was chosen on ``val`` at training
time is not scored there at all (its row says why). Results print as a table (top-1, top-5, mean
per-class recall, chosen hyper-parameters) and are written as a JSON list of CLIP_benchmark-style
records.

Exit status: 0 on success, 2 on bad input (one line on stderr naming the file, key or field). With
several feature files, the records of every file that succeeded are written and printed; each file
that failed is one line on stderr, and the exit status is 2.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from adapters.atomic import atomic_write_text
from adapters.errors import UserError
from adapters.heads import FitData, HeadSkipped, build_head, chunking
from adapters.loading import heads as registered_heads
from adapters.metrics import score
from adapters.protocol import PROTOCOLS, canonical_dataset, cross_validation_folds, realistic_val_shots
from datamodules.feature_file import FeatureFile

#: How errors name this command: ``evaluate.py`` from a checkout, ``clip-adapters-evaluate`` installed.
PROG = Path(sys.argv[0]).name if sys.argv and sys.argv[0] and not sys.argv[0].startswith("-") else "evaluate.py"
HEADS = registered_heads()  # every built-in method's heads, registered through adapters.loading
DEFAULT_HEADS = ",".join(name for name, cls in HEADS.items() if cls.in_default_set)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad arguments in one line (no usage block) with exit status 2."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", nargs="+", required=True, metavar="FILE",
                   help="feature files (.safetensors) or extraction directories (with manifest.json)")
    p.add_argument("--shots", nargs="+", type=int, default=[16], metavar="K",
                   help="shots per class; uses the file's train_{K}shot split, else samples K per class from train")
    p.add_argument("--seeds", nargs="+", type=int, default=[1], metavar="S",
                   help="few-shot sampling seeds (only when sampling from a full train split)")
    p.add_argument("--protocol", nargs="+", default=["full"], choices=PROTOCOLS,
                   help="where choices are made: 'full' (the whole val split) and/or 'realistic' (min(K, 4) val "
                        "images per class, CoOp's rule; cross-validation on the training shots without val)")
    p.add_argument("--fewshot_dir", default=None, metavar="DIR",
                   help="Dassl's split_fewshot folder: use the train (and realistic val) subsets of its "
                        "shot_{K}-seed_{S}.pkl files, matched on the feature file's sample keys")
    p.add_argument("--heads", default=DEFAULT_HEADS,
                   help=f"comma-separated heads (known: {', '.join(sorted(HEADS))}); default: {DEFAULT_HEADS}")
    p.add_argument("--adapter", nargs="+", default=[], metavar="DIR",
                   help="exported adapters (train.py's <run_dir>/adapter): scored on their own, and every head "
                        "is also run on their adapted features")
    p.add_argument("--overlap", action="store_true",
                   help="also report the intra-modal overlap of each file's test features (200 bins on [-1, 1]) "
                        "in every feature space, with a plot per file (see --plot_dir)")
    p.add_argument("--plot_dir", default=None, metavar="DIR",
                   help="where the --overlap plots go (default: the folder of --output; with --output '' no plots "
                        "unless this is given)")
    p.add_argument("--output", default="eval_results.json", metavar="JSON",
                   help="where to write the results (a JSON list of records); '' to skip")
    p.add_argument("--device", default="cpu", help="where heads are fit and searched: cpu, cuda, cuda:1, ...")
    p.add_argument("--chunk_mb", type=float, default=128.0,
                   help="memory bound of one block of search or inference work (a [queries x cache] affinity "
                        "block); 0: whole matrices")
    p.add_argument("--allow_dataset_mismatch", action="store_true",
                   help="score --adapter exports on features of another dataset or other class names "
                        "(refused by default: same class count, different classes)")
    args = p.parse_args(argv)
    args.heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    if not args.heads:
        p.error(f"--heads: no head given (known: {', '.join(sorted(HEADS))})")
    unknown = [h for h in args.heads if h not in HEADS]
    if unknown:
        p.error(f"--heads: unknown head {unknown[0]!r} (known: {', '.join(sorted(HEADS))})")
    if any(k < 1 for k in args.shots):
        p.error("--shots: must be positive integers")
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device: {args.device!r} is not a device (cpu, cuda, cuda:1, ...)")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device: cuda requested, but no CUDA device is available here")
    if args.chunk_mb < 0:
        p.error("--chunk_mb: must be >= 0")
    return args


def create_folder(where: str, folder: Path) -> str | None:
    """Create an output folder (and its parents); the one-line reason naming the option ``where`` when
    that is impossible, else None."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = "a file of that name is not a folder" if isinstance(e, FileExistsError) else e.strerror
        return f"{where}: cannot create {folder} ({why})"
    return None


def load_adapters(paths: Sequence[str]) -> list:
    if not paths:
        return []
    import adapters

    return [adapters.load_adapter(p) for p in paths]


def _check_adapter(adapter, ff: FeatureFile, path: str, allow_mismatch: bool = False) -> list[str]:
    """Refuse an adapter that cannot or should not score this file; returns notes for allowed mismatches."""
    backbone = ff.metadata.get("backbone")
    if backbone and backbone != adapter.hparams.backbone:
        raise UserError(f"--adapter: {path} was trained on {adapter.hparams.backbone} features, "
                        f"{ff.path} holds {backbone} features")
    if ff.dim != adapter.embed_dim or ff.num_classes != adapter.hparams.num_classes:
        raise UserError(f"--adapter: {path} expects dim {adapter.embed_dim} and {adapter.hparams.num_classes} classes, "
                        f"{ff.path} has dim {ff.dim} and {ff.num_classes} classes")
    mismatches = []
    trained_on, here = canonical_dataset(adapter.hparams.dataset), canonical_dataset(ff.metadata.get("dataset"))
    if trained_on and here and trained_on != here:
        mismatches.append(f"trained on dataset {adapter.hparams.dataset!r}, the features are {ff.dataset!r}")
    names = adapter.hparams.class_names
    if names and ff.class_names and list(names) != list(ff.class_names):
        first = next(i for i, (a, b) in enumerate(zip(names, ff.class_names)) if a != b)
        mismatches.append(f"class {first} is {names[first]!r} in the adapter, {ff.class_names[first]!r} in the features")
    if mismatches and not allow_mismatch:
        raise UserError(f"--adapter: {path} was {mismatches[0]} ({ff.path}); pass --allow_dataset_mismatch "
                        "to score it anyway")
    return [f"dataset mismatch allowed: {m}" for m in mismatches]


def _selected_splits(*splits: str | None) -> list[str]:
    return sorted({s for s in splits if s})


def _honest(record: dict) -> dict:
    """The rule every record obeys: it is not scored on a split its choices were made on. A record that
    would break it becomes a skipped row that says why."""
    if "metrics" in record and record["eval_split"] in record["selected_splits"]:
        split = record["eval_split"]
        record = {k: v for k, v in record.items() if k not in ("metrics", "hyperparameters", "notes")}
        record["eval_split"] = None  # not scored anywhere
        record["skipped"] = (f"its choices were made on '{split}' ({record['selected_on']}) and the file has no "
                             f"other split to score on: scoring there would be leaky")
    return record


def evaluate_file(path: str, heads: Sequence[str], shots: Sequence[int], seeds: Sequence[int],
                  adapters: Sequence = (), adapter_paths: Sequence[str] = (),
                  allow_dataset_mismatch: bool = False, device: torch.device | str = "cpu",
                  protocols: Sequence[str] = ("full",), fewshot_dir: str | None = None) -> list[dict]:
    """Fit and score every head on one feature file; returns one record per (shots, seed, protocol, head).

    ``protocols``: where choices are made (`adapters.protocol.PROTOCOLS`): the whole val split, or a
    few-shot val (min(K, 4) per class); without val, ``realistic`` cross-validates on the training shots.
    Every record says which (``protocol``, ``val``) and its accuracy on that selection data (``val_acc1``,
    cross-validated without val): what a user may choose among heads on.

    For each adapter: one record for its own inference and one per head run on its adapted features
    (the zero-shot term of a head still uses the original features, as TA++ does). Heads are fit,
    searched and scored on ``device``; the adapters' own inference runs where they were loaded.
    """
    device = torch.device(device)
    ff = FeatureFile(path)
    ff.verify()
    mismatch_notes = {p: _check_adapter(a, ff, p, allow_dataset_mismatch) for a, p in zip(adapters, adapter_paths)}
    text = ff.text_features
    eval_split = "test" if ff.has_split("test") else "val"
    if not ff.has_split(eval_split):
        raise UserError(f"{ff.path}: no 'test' or 'val' split to evaluate on (has: {', '.join(ff.splits)})")
    evaluation = ff.split(eval_split)
    records = []
    base = {"dataset": ff.dataset, "model": ff.metadata.get("backbone", "unknown"),
            "pretrained": ff.metadata.get("pretrained", "unknown"), "task": "fewshot_classification",
            "eval_split": eval_split, "features": str(path)}
    for adapter, adapter_path in zip(adapters, adapter_paths):
        selection = adapter.selection
        chosen = _selected_splits(selection.get("head"), selection.get("weights"))
        record = {**base, "head": f"{adapter.method} (adapter)", "shots": None, "seed": None,
                  "protocol": selection.get("protocol") or "full", "train": "the adapter's own training set",
                  "selected_on": f"{', '.join(chosen)} (at training time)" if chosen else "nothing (defaults)",
                  "selected_splits": chosen, "adapter": adapter_path}
        if eval_split not in chosen:
            with torch.no_grad():
                logits = adapter.logits(evaluation.features.float())
            record.update(hyperparameters=dict(adapter.export_config().get("head_hparams") or {}),
                          notes=list(mismatch_notes[adapter_path]), metrics=score(logits, evaluation.labels))
        records.append(_honest({**record, "metrics": None} if eval_split in chosen else record))
    file_view = ff.metadata.get("adapter") if evaluation.extra.get("adapted") is not None else None  # e.g. IMO's TA++
    for k in shots:
        fixed = ff.has_split(f"train_{k}shot") and fewshot_dir is None
        for seed in ([None] if fixed else seeds):
            for protocol in protocols:
                train, train_desc, val, val_desc = ff.fewshot(k, seed if seed is not None else 1, protocol, fewshot_dir)
                if eval_split == "val":  # the file's only labelled split is the one scored: nothing to choose on
                    val, val_desc = None, "none (val is the split scored)"
                cv_folds = realistic_val_shots(k) if protocol == "realistic" and val is None and eval_split == "test" else 0
                for view in _views(train, val, evaluation, adapters, adapter_paths, file_view, device):
                    for name in heads:
                        if view["name"] and HEADS[name].original_only:
                            continue  # it uses the original features only: identical to the plain row
                        record = {**base, "head": f"{name}+{view['name']}" if view["name"] else name,
                                  "shots": k, "seed": seed, "protocol": protocol, "train": train_desc, "val": val_desc}
                        if view["source"]:
                            record["adapter"] = view["source"]
                        records.append(_head_record(record, name, ff, train, val, evaluation, view, cv_folds, text))
    for r in records:  # enforced, not just intended: a leaky record is a bug
        assert r["eval_split"] not in r["selected_splits"], r
    return records


def _head_record(record: dict, name: str, ff: FeatureFile, train, val, evaluation, view: dict, cv_folds: int,
                 text) -> dict:
    """Fit head ``name`` in one feature space (choosing on val, or by ``cv_folds``-fold cross-validation on
    the training shots when ``cv_folds`` > 1), score the evaluation split and describe it in ``record``."""
    try:
        if cv_folds > 1:
            hparams, cv_acc = _cross_validate(name, ff, train, view, cv_folds)
            head, logits, val_acc = _fit_and_score(name, ff, train, None, evaluation, view, hparams=hparams)
            head.searched, val_acc = hparams is not None, cv_acc
            record["val"] = f"none: {cv_folds}-fold cross-validation of the training shots"
        else:
            head, logits, val_acc = _fit_and_score(name, ff, train, val, evaluation, view)
    except HeadSkipped as e:
        return {**record, "selected_on": "nothing", "selected_splits": [], "skipped": str(e)}
    on = "val" if val is not None else f"train ({cv_folds}-fold cross-validation of the shots)"
    chosen = _selected_splits("val" if head.searched and val is not None else
                              "train" if head.searched else None, view["weights_selected_on"])
    record["selected_on"] = (", ".join(on if c in ("val", "train") else c for c in chosen) if chosen else
                             "nothing (hyper-parameters at their defaults)" if head.hparams else
                             "nothing (no hyper-parameters)")
    record["selected_splits"] = chosen
    notes = [n for n in head.notes if not (cv_folds > 1 and head.searched and n.startswith("no val split"))]
    notes += list(view["notes"])
    if record["eval_split"] == "val":
        notes.append("no test split: scored on val")
    if cv_folds == 1 and head.hparams:
        notes.append("realistic protocol without val at 1 shot: no cross-validation possible, defaults kept")
    if view["name"] and head.adapted_note(text is not None):
        notes.append(head.adapted_note(text is not None))
    metrics = score(logits, evaluation.labels.to(logits.device))
    return _honest({**record, "hyperparameters": head.hparams, "notes": notes, "metrics": metrics,
                    "val_acc1": val_acc})


def _cross_validate(name: str, ff: FeatureFile, train, view: dict, folds: int) -> tuple[dict | None, float | None]:
    """Choose a head's hyper-parameters by ``folds``-fold cross-validation on the training shots: each fold's
    own search proposes a candidate, and the candidate with the best held-out accuracy over all folds
    wins (ties: the first proposed). Returns (hyper-parameters, their cross-validated accuracy);
    hyper-parameters None when the head searches nothing (the accuracy is still estimated)."""
    splits = cross_validation_folds(train.labels, folds)
    fold_data = []
    for held in splits:
        keep = torch.ones(len(train), dtype=torch.bool)
        keep[held] = False
        keep = torch.nonzero(keep).flatten()
        fold_data.append((train.subset(keep), train.subset(held, "val"), _fold_view(view, keep, held)))
    candidates: list[dict | None] = []
    for tr, va, vw in fold_data:
        head, _, _ = _fit_and_score(name, ff, tr, va, va, vw)
        if not head.searched:  # nothing to choose: cross-validation only estimates its accuracy
            candidates = [None]
            break
        if head.hparams not in candidates:
            candidates.append(dict(head.hparams))
    scores = []
    for hparams in candidates:
        correct = total = 0
        for tr, va, vw in fold_data:
            _, logits, _ = _fit_and_score(name, ff, tr, None, va, vw, hparams=hparams)
            correct += int((logits.argmax(-1).cpu() == va.labels).sum())
            total += len(va)
        scores.append(correct / total)
    best = max(range(len(candidates)), key=lambda i: (scores[i], -i))
    return candidates[best], scores[best]


def _fold_view(view: dict, keep: torch.Tensor, held: torch.Tensor) -> dict:
    """A feature space restricted to the training rows ``keep``, with the rows ``held`` as its val and test."""
    def rows(t, index):
        return None if t is None else t[index.to(t.device)]

    original = view["original"]
    out = {**view, "train": rows(view["train"], keep), "val": rows(view["train"], held),
           "test": rows(view["train"], held), "train_views": rows(view["train_views"], keep)}
    out["original"] = {**original, "train": rows(original["train"], keep), "val": rows(original["train"], held),
                       "test": rows(original["train"], held)}
    return out


@torch.no_grad()
def _views(train, val, evaluation, adapters, adapter_paths, file_view, device=None) -> list[dict]:
    """The feature spaces the heads run in: the original embeddings, each exported adapter's adapted
    embeddings, and the adapted embeddings stored in the file by an encoder adapter (IMO); their
    tensors on ``device``."""
    views = _feature_spaces(train, val, evaluation, adapters, adapter_paths, file_view)
    for view in views:
        if device is not None:
            for key in ("train", "val", "test", "train_views"):
                if view[key] is not None:
                    view[key] = view[key].to(device)
        view["original"] = views[0]  # what every space's zero-shot term uses
    return views


def _feature_spaces(train, val, evaluation, adapters, adapter_paths, file_view) -> list[dict]:
    def norm(t):
        return None if t is None else F.normalize(t.float(), dim=-1)

    rows = norm(train.extra.get("views"))  # every augmented view of a training image, [N, V, D], if stored
    views = [{"name": None, "source": None, "train": norm(train.features), "val": norm(val.features) if val else None,
              "test": norm(evaluation.features), "train_views": rows, "weights_selected_on": None, "notes": []}]
    for adapter, path in zip(adapters, adapter_paths):
        if adapter.adapts_features:
            views.append({"name": adapter.method, "source": path, "train": adapter.adapt(views[0]["train"]),
                          "val": None if val is None else adapter.adapt(views[0]["val"]),
                          "test": adapter.adapt(views[0]["test"]),
                          "train_views": None if rows is None else adapter.adapt(rows.flatten(0, 1)).view(rows.shape),
                          "weights_selected_on": adapter.selection.get("weights"), "notes": []})
    if file_view and train.extra.get("adapted") is not None:
        views.append({"name": file_view, "source": "adapted features in the file", "train": norm(train.extra["adapted"]),
                      "val": None if val is None else norm(val.extra["adapted"]), "test": norm(evaluation.extra["adapted"]),
                      "train_views": None, "weights_selected_on": None, "notes": []})
    return views


def overlap_records(path: str, adapters: Sequence = (), adapter_paths: Sequence[str] = (), plot: str | None = None,
                    bins: int = 200) -> list[dict]:
    """Intra-modal overlap of the evaluation split in every feature space (original, adapters, file-adapted),
    with a PNG of the histograms when ``plot`` is a path."""
    from adapters.metrics import intra_modal_overlap
    from callbacks.overlap import save_overlap_plot

    ff = FeatureFile(path)
    split = ff.split("test" if ff.has_split("test") else "val")
    file_view = ff.metadata.get("adapter") if split.extra.get("adapted") is not None else None
    curves = {}
    for view in _views(split, None, split, adapters, adapter_paths, file_view):
        overlap, same, diff = intra_modal_overlap(view["test"], split.labels, bins=bins)
        curves[view["name"] or "original"] = (same, diff, overlap)
    if plot:
        save_overlap_plot(curves, plot, title=f"{ff.dataset}: {split.name} split")
    records = []
    for name, (_, _, overlap) in curves.items():
        record = {"dataset": ff.dataset, "features": str(path), "split": split.name, "space": name, "overlap": overlap,
                  "bins": bins, "plot": plot, "notes": []}
        if overlap is None:
            record["notes"].append("undefined: the split has no pair of samples of the same class (or none of "
                                   "different classes)")
        records.append(record)
    return records


def _fit_and_score(name: str, ff: FeatureFile, train, val, evaluation, view: dict, hparams: dict | None = None):
    """Fit head ``name`` in one feature space and score the evaluation split. The head declares its
    inputs: the space's embeddings, or a per-sample tensor stored at extraction (original features
    only), and the file-level tensors it reads."""
    cls = HEADS[name]
    device = view["test"].device
    extras = {k: v.to(device) for k, v in ff.extras.items() if cls.reads and k.startswith(cls.reads)}
    has_val = view["val"] is not None and val is not None
    train_views = train_text_x = None
    if cls.inputs == "embeddings":  # the zero-shot term: the original features (the same tensors as view 0's)
        inputs = (view["train"], view["val"] if has_val else None, view["test"])
        val_text_x, test_text_x = view["original"]["val"] if has_val else None, view["original"]["test"]
        train_views, train_text_x = view["train_views"], view["original"]["train"]
    else:
        if cls.inputs not in train.extra or cls.inputs not in evaluation.extra:
            raise HeadSkipped(f"{name} needs per-sample '{cls.inputs}' features ({cls.inputs_hint})")
        has_val = has_val and cls.inputs in val.extra
        inputs = (train.extra[cls.inputs], val.extra[cls.inputs] if has_val else None, evaluation.extra[cls.inputs])
        val_text_x = test_text_x = None
    on = lambda t: None if t is None else t.to(device)  # noqa: E731
    data = FitData(on(inputs[0]), on(train.labels), ff.num_classes, text=on(ff.text_features), val_x=on(inputs[1]),
                   val_y=on(val.labels) if has_val else None, dataset=ff.dataset, val_text_x=on(val_text_x),
                   extras=extras, metadata=ff.metadata, normalize=cls.inputs == "embeddings",
                   train_views=on(train_views), train_text_x=on(train_text_x))
    head = build_head(name, dataset=ff.dataset).fit(data, hparams=hparams)
    val_acc = None  # what a user may select heads on: accuracy on the selection split
    if has_val:
        val_acc = float((head(data.val_x, text_x=data.val_text_x).argmax(-1) == data.val_y).float().mean())
    return head, head(on(inputs[2]).float(), text_x=on(test_text_x)), val_acc


def render(records: list[dict]):
    """A rich table of the records: one row per (dataset, shots, seed, head)."""
    from rich.table import Table

    table = Table(title="Few-shot evaluation (top-1 / top-5 / mean per-class recall, %)")
    for col, justify in [("dataset", "left"), ("shots", "right"), ("seed", "right"), ("protocol", "left"),
                         ("head", "left"),
                         ("top-1", "right"), ("top-5", "right"), ("mean recall", "right"),
                         ("hyper-parameters (on val)", "left"), ("notes", "left")]:
        table.add_column(col, justify=justify)

    def pct(x: float) -> str:
        return "-" if x is None or math.isnan(x) else f"{100 * x:.2f}"

    def mean_std(r: dict, key: str) -> str:
        return f"{100 * r['mean'][key]:.2f} ± {100 * r['std'][key]:.2f}"

    for r in records:
        protocol = r.get("protocol") or "-"
        if r.get("task") == "fewshot_seed_summary":
            table.add_row(r["dataset"], str(r["shots"]), f"mean ± std ({len(r['seeds'])})", protocol, r["head"],
                          *(mean_std(r, k) for k in METRICS), "", "")
            continue
        seed = "-" if r["shots"] is None else "file" if r["seed"] is None else str(r["seed"])
        if "skipped" in r:
            table.add_row(r["dataset"], str(r["shots"] or "-"), seed, protocol, r["head"], "-", "-", "-", "",
                          f"skipped: {r['skipped']}")
            continue
        m = r["metrics"]
        hp = ", ".join(f"{k}={v}" for k, v in r["hyperparameters"].items())
        table.add_row(r["dataset"], str(r["shots"] or "-"), seed, protocol, r["head"], pct(m["acc1"]), pct(m["acc5"]),
                      pct(m["mean_per_class_recall"]), hp, "; ".join(r["notes"]))
    return table


METRICS = ("acc1", "acc5", "mean_per_class_recall")


def seed_summaries(records: list[dict]) -> list[dict]:
    """Mean ± std (sample std, n - 1) over few-shot seeds of every (features, dataset, shots, protocol, head)
    scored with more than one seed: one ``fewshot_seed_summary`` record each, listing its seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("task") == "fewshot_classification" and r.get("seed") is not None and r.get("metrics"):
            groups.setdefault((r["features"], r["dataset"], r["shots"], r.get("protocol"), r["head"]), []).append(r)
    out = []
    for (features, dataset, shots, protocol, head), rs in groups.items():
        if len(rs) < 2:
            continue
        values = {k: torch.tensor([float(r["metrics"][k]) for r in rs], dtype=torch.float64) for k in METRICS}
        out.append({"task": "fewshot_seed_summary", "dataset": dataset, "features": features, "shots": shots,
                    "protocol": protocol, "head": head, "seeds": [r["seed"] for r in rs],
                    "eval_split": rs[0]["eval_split"], "selected_splits": rs[0]["selected_splits"],
                    "mean": {k: float(v.mean()) for k, v in values.items()},
                    "std": {k: float(v.std()) for k, v in values.items()}})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from rich.console import Console

    # Off a terminal (CI, SLURM logs) rich would wrap at 80 columns; tables read better unwrapped.
    console = Console() if sys.stdout.isatty() else Console(width=200)
    try:
        adapters = load_adapters(args.adapter)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    records, overlaps, failed = [], [], 0
    # plots go next to the results, or where asked: never into the current directory by surprise
    plot_dir = Path(args.plot_dir) if args.plot_dir else (Path(args.output).parent if args.output else None)
    for where, folder in (("--plot_dir", plot_dir if args.overlap else None),
                          ("--output", Path(args.output).parent if args.output else None)):
        error = None if folder is None else create_folder(where, folder)  # before hours of evaluation, not after
        if error:
            print(f"{PROG}: error: {error}", file=sys.stderr)
            return 2
    chunk = None if args.chunk_mb == 0 else int(args.chunk_mb * 2**20 / 4)  # float32 elements
    for path in args.features:  # one bad file costs its own rows, not everyone's
        try:
            with chunking(chunk):
                file_records = evaluate_file(path, args.heads, args.shots, args.seeds, adapters, args.adapter,
                                             allow_dataset_mismatch=args.allow_dataset_mismatch, device=args.device,
                                             protocols=args.protocol, fewshot_dir=args.fewshot_dir)
            if args.overlap:
                plot = None if plot_dir is None else str(plot_dir / f"overlap_{Path(path).stem}.png")
                overlaps += overlap_records(path, adapters, args.adapter, plot=plot)
            records += file_records
        except UserError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            failed += 1
    records += seed_summaries(records)
    if records:
        console.print(render(records))
    for r in overlaps:
        value = "undefined" if r["overlap"] is None else f"{r['overlap']:.3f}"
        plot = r["plot"] or "none (no --output or --plot_dir)"
        console.print(f"overlap {r['dataset']} ({r['split']}, {r['space']}): {value}  plot: {plot}"
                      + (f"  ({'; '.join(r['notes'])})" if r["notes"] else ""))
    records += [{"task": "intra_modal_overlap", **r} for r in overlaps]
    if args.output and records:
        replaced = Path(args.output).exists()
        atomic_write_text(args.output, json.dumps(records, indent=2))
        console.print(f"results written to {Path(args.output).resolve()}"
                      + (" (replacing the results that were there)" if replaced else "")
                      + (f" ({failed} of {len(args.features)} files failed)" if failed else ""))
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
