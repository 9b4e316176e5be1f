"""Webdataset tar shards: write them from an image folder, a CSV or a CoOp split file; index existing ones.

Usage::

    python -m datamodules.shards folder IMAGES_DIR --out SHARDS_DIR [--split train] [--max_count 1000]
    python -m datamodules.shards csv LIST.csv --out SHARDS_DIR [--image_root DIR]
    python -m datamodules.shards coop split_zhou_Caltech101.json --image_root DIR --out SHARDS_DIR
    python -m datamodules.shards index 'DIR/{00000..00009}.tar' --out SHARDS_DIR --label txt --class_names names.txt

Each sample holds ``__key__``, the image under its format's extension (``jpg`` for JPEGs: the original
bytes, re-encoded only with ``--reencode``), ``cls`` (int label) and ``json`` (class name, source path,
split). Shards are ``{split}-{000000}.tar``, written atomically in a deterministic order (sorted, then
shuffled with ``--seed`` so that every shard mixes classes). The output directory gets:

* ``dataset.json``: class names and, per split, the sample count, class counts and the shard list with
  sample counts and byte sizes (what the streaming DataModule needs to equalise ranks);
* ``{split}-index.tsv``: one ``key<TAB>label<TAB>shard`` line per sample, for few-shot selection
  without opening any image.

``index`` writes the same two files for shards written by other tools (img2dataset's ``jpg``/``txt``/
``json``), reading labels from ``cls``, from ``txt`` matched against class names, or from a ``json`` field.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import random
import sys
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds

from adapters.atomic import atomic_path, atomic_write_text
from adapters.errors import ConfigError, UserError
from datamodules import storage

MANIFEST = "dataset.json"
MANIFEST_FORMAT = "clip-adapters-shards"
IMAGE_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".bmp": "bmp",
                    ".gif": "gif", ".tif": "tiff", ".tiff": "tiff", ".ppm": "ppm"}
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tiff", "ppm")


@dataclass(frozen=True)
class Record:
    """One labelled image to write."""

    path: Path
    label: int
    split: str


# -- sources ----------------------------------------------------------------------------------------
def parse_fractions(spec: str) -> dict[str, float]:
    """``"train=0.5,val=0.2,test=0.3"`` -> {split: fraction}; fractions must sum to 1."""
    try:
        fractions = {k.strip(): float(v) for k, v in (item.split("=") for item in spec.split(","))}
    except ValueError:
        raise ConfigError(f"fractions: expected 'split=fraction,...', got {spec!r}") from None
    if abs(sum(fractions.values()) - 1.0) > 1e-6 or min(fractions.values()) < 0:
        raise ConfigError(f"fractions: must be non-negative and sum to 1, got {spec!r}")
    return fractions


def partition(records: list[Record], fractions: dict[str, float], seed: int = 0) -> list[Record]:
    """Assign each class's records to splits by ``fractions`` (deterministic in ``seed``)."""
    out = []
    for label in sorted({r.label for r in records}):
        items = sorted((r for r in records if r.label == label), key=lambda r: str(r.path))
        random.Random(f"{seed}-{label}").shuffle(items)
        start = 0
        for i, (split, fraction) in enumerate(fractions.items()):
            end = len(items) if i == len(fractions) - 1 else start + round(fraction * len(items))
            out += [Record(r.path, r.label, split) for r in items[start:end]]
            start = end
    return out


def _hidden(path: Path) -> bool:
    """Dot-entries (``.ipynb_checkpoints``, ``.DS_Store``, ``.git``) are never data."""
    return path.name.startswith(".")


