"""Feature files: cached CLIP embeddings, read memory-mapped. The format, without Lightning.

Format (safetensors, the format of ``../shared/data/clip-vit-b32-features``):

==========================  ==========  =========================================
key                         shape       dtype
==========================  ==========  =========================================
``{split}.features``        [N, D]      float16 (L2-normalised)
``{split}.labels``          [N]         int64
``{split}.keys``            [N, L]      uint8, optional sample keys (zero-padded bytes)
``{split}.<name>``          [N, ...]    optional per-sample tensors stored by a method at extraction
                                        (``preproj``: pre-projection features; ``adapted``: an
                                        adapted encoder's embeddings)
``text.features``           [C, D]      float16, optional zero-shot classifier
``<prefix>.<name>``         any         optional file-level tensors of a method (``coder.*``)
==========================  ==========  =========================================

Metadata (str -> str): ``backbone``, ``pretrained``, ``dim``, ``num_classes``, ``dataset``,
``normalized``, optional ``class_names`` (a JSON list), ``crc32`` (per-tensor checksums) and anything
else the writer adds. Split names are free-form without dots: ``train``, ``val``, ``test``,
``train_16shot`` ...

A large extraction is a directory of per-rank part files plus ``manifest.json``
(``{"format": "clip-adapters-features", "parts": [...], "metadata": {...}}``); `FeatureFile` reads
both forms through one interface.
"""
from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from adapters.atomic import atomic_path
from adapters.data import Split
from adapters.errors import ConfigError, FeatureFileError
from adapters.protocol import check_protocol, few_shot_indices, match_samples, read_dassl_fewshot, realistic_val_shots

FEATURES = "{}.features"
LABELS = "{}.labels"
KEYS = "{}.keys"
#: Fields of a split that are not per-sample extras.
_SPLIT_FIELDS = ("features", "labels", "keys")
TEXT_KEY = "text.features"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "clip-adapters-features"

_NP_DTYPES = {"F16": np.float16, "BF16": None, "F32": np.float32, "F64": np.float64,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "U8": np.uint8, "I8": np.int8}


def _split_names(keys) -> set[str]:
    return {k[: -len(".features")] for k in keys if k.endswith(".features") and k != TEXT_KEY}


def _split_of(key: str, splits: set[str]) -> str | None:
    """The split a tensor belongs to (``train.preproj`` -> ``train``), or None for file-level tensors."""
    prefix = key.split(".", 1)[0]
    return prefix if key != TEXT_KEY and prefix in splits else None


def _mmap_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Map every tensor of a safetensors file without reading it into memory.

    safetensors' ``safe_open`` validates the header; the data offsets it documents are then mapped
    with ``np.memmap`` (copy-on-write, so no page is read until used and nothing is ever written back).
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise FeatureFileError(f"{path}: not a safetensors feature file ({str(e).splitlines()[0]})") from None
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
    base = 8 + header_len
    tensors = {}
    for key in keys:
        info = header[key]
        dtype = _NP_DTYPES.get(info["dtype"])
        start, end = info["data_offsets"]
        if dtype is None:  # no numpy dtype (bf16): read through safetensors instead
            with safe_open(str(path), framework="pt") as f:
                tensors[key] = f.get_tensor(key)
            continue
        shape = tuple(info["shape"])
        if end == start:
            tensors[key] = torch.from_numpy(np.zeros(shape, dtype=dtype))
        else:
            tensors[key] = torch.from_numpy(np.memmap(path, dtype=dtype, mode="c", offset=base + start, shape=shape))
    return tensors, metadata


