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