def from_folder(root: str | Path, split: str = "train", skip_empty_classes: bool = False,
                skipped: dict | None = None) -> tuple[list[Record], list[str]]:
    """``root/<class>/<file>``: classes are the sorted sub-folder names.

    Hidden entries are ignored. A class folder without images is a `ConfigError` (a silent class with
    no sample would shift every label after it) unless ``skip_empty_classes``. Files that are not
    images are skipped; ``skipped`` (a dict) receives the counts, which the manifest records.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root}: image folder not found")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not _hidden(d))
    if not class_dirs:
        raise ConfigError(f"{root}: no class sub-folders (expected <class>/<image> files)")
    counts = {"non_image_files": 0, "hidden_entries": 0, "empty_classes": []}
    per_class = []
    for d in class_dirs:
        entries = sorted(d.iterdir())
        hidden = [f for f in entries if _hidden(f)]
        visible = [f for f in entries if f.is_file() and not _hidden(f)]
        images = [f for f in visible if f.suffix.lower() in IMAGE_EXTENSIONS]
        counts["hidden_entries"] += len(hidden)
        counts["non_image_files"] += len(visible) - len(images)
        if not images:
            if not skip_empty_classes:
                raise ConfigError(f"{d}: class folder without images (remove it, or pass --skip_empty_classes)")
            counts["empty_classes"].append(d.name)
            continue
        per_class.append((d, images))
    records = [Record(f, y, split) for y, (_, images) in enumerate(per_class) for f in images]
    if skipped is not None:
        skipped.update(counts)
    return records, [d.name.replace("_", " ") for d, _ in per_class]


def from_csv(path: str | Path, image_root: str | Path | None = None, split: str = "train") -> tuple[list[Record], list[str]]:
    """A CSV with a header ``path,label[,split]``; labels are integers or class names."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: CSV file not found")
    root = Path(image_root) if image_root else path.parent
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise ConfigError(f"{path}: expected a header with columns 'path,label' (optionally 'split')")
    raw = [r["label"].strip() for r in rows]
    if all(v.lstrip("-").isdigit() for v in raw):
        labels = [int(v) for v in raw]
        if min(labels) < 0:
            raise ConfigError(f"{path}: negative label {min(labels)}")
        class_names = [str(i) for i in range(max(labels) + 1)]
    else:
        class_names = sorted(set(raw))
        labels = [class_names.index(v) for v in raw]
    records = [Record(root / r["path"], y, (r.get("split") or split).strip()) for r, y in zip(rows, labels)]
    return records, class_names


def from_coop_split(path: str | Path, image_root: str | Path) -> tuple[list[Record], list[str]]:
    """A CoOp ``split_zhou_*.json``: ``{"train"|"val"|"test": [[relative path, label, class name], ...]}``."""
    path = Path(path)
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read CoOp split file ({e})") from None
    names: dict[int, str] = {}
    records = []
    for split in ("train", "val", "test"):
        for i, entry in enumerate(data.get(split, [])):
            try:
                rel, label, name = entry
                label = int(label)
            except (TypeError, ValueError):
                raise ConfigError(f"{path}: {split}[{i}] is not [path, label, class name]") from None
            names[label] = name
            records.append(Record(Path(image_root) / rel, label, split))
    if not records:
        raise ConfigError(f"{path}: no train/val/test entries")
    return records, [names.get(i, str(i)) for i in range(max(names) + 1)]


