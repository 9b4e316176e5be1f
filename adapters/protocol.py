"""The few-shot evaluation protocol shared by the literature (CoOp / Tip-Adapter / GDA / CODER).

Prompt templates per dataset, the 7-template ImageNet ensemble, Tip-Adapter's per-dataset search
ranges, and the seeded K-shot sampler. Source: ../shared/reference/methods-coder-gda-iso.md §1-§2.
"""
from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adapters.errors import ConfigError

#: CLIP's selected 7-template ImageNet ensemble (CoOp ``IMAGENET_TEMPLATES_SELECT``).
IMAGENET_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

DEFAULT_TEMPLATE = "a photo of a {}."

#: Single per-dataset templates of Tip-Adapter/CoOp (``CUSTOM_TEMPLATES``).
DATASET_TEMPLATES: dict[str, tuple[str, ...]] = {
    "caltech101": ("a photo of a {}.",),
    "oxford_pets": ("a photo of a {}, a type of pet.",),
    "stanford_cars": ("a photo of a {}.",),
    "oxford_flowers": ("a photo of a {}, a type of flower.",),
    "food101": ("a photo of {}, a type of food.",),
    "fgvc": ("a photo of a {}, a type of aircraft.",),
    "sun397": ("a photo of a {}.",),
    "dtd": ("{} texture.",),
    "eurosat": ("a centered satellite photo of {}.",),
    "ucf101": ("a photo of a person doing {}.",),
    "imagenet": IMAGENET_TEMPLATES,
}

_ALIASES = {
    "caltech": "caltech101", "caltech-101": "caltech101",
    "pets": "oxford_pets", "oxfordpets": "oxford_pets", "oxford-pet": "oxford_pets",
    "cars": "stanford_cars", "stanfordcars": "stanford_cars",
    "flowers": "oxford_flowers", "flowers102": "oxford_flowers", "oxfordflowers": "oxford_flowers",
    "food": "food101", "food-101": "food101",
    "fgvcaircraft": "fgvc", "fgvc_aircraft": "fgvc", "aircraft": "fgvc",
    "sun": "sun397",
    "describabletextures": "dtd",
    "ucf": "ucf101",
    "imagenet1k": "imagenet", "imagenet-1k": "imagenet",
}


def canonical_dataset(name: str | None) -> str | None:
    """Map a dataset name to the protocol's canonical key (``Caltech-101`` -> ``caltech101``)."""
    if not name:
        return None
    key = re.sub(r"[\s]+", "_", name.strip().lower())
    return _ALIASES.get(key, _ALIASES.get(key.replace("_", ""), key))


def templates_for(dataset: str | None) -> tuple[str, ...]:
    """The protocol's templates for ``dataset``; CLIP's generic template when the dataset is unknown."""
    return DATASET_TEMPLATES.get(canonical_dataset(dataset) or "", (DEFAULT_TEMPLATE,))


@dataclass(frozen=True)
class TipSearchConfig:
    """Tip-Adapter's per-dataset search ranges (``configs/*.yaml`` of the official code)."""

    beta_scale: float
    alpha_scale: float
    init_alpha: float
    init_beta: float = 1.0


TIP_SEARCH: dict[str, TipSearchConfig] = {
    "caltech101": TipSearchConfig(12, 5, 3),
    "dtd": TipSearchConfig(13, 13, 2),
    "eurosat": TipSearchConfig(12, 10, 2),
    "fgvc": TipSearchConfig(30, 30, 5),
    "food101": TipSearchConfig(10, 10, 1.17),
    "imagenet": TipSearchConfig(7, 3, 1.17),
    "oxford_flowers": TipSearchConfig(50, 50, 10),
    "oxford_pets": TipSearchConfig(7, 3, 1.17),
    "stanford_cars": TipSearchConfig(20, 10, 3),
    "sun397": TipSearchConfig(12, 10, 1.17),
    "ucf101": TipSearchConfig(7, 3, 3),
}
#: For datasets outside the protocol: the widest common range, so the search is not truncated.
TIP_SEARCH_DEFAULT = TipSearchConfig(20, 10, 3)


def tip_search_config(dataset: str | None) -> TipSearchConfig:
    return TIP_SEARCH.get(canonical_dataset(dataset) or "", TIP_SEARCH_DEFAULT)


def few_shot_indices(labels: Sequence[int] | torch.Tensor, shots: int, seed: int) -> torch.Tensor:
    """Indices of a K-shot subset: ``random.sample(items_of_class, K)`` per class after
    ``random.seed(seed)``, classes in label order (Dassl's ``generate_fewshot_dataset`` without
    repeats: a class with fewer than K items keeps all of them). Deterministic in (labels, shots, seed).
    """
    if shots < 1:
        raise ConfigError(f"shots: must be >= 1, got {shots}")
    labels = torch.as_tensor(labels).tolist()
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    rng = random.Random(seed)
    picked: list[int] = []
    for y in sorted(by_class):
        items = by_class[y]
        picked.extend(items if len(items) <= shots else rng.sample(items, shots))
    return torch.tensor(sorted(picked), dtype=torch.long)