class FeatureFile:
    """Read access to a feature file (or a directory of parts with ``manifest.json``).

    Raises `FeatureFileError` with the path in a one-line message for a missing file, a file that is
    not a feature file, features without labels, or inconsistent dimensions.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise FeatureFileError(f"{self.path}: no such feature file")
        if self.path.is_dir():
            self._tensors, self.metadata = self._read_parts(self.path)
        else:
            self._tensors, self.metadata = _mmap_tensors(self.path)
        self._validate()

    @staticmethod
    def _read_parts(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        manifest_path = directory / MANIFEST
        if not manifest_path.is_file():
            raise FeatureFileError(f"{directory}: directory has no {MANIFEST} (not a feature directory)")
        try:
            manifest = json.loads(manifest_path.read_text())
            parts = [directory / p for p in manifest["parts"]]
            metadata = {str(k): str(v) for k, v in manifest.get("metadata", {}).items()}
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise FeatureFileError(f"{manifest_path}: malformed manifest ({e})") from None
        if manifest.get("format") != MANIFEST_FORMAT:
            raise FeatureFileError(f"{manifest_path}: format is not {MANIFEST_FORMAT!r}")
        pieces: dict[str, list[torch.Tensor]] = {}
        for part in parts:
            if not part.is_file():
                raise FeatureFileError(f"{part}: part file listed in {manifest_path} is missing")
            part_file = FeatureFile(part)
            part_file.verify()
            tensors = part_file._tensors
            for k, v in tensors.items():
                pieces.setdefault(k, []).append(v)
        # Text features and other file-level tensors come from the first part that has them; per-sample
        # tensors are concatenated and, when the parts carry sample keys, put in key order: the result
        # does not depend on how many ranks wrote.
        splits = _split_names(pieces)
        merged = {}
        for k, v in pieces.items():
            if _split_of(k, splits) is None:
                merged[k] = v[0]
            elif k.endswith(".keys"):
                width = max(t.shape[1] for t in v)
                merged[k] = torch.cat([F.pad(t, (0, width - t.shape[1])) for t in v])
            else:
                merged[k] = torch.cat(v)
        for k in [k for k in merged if k.endswith(".keys")]:
            split = k[: -len(".keys")]
            order = sorted(range(len(merged[k])), key=decode_keys(merged[k]).__getitem__)
            index = torch.tensor(order, dtype=torch.long)
            for name in [n for n in merged if _split_of(n, splits) == split]:
                merged[name] = merged[name][index]
        return merged, metadata

    def _validate(self) -> None:
        splits = self.splits
        if not splits:
            raise FeatureFileError(f"{self.path}: not a feature file (no '<split>.features' tensors)")
        dims = set()
        for s in splits:
            feats = self._tensors[FEATURES.format(s)]
            labels = self._tensors.get(LABELS.format(s))
            if labels is None:
                raise FeatureFileError(f"{self.path}: split {s!r} has features but no '{LABELS.format(s)}'")
            if feats.ndim != 2:
                raise FeatureFileError(f"{self.path}: '{FEATURES.format(s)}' must be 2-D [N, D], got {tuple(feats.shape)}")
            if labels.ndim != 1 or labels.dtype.is_floating_point:
                raise FeatureFileError(f"{self.path}: '{LABELS.format(s)}' must be 1-D integer labels")
            if len(labels) != len(feats):
                raise FeatureFileError(
                    f"{self.path}: split {s!r} has {len(feats)} feature rows but {len(labels)} labels")
            for key, value in self._tensors.items():
                if _split_of(key, set(splits)) == s and (value.ndim == 0 or len(value) != len(feats)):
                    raise FeatureFileError(f"{self.path}: '{key}' has {len(value) if value.ndim else 0} rows, "
                                           f"split {s!r} has {len(feats)}")
            dims.add(feats.shape[1])
        text = self._tensors.get(TEXT_KEY)
        if text is not None:
            dims.add(text.shape[-1])
        if "dim" in self.metadata and self.metadata["dim"].isdigit():
            dims.add(int(self.metadata["dim"]))
        # parse the structured metadata once, here: a damaged field is an error naming the file
        self._class_names = self._json_field("class_names", list)
        self._crc32 = self._json_field("crc32", dict) or {}
        if "num_classes" in self.metadata and not self.metadata["num_classes"].isdigit():
            raise FeatureFileError(f"{self.path}: metadata 'num_classes' is not a number")
        if len(dims) > 1:
            raise FeatureFileError(f"{self.path}: dimension mismatch between splits/text/metadata: {sorted(dims)}")
        self.dim = dims.pop()

    # -- description ------------------------------------------------------------------------------
    @property
    def splits(self) -> list[str]:
        return sorted(k[: -len(".features")] for k in self._tensors if k.endswith(".features") and k != TEXT_KEY)

    @property
    def dataset(self) -> str:
        return self.metadata.get("dataset") or self.path.stem

    @property
    def num_classes(self) -> int:
        if "num_classes" in self.metadata:
            return int(self.metadata["num_classes"])
        if self.text_features is not None:
            return len(self.text_features)
        return int(max(int(self._tensors[LABELS.format(s)].max()) for s in self.splits if len(self.labels(s))) + 1)

    def _json_field(self, key: str, kind: type):
        raw = self.metadata.get(key)
        if not raw:
            return None
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            raise FeatureFileError(f"{self.path}: metadata '{key}' is not valid JSON (corrupt file)") from None
        if not isinstance(value, kind):
            raise FeatureFileError(f"{self.path}: metadata '{key}' is not a {kind.__name__}")
        return value

    @property
    def class_names(self) -> list[str] | None:
        return self._class_names

    @property
    def text_features(self) -> torch.Tensor | None:
        """The zero-shot classifier [C, D] stored with the features, or None."""
        return self._tensors.get(TEXT_KEY)

    def has_split(self, split: str) -> bool:
        return FEATURES.format(split) in self._tensors

    def verify(self, splits: Sequence[str] | None = None, chunk_rows: int = 65536) -> None:
        """Check the data, not just the header: every tensor against the CRC32 the writer recorded (files
        written by this project), and the features of ``splits`` (default: all) for NaN/inf. Reads the
        data once, in chunks; raises `FeatureFileError` naming the file and key."""
        if self.path.is_dir():
            return  # parts are verified one by one
        if self.metadata.get("format") == MANIFEST_FORMAT and set(self._crc32) != set(self._tensors):
            raise FeatureFileError(f"{self.path}: checksum record missing or incomplete (corrupt file)")
        for key, expected in self._crc32.items():
            if key in self._tensors and _crc32(self._tensors[key]) != expected:
                raise FeatureFileError(f"{self.path}: '{key}' fails its checksum (corrupt or modified file)")
        for split in splits if splits is not None else self.splits:
            feats = self.features(split)
            for start in range(0, len(feats), chunk_rows):
                if not torch.isfinite(feats[start:start + chunk_rows].float()).all():
                    raise FeatureFileError(f"{self.path}: '{FEATURES.format(split)}' has NaN or infinite values")
            labels = self.labels(split)
            if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
                raise FeatureFileError(f"{self.path}: '{LABELS.format(split)}' has labels outside 0..{self.num_classes - 1}")

    @property
    def extras(self) -> dict[str, torch.Tensor]:
        """File-level tensors beyond splits and the text classifier, by full name (methods' stores)."""
        splits = set(self.splits)
        return {k: v for k, v in self._tensors.items() if _split_of(k, splits) is None and k != TEXT_KEY}

    def keys(self, split: str) -> list[str] | None:
        """Sample keys of ``split`` (extractions store them), or None."""
        self._require(split)
        matrix = self._tensors.get(KEYS.format(split))
        return None if matrix is None else decode_keys(matrix)

    # -- access -----------------------------------------------------------------------------------
    def features(self, split: str) -> torch.Tensor:
        self._require(split)
        return self._tensors[FEATURES.format(split)]

    def labels(self, split: str) -> torch.Tensor:
        self._require(split)
        return self._tensors[LABELS.format(split)].long()

    def split(self, split: str) -> Split:
        """Features and labels of ``split``, with its per-sample extras (``Split.extra``, by name)."""
        self._require(split)
        prefix = f"{split}."
        extra = {k[len(prefix):]: v for k, v in self._tensors.items()
                 if k.startswith(prefix) and k[len(prefix):] not in _SPLIT_FIELDS}
        return Split(self.features(split), self.labels(split), split, extra)

    def _require(self, split: str) -> None:
        if not self.has_split(split):
            raise FeatureFileError(f"{self.path}: no split {split!r} (has: {', '.join(self.splits)})")

    def train_split(self, shots: int | None, seed: int = 1) -> tuple[Split, str]:
        """The few-shot training set and a description of where it came from.

        ``train_{K}shot`` is used as stored when the file has it (its subset is fixed by the file);
        otherwise K samples per class are drawn from ``train`` with ``seed`` (`few_shot_indices`).
        ``shots=None`` means the whole ``train`` split.
        """
        if shots and self.has_split(f"train_{shots}shot"):
            return self.split(f"train_{shots}shot"), f"train_{shots}shot (subset fixed in file)"
        if not self.has_split("train"):
            wanted = f"'train_{shots}shot' or 'train'" if shots else "'train'"
            raise FeatureFileError(f"{self.path}: no split {wanted} for shots={shots} (has: {', '.join(self.splits)})")
        full = self.split("train")
        if not shots:
            return full, "train (all samples)"
        counts = torch.bincount(full.labels, minlength=self.num_classes)
        short = [int(c) for c in torch.nonzero(counts < shots).flatten() if counts[c] > 0]
        if short:
            c = short[0]
            raise ConfigError(
                f"shots: {shots} is larger than the {int(counts[c])} samples of class {c} in {self.path}:train")
        idx = few_shot_indices(full.labels, shots, seed)
        return full.subset(idx, f"train_{shots}shot_seed{seed}"), f"train, {shots} per class, seed {seed}"


    def dassl_split(self, pkl: str, split: str = "train") -> tuple[Split, str]:
        """The subset of this file's ``split`` that one of Dassl's few-shot split files lists (its
        ``train`` or ``val`` list): CoOp's exact K-shot subsets. Matched on the stored sample keys."""
        items = read_dassl_fewshot(pkl).get(split)
        if items is None:
            raise ConfigError(f"fewshot_dir: {pkl} has no {split!r} list")
        keys = self.keys(split)
        if keys is None:
            raise FeatureFileError(f"{self.path}: '{split}' has no sample keys to match {pkl} against "
                                   "(extract with this project, which stores them)")
        full = self.split(split)
        idx = match_samples(items, keys, full.labels, f"{self.path}:{split}")
        return full.subset(idx, split if split == "val" else f"{split}_{Path(pkl).stem}"), \
            f"{split}, as listed in {Path(pkl).name}"

    def selection_split(self, protocol: str = "full", shots: int | None = None, seed: int = 1,
                        fewshot_pkl: str | None = None) -> tuple[Split | None, str]:
        """The split hyper-parameters are chosen on, and its description: the whole ``val`` (``full``), or
        under ``realistic`` min(K, 4) val images per class drawn with ``seed`` (or the val list of Dassl's
        split file when given, which CoOp draws by the same rule). None when the file has no val."""
        check_protocol(protocol)
        if not self.has_split("val"):
            return None, "none (the file has no val split)"
        if protocol == "full" or not shots:
            return self.split("val"), "val"
        if fewshot_pkl is not None:
            return self.dassl_split(fewshot_pkl, "val")
        k = realistic_val_shots(shots)
        val = self.split("val")
        # named "val" still: it is part of val, and no record may be scored on any of it
        return val.subset(few_shot_indices(val.labels, k, seed)), f"val, {k} per class (min(K, 4)), seed {seed}"

    def fewshot(self, shots: int | None, seed: int = 1, protocol: str = "full",
                fewshot_dir: str | None = None) -> tuple[Split, str, Split | None, str]:
        """(train, its description, selection split or None, its description) of one few-shot cell:
        `train_split` and `selection_split`, or, with ``fewshot_dir`` (Dassl's ``split_fewshot``
        folder), the train and val lists of its ``shot_{K}-seed_{S}.pkl``."""
        pkl = None if fewshot_dir is None or not shots else str(Path(fewshot_dir) / f"shot_{shots}-seed_{seed}.pkl")
        train, train_desc = self.dassl_split(pkl, "train") if pkl else self.train_split(shots, seed)
        val, val_desc = self.selection_split(protocol, shots, seed, pkl)
        return train, train_desc, val, val_desc


def _crc32(tensor: torch.Tensor) -> int:
    """CRC32 of a tensor's dtype, shape and bytes (a header flip that reinterprets the bytes also fails)."""
    head = zlib.crc32(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    return zlib.crc32(tensor.contiguous().view(torch.uint8).numpy().tobytes(), head) if tensor.numel() else head


def encode_keys(keys: Sequence[str]) -> torch.Tensor:
    """Sample keys as a zero-padded uint8 matrix [N, L] (safetensors stores no strings)."""
    raw = [k.encode() for k in keys]
    width = max((len(r) for r in raw), default=1)
    out = np.zeros((len(raw), width), dtype=np.uint8)
    for i, r in enumerate(raw):
        out[i, :len(r)] = np.frombuffer(r, dtype=np.uint8)
    return torch.from_numpy(out)


def decode_keys(matrix: torch.Tensor) -> list[str]:
    return [bytes(row).rstrip(b"\0").decode() for row in matrix.numpy()]


def write_feature_file(
    path: str | Path,
    splits: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    text_features: torch.Tensor | None = None,
    metadata: Mapping[str, object] | None = None,
    class_names: list[str] | None = None,
    keys: Mapping[str, Sequence[str]] | None = None,
    rows: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    extras: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write a feature file atomically (features as fp16, labels as int64).

    ``splits`` maps a split name to ``(features [N, D], labels [N])``; ``keys`` optionally maps a split
    to its sample keys (stored as ``{split}.keys``, uint8 [N, L]); ``rows`` maps a split to per-sample
    tensors by name (``{split}.<name>``, in the dtype given: the producer chooses, e.g. fp16 for
    embeddings and float32 for norms); ``extras`` are file-level tensors
    (a method's text set, projectors), named with the method's prefix.
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    dims = set()
    for name, (feats, labels) in splits.items():
        if "." in name:
            raise ConfigError(f"split name {name!r} must not contain '.'")
        if feats.ndim != 2 or len(feats) != len(labels):
            raise FeatureFileError(f"{path}: split {name!r}: features {tuple(feats.shape)} vs labels {tuple(labels.shape)}")
        # clone: safetensors refuses tensors that share storage (e.g. two splits sliced from one tensor)
        tensors[FEATURES.format(name)] = feats.detach().to("cpu", torch.float16).clone()
        tensors[LABELS.format(name)] = labels.detach().to("cpu", torch.int64).clone()
        dims.add(feats.shape[1])
    for name, split_keys in (keys or {}).items():
        if len(split_keys) != len(splits[name][1]):
            raise FeatureFileError(f"{path}: split {name!r}: {len(split_keys)} keys for {len(splits[name][1])} samples")
        tensors[KEYS.format(name)] = encode_keys(split_keys)
    for split, named in (rows or {}).items():
        for name, values in named.items():
            if name in _SPLIT_FIELDS or "." in name or len(values) != len(splits[split][1]):
                raise FeatureFileError(f"{path}: per-sample tensor {split}.{name}: bad name or "
                                       f"{len(values)} rows for {len(splits[split][1])} samples")
            tensors[f"{split}.{name}"] = values.detach().cpu().contiguous().clone()
    for name, value in (extras or {}).items():
        if _split_of(name, set(splits)) is not None or name == TEXT_KEY:
            raise ConfigError(f"extras: {name!r} collides with a split or text key")
        tensors[name] = value.detach().cpu().contiguous().clone()
    if text_features is not None:
        tensors[TEXT_KEY] = text_features.detach().to("cpu", torch.float16).clone()
        dims.add(text_features.shape[1])
    if len(dims) != 1:
        raise FeatureFileError(f"{path}: dimension mismatch between splits/text: {sorted(dims)}")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    # per-tensor CRC32s (of dtype, shape and bytes): `FeatureFile.verify` detects bit rot and truncation
    # that still parse; the format marker says the record must be there
    meta["format"] = MANIFEST_FORMAT
    meta["crc32"] = json.dumps({k: _crc32(v) for k, v in tensors.items()})
    meta.setdefault("dim", str(dims.pop()))
    meta.setdefault("normalized", "l2")
    if class_names is not None:
        meta["class_names"] = json.dumps(list(class_names))
        meta.setdefault("num_classes", str(len(class_names)))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path