# -- writing ----------------------------------------------------------------------------------------
def _image_payload(record: Record, reencode: bool) -> tuple[str, bytes]:
    """(extension key, bytes): the file's own bytes, or a JPEG re-encode when asked."""
    try:
        data = record.path.read_bytes()
    except OSError as e:
        raise UserError(f"{record.path}: cannot read image ({e.strerror})") from None
    ext = IMAGE_EXTENSIONS.get(record.path.suffix.lower())
    if ext is None:
        raise UserError(f"{record.path}: not an image file extension ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    if reencode and ext != "jpg":
        from PIL import Image

        buf = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").save(buf, format="JPEG", quality=95)
        return "jpg", buf.getvalue()
    return ext, data


def write_shards(records: Sequence[Record], class_names: Sequence[str], out_dir: str | Path, *,
                 max_count: int = 1000, max_size: int | None = None, seed: int = 0, reencode: bool = False,
                 progress: bool = True, dataset: str | None = None,
                 multi_labels: dict[str, list[int]] | None = None, skipped: dict | None = None) -> dict:
    """Write ``records`` into ``out_dir`` as tar shards per split, plus manifest and index files.

    ``multi_labels`` (source path -> all labels, the record's own first) makes multi-label shards: the
    labels go into each sample's ``json`` and the manifest says ``label: multi``. ``skipped``: what the
    source left out (counts of non-image files, hidden entries, empty classes), recorded in the manifest.
    ``out_dir`` may be a remote URL (``s3://bucket/prefix``): the shards are written locally, uploaded one
    object each, and the manifest last, so a reader never sees a manifest naming a missing shard.
    """
    if max_count < 1:
        raise ConfigError(f"max_count: must be >= 1, got {max_count}")
    if storage.exists(storage.join(str(out_dir), MANIFEST)):  # shards are a record too: never written over
        raise ConfigError(f"--out: {out_dir} already holds shards ({MANIFEST}); write to another directory, or "
                          "remove the old shards first")
    if storage.is_remote(str(out_dir)):
        import tempfile

        with tempfile.TemporaryDirectory() as local:
            manifest = write_shards(records, class_names, local, max_count=max_count, max_size=max_size, seed=seed,
                                    reencode=reencode, progress=progress,
                                    dataset=dataset or storage.parent(str(out_dir) + "/x").rsplit("/", 1)[-1],
                                    multi_labels=multi_labels, skipped=skipped)
            files = sorted(p for p in Path(local).iterdir() if p.name != MANIFEST)
            for path in files + [Path(local) / MANIFEST]:  # the manifest last
                storage.upload(path, storage.join(str(out_dir), path.name))
        return manifest
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "dataset": dataset or out_dir.name,
                "class_names": list(class_names), "splits": {}, "skipped": dict(skipped or {})}
    for split in sorted({r.split for r in records}):
        if not split.replace("_", "").isalnum():
            raise ConfigError(f"split: {split!r} must be alphanumeric (used in shard file names)")
        items = sorted((r for r in records if r.split == split), key=lambda r: (r.label, str(r.path)))
        random.Random(seed).shuffle(items)  # deterministic, and every shard mixes classes
        manifest["splits"][split] = _write_split(split, items, len(class_names), class_names, out_dir,
                                                  max_count, max_size, reencode, progress, multi_labels)
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def _write_split(split, items, num_classes, class_names, out_dir, max_count, max_size, reencode, progress,
                 multi_labels=None):
    shards, index_lines = [], []
    class_counts = [0] * num_classes
    iterator: Iterable = items
    if progress:
        from rich.progress import track

        iterator = track(items, description=f"writing {split} shards", transient=True)
    writer = None
    for i, record in enumerate(iterator):
        ext, data = _image_payload(record, reencode)
        if writer is None or writer.count >= max_count or (
                max_size and writer.count and writer.bytes + len(data) + _TAR_OVERHEAD > max_size):
            if writer is not None:
                shards.append(writer.close())
            writer = _ShardWriter(out_dir / f"{split}-{len(shards):06d}.tar")
        if not 0 <= record.label < num_classes:
            raise ConfigError(f"{record.path}: label {record.label} outside 0..{num_classes - 1}")
        key = f"{split}_{i:08d}"
        meta = {"class_name": class_names[record.label], "source": str(record.path), "split": split}
        if multi_labels is not None:
            meta["labels"] = multi_labels.get(str(record.path), [record.label])
        writer.write({"__key__": key, ext: data, "cls": record.label, "json": meta})
        index_lines.append(f"{key}\t{record.label}\t{writer.path.name}")
        class_counts[record.label] += 1
    if writer is not None:
        shards.append(writer.close())
    atomic_write_text(out_dir / f"{split}-index.tsv", "".join(line + "\n" for line in index_lines))
    return {"count": len(items), "class_counts": class_counts, "shards": shards, "index": f"{split}-index.tsv",
            "label": "multi" if multi_labels is not None else "cls"}


#: Bytes a sample adds to a tar beyond its image: three member headers and their 512-byte padding.
_TAR_OVERHEAD = 3 * 1024


class _ShardWriter:
    """One tar shard, written to a temporary file and renamed into place when closed."""

    def __init__(self, path: Path):
        self.path, self.count, self.bytes = path, 0, 0
        self._ctx = atomic_path(path)
        self._tmp = self._ctx.__enter__()
        self._stream = open(self._tmp, "wb")
        self._tar = wds.TarWriter(self._stream, mtime=0)  # fixed mtime: identical inputs give identical bytes

    def write(self, sample: dict) -> None:
        self._tar.write(sample)
        self.bytes = self._stream.tell()  # the real on-disk size so far, headers and padding included
        self.count += 1

    def close(self) -> dict:
        self._tar.close()
        self._stream.close()
        self._ctx.__exit__(None, None, None)
        return {"name": self.path.name, "count": self.count, "bytes": self.path.stat().st_size,
                "crc32": file_crc32(self.path)}


def file_crc32(path: str | Path, block: int = 1 << 20) -> int | None:
    """CRC32 of a local or remote file, read in blocks (recorded per shard;
    `ImageShardDataModule(verify_shards=True)`); None when it cannot be read."""
    crc = 0
    try:
        with storage.open_stream(str(path)) as f:
            while chunk := f.read(block):
                crc = zlib.crc32(chunk, crc)
    except Exception:  # noqa: BLE001 - a missing or unreadable shard fails its check
        return None
    return crc