# -- selection protocols ------------------------------------------------------------------------------------
#: How hyper-parameters (and epochs, heads) are chosen: on the whole val split (``full``: the protocol of
#: Tip-Adapter, GDA and most tables), or on a few-shot val (``realistic``: min(K, 4) images per class,
#: CoOp's rule; cross-validation on the training shots when the file has no val).
PROTOCOLS = ("full", "realistic")


def realistic_val_shots(shots: int) -> int:
    """Val images per class under the realistic protocol: CoOp's ``min(K, 4)``."""
    return min(shots, 4)


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol: must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    return protocol


def cross_validation_folds(labels: torch.Tensor, folds: int) -> list[torch.Tensor]:
    """``folds`` disjoint held-out index sets covering every sample: the i-th shot of each class (in index
    order) goes to fold ``i % folds``, so every fold holds out a share of every class."""
    labels = torch.as_tensor(labels)
    rank = torch.zeros_like(labels)
    for c in labels.unique():
        where = torch.nonzero(labels == c).flatten()
        rank[where] = torch.arange(len(where))
    return [torch.nonzero(rank % folds == f).flatten() for f in range(folds)]


# -- Dassl's few-shot split files ---------------------------------------------------------------------------
class _Datum:
    """Stands in for ``dassl.data.datasets.base_dataset.Datum`` when reading its pickles (no Dassl needed)."""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    @property
    def impath(self) -> str:
        return self.__dict__.get("_impath", self.__dict__.get("impath", ""))

    @property
    def label(self) -> int:
        return int(self.__dict__.get("_label", self.__dict__.get("label", -1)))


class _DasslUnpickler:
    """Unpickles Dassl's ``split_fewshot/shot_{K}-seed_{S}.pkl`` without importing Dassl, and without
    executing anything else: only Datum records, plain containers and object reconstruction load."""

    ALLOWED = {("copyreg", "_reconstructor"), ("builtins", "object"), ("collections", "OrderedDict")}

    @classmethod
    def load(cls, path: str):
        import pickle

        class Unpickler(pickle.Unpickler):
            def find_class(self, module: str, name: str):
                if module.startswith("dassl") and name == "Datum":
                    return _Datum
                if (module, name) in cls.ALLOWED:
                    return getattr(__import__(module), name)
                raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

        with open(path, "rb") as f:
            return Unpickler(f).load()


def read_dassl_fewshot(path: str) -> dict[str, list[tuple[str, int]]]:
    """``{"train": [(impath, label)], "val": [...]}`` from one of Dassl's few-shot split files, the
    exact subsets CoOp (and everything built on it) trains and validates on."""
    import pickle

    try:
        data = _DasslUnpickler.load(path)
    except FileNotFoundError:
        raise ConfigError(f"fewshot_dir: {path} does not exist (Dassl writes split_fewshot/shot_K-seed_S.pkl)") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
        raise ConfigError(f"fewshot_dir: {path} is not a Dassl few-shot split file ({e})") from None
    if not isinstance(data, dict) or "train" not in data:
        raise ConfigError(f"fewshot_dir: {path} has no 'train' list (not a Dassl few-shot split file)")
    return {split: [(d.impath, d.label) for d in items] for split, items in data.items() if isinstance(items, list)}


def _path_tail(path: str, parts: int) -> str:
    stem = path.replace("\\", "/").rsplit(".", 1)[0] if "." in path.rsplit("/", 1)[-1] else path.replace("\\", "/")
    return "/".join(stem.split("/")[-parts:])


def match_samples(items: Sequence[tuple[str, int]], keys: Sequence[str], labels: torch.Tensor, where: str) -> torch.Tensor:
    """Indices into a split whose sample keys are ``keys`` of the listed (image path, label) items,
    matched on the image path's last two components without extension (``class_dir/image``), else the
    file name; a missing image or a label that disagrees is one error naming it."""
    for parts in (2, 1):
        index: dict[str, int] = {}
        for i, k in enumerate(keys):
            index.setdefault(_path_tail(k, parts), i)
        found = [index.get(_path_tail(p, parts)) for p, _ in items]
        if all(f is not None for f in found):
            break
    else:
        missing = next(p for (p, _), f in zip(items, found) if f is None)
        raise ConfigError(f"fewshot_dir: {missing} (listed in the split file) is not in {where}")
    idx = torch.tensor(found, dtype=torch.long)
    wrong = [(p, y, int(labels[i])) for (p, y), i in zip(items, found) if int(labels[i]) != y]
    if wrong:
        path, listed, here = wrong[0]
        raise ConfigError(f"fewshot_dir: {path} has label {listed} in the split file, {here} in {where}")
    return idx