# -- existing shards --------------------------------------------------------------------------------
def iter_tar_samples(path: str | Path) -> Iterator[dict[str, bytes]]:
    """Group the members of one local tar by key (`storage.samples_of_tar`), no decoding."""
    with open(path, "rb") as f:
        yield from storage.samples_of_tar(f)


def label_of(sample: dict, label: str, class_index: dict[str, int] | None, source: str) -> int:
    """The integer label of a raw sample: ``cls``, ``txt`` (a class name) or ``json:<field>``."""
    try:
        if label == "cls":
            return int(sample["cls"])
        if label == "txt":
            value = sample["txt"].decode().strip()
        elif label.startswith("json:"):
            value = json.loads(sample["json"])[label[5:]]
        else:
            raise ConfigError(f"label: {label!r} must be 'cls', 'txt' or 'json:<field>'")
    except KeyError as e:
        raise UserError(f"{source}: sample {sample['__key__']} has no {e.args[0]!r} for label={label!r}") from None
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit() and not class_index):
        return int(value)
    if class_index is None or value not in class_index:
        raise UserError(f"{source}: sample {sample['__key__']}: label {value!r} is not a known class name")
    return class_index[value]


def index_shards(shards: Sequence[str | Path], out_dir: str | Path, *, split: str = "train", label: str = "cls",
                 class_names: Sequence[str] | None = None) -> dict:
    """Write ``dataset.json`` and ``{split}-index.tsv`` for existing shards (e.g. from img2dataset)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    class_index = {c: i for i, c in enumerate(class_names)} if class_names else None
    entries, lines, labels = [], [], []
    for shard in shards:
        shard = Path(shard)
        count = 0
        try:
            for sample in iter_tar_samples(shard):
                if not any(k in sample for k in IMAGE_KEYS):
                    continue
                y = label_of(sample, label, class_index, str(shard))
                lines.append(f"{sample['__key__']}\t{y}\t{_relative(shard, out_dir)}")
                labels.append(y)
                count += 1
        except (tarfile.TarError, OSError) as e:
            raise UserError(f"{shard}: unreadable tar shard ({e})") from None
        entries.append({"name": _relative(shard, out_dir), "count": count, "bytes": shard.stat().st_size})
    num_classes = len(class_names) if class_names else (max(labels) + 1 if labels else 0)
    counts = [0] * num_classes
    for y in labels:
        counts[y] += 1
    atomic_write_text(out_dir / f"{split}-index.tsv", "".join(line + "\n" for line in lines))
    manifest_path = out_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else \
        {"format": MANIFEST_FORMAT, "version": 1, "splits": {}}
    manifest["class_names"] = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    manifest["splits"][split] = {"count": len(labels), "class_counts": counts, "shards": entries,
                                 "index": f"{split}-index.tsv", "label": label}
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
    return manifest


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path.resolve())


# -- reading manifests ------------------------------------------------------------------------------
@dataclass
class ShardSplit:
    """One split of a shard dataset, as its manifest describes it. ``root`` is a local folder or a URL
    (`datamodules.storage`)."""

    root: str
    name: str
    shards: list[dict]
    count: int
    class_counts: list[int]
    index_file: str
    label: str = "cls"

    @property
    def urls(self) -> list[str]:
        return [storage.join(self.root, s["name"]) for s in self.shards]

    def read_index(self) -> tuple[list[str], list[int], list[str]]:
        """(keys, labels, shard names) in index order; reads the TSV, no image is opened."""
        keys, labels, shards = [], [], []
        try:
            for line in storage.read_text(self.index_file).splitlines():
                key, label, shard = line.split("\t")
                keys.append(key)
                labels.append(int(label))
                shards.append(shard)
        except ValueError as e:
            raise UserError(f"{self.index_file}: unreadable index ({e})") from None
        return keys, labels, shards


def _manifest_location(root: str | Path) -> str:
    root = str(root)
    if root.endswith(".json"):
        return root
    return storage.join(root, MANIFEST)


def read_manifest(root: str | Path) -> dict:
    """The shard manifest of ``root`` (a folder or URL holding ``dataset.json``, or the file itself)."""
    path = _manifest_location(root)
    if not storage.exists(path):
        raise ConfigError(f"{path}: shard manifest not found (write shards with `python -m datamodules.shards`)")
    try:
        manifest = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: malformed shard manifest ({e})") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ConfigError(f"{path}: not a {MANIFEST_FORMAT} manifest")
    return manifest


def load_split(root: str | Path, split: str) -> tuple[ShardSplit, list[str]]:
    """The manifest entry of ``split`` under ``root`` and the dataset's class names."""
    manifest = read_manifest(root)
    location = _manifest_location(root)
    base = storage.parent(location)
    if split not in manifest["splits"]:
        raise ConfigError(f"{location}: no split {split!r} (has: {', '.join(sorted(manifest['splits']))})")
    entry = manifest["splits"][split]
    return ShardSplit(base, split, entry["shards"], entry["count"], entry["class_counts"],
                      storage.join(base, entry["index"]), entry.get("label", "cls")), manifest["class_names"]


# -- command line ------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m datamodules.shards", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="source", required=True)
    for name, helptext in [("folder", "an image folder <class>/<file>"), ("csv", "a CSV with path,label[,split]"),
                           ("coop", "a CoOp split_zhou_*.json")]:
        s = sub.add_parser(name, help=helptext)
        s.add_argument("src")
        s.add_argument("--out", required=True, help="output directory for shards, dataset.json and index files")
        s.add_argument("--split", default="train", help="split name for folder/CSV sources without a split column")
        s.add_argument("--fractions", help="split each class, e.g. 'train=0.5,val=0.2,test=0.3' (sources without "
                                           "their own splits)")
        s.add_argument("--skip_empty_classes", action="store_true",
                       help="folder source: leave out class folders without images (an error otherwise)")
        s.add_argument("--image_root", help="base folder of relative image paths (CSV: defaults to its folder)")
        s.add_argument("--max_count", type=int, default=1000, help="samples per shard")
        s.add_argument("--max_size", type=float, default=None,
                       help="bytes per shard, whichever limit comes first (plus up to 11 KiB of tar end padding)")
        s.add_argument("--seed", type=int, default=0, help="seed of the deterministic sample order")
        s.add_argument("--reencode", action="store_true", help="re-encode non-JPEG images as JPEG")
        s.add_argument("--dataset", help="dataset name recorded in the manifest (selects prompt templates)")
    s = sub.add_parser("index", help="write dataset.json + index for existing shards (e.g. img2dataset)")
    s.add_argument("shards", nargs="+", help="tar files or brace patterns ('dir/{00000..00009}.tar')")
    s.add_argument("--out", required=True)
    s.add_argument("--split", default="train")
    s.add_argument("--label", default="cls", help="'cls', 'txt' (class name) or 'json:<field>'")
    s.add_argument("--class_names", help="text file with one class name per line (label order)")
    args = p.parse_args(argv)
    try:
        if args.source == "index":
            urls = [u for pattern in args.shards for u in wds.shardlists.expand_urls(pattern)]
            names = Path(args.class_names).read_text().splitlines() if args.class_names else None
            manifest = index_shards(urls, args.out, split=args.split, label=args.label, class_names=names)
        else:
            skipped: dict = {}
            if args.source == "folder":
                records, names = from_folder(args.src, args.split, args.skip_empty_classes, skipped)
            elif args.source == "csv":
                records, names = from_csv(args.src, args.image_root, args.split)
            else:
                if not args.image_root:
                    raise ConfigError("--image_root: required for CoOp split files")
                records, names = from_coop_split(args.src, args.image_root)
            if args.fractions:
                if args.source == "coop" or len({r.split for r in records}) > 1:
                    raise ConfigError(f"--fractions: {args.src} already assigns splits; drop --fractions (or the "
                                      "split column)")
                records = partition(records, parse_fractions(args.fractions), args.seed)
            manifest = write_shards(records, names, args.out, max_count=args.max_count,
                                    max_size=int(args.max_size) if args.max_size else None, seed=args.seed,
                                    reencode=args.reencode, progress=sys.stderr.isatty(), dataset=args.dataset,
                                    skipped=skipped)
    except (UserError, OSError) as e:
        print(f"datamodules.shards: error: {e}", file=sys.stderr)
        return 2
    for split, entry in manifest["splits"].items():
        print(f"{split}: {entry['count']} samples in {len(entry['shards'])} shards")
    left_out = {k: v for k, v in manifest.get("skipped", {}).items() if v}
    if left_out:
        print(f"left out: {left_out}")
    print(f"manifest: {Path(args.out) / MANIFEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
