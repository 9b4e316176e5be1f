"""CODER's text sets: the General Text Set and the One-to-One Text Sets (methods-coder-gda-iso.md §3.2-§3.3).

Sources, all local files (no network at run time):

* class names (from the data) and **synonyms**: ``[{"class_name": c, "syno": [...]}, ...]`` (CODER's
  format) or ``{c: [...]}``;
* **attributes** and **analogous classes**: ``{c: [...]}`` or a list with one list per class in label
  order (CODER's ``attribute/<ds>.pkl`` / ``simile_class/<ds>.pkl`` saved as JSON);
* **descriptions**: CuPL-style ``{c: [full sentences]}``, used as they are (no template);
* **one-to-one attributes**: ``{c1: {c2: [attributes of c1 that tell it from c2]}}``.

Each entry is rendered through the reference's templates (§3.3, per dataset, few-shot or zero-shot
variants), stripped, de-duplicated per class; analogous classes whose CLIP text similarity to another
class name exceeds ``analogous_threshold`` (0.9) are dropped (the reference's "repeat" filter; it used
ViT-L/14, here the backbone being evaluated). How to produce the files with an LLM: see the README.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from adapters.errors import ConfigError
from adapters.protocol import canonical_dataset

KINDS = ("name", "syno", "att", "ana", "desc")

# §3.3 templates. name/syno share one template per dataset.
NAME_TEMPLATES = {
    "eurosat": "a photo of {c}, satellite domain.", "food101": "a photo of {c}, a type of food.",
    "oxford_flowers": "a photo of a {c}, a type of flower.", "fgvc": "a photo of a {c}, a type of aircraft.",
    "oxford_pets": "a photo of a {c}, a type of pet.", "ucf101": "a photo of a person doing {c}.",
}
NAME_DEFAULT = "a photo of {c}"
ATT_TEMPLATES = {"eurosat": "A satellite photo of {c} which has {a}.", "food101": "A food photo of {c} which has {a}."}
ATT_ZERO_SHOT = {"oxford_pets": "A pet photo of {c} which has {a}.",
                 "dtd": "The texture of {c} is characterized by its {a} feature."}
ATT_DEFAULT = "{c} which has {a}"
ANA_TEMPLATES = {"eurosat": "A satellite photo of a {c} similar to {x}.", "food101": "A food photo of a {c} similar to {x}."}
ANA_ZERO_SHOT = {"oxford_pets": "A pet photo of a {c} similar to {x}.",
                 "dtd": "The texture of {c} bears a likeness to that of {x} ."}
ANA_DEFAULT = "a {c} similar to {x}."
#: One-to-one templates. The reference renders each attribute through a per-dataset set (7 by default;
#: EuroSAT 8, Pets 4, Food 4, Places 2, CUB 11, DTD 3), of which the reference notes give only these two
#: strings (methods-coder-gda-iso.md §3.3); we use exactly these for every dataset rather than invent
#: the rest. The mean similarity to a pair's texts therefore averages over 2 renderings, not 7.
OVO_TEMPLATES = (
    "Because of {a}, {c} is different from {o}.",
    "{c} stands out in {a} compared to {o}.",
)


def _read_json(path: str | Path) -> object:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read text-set file ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None


def load_per_class(path: str | Path, class_names: Sequence[str]) -> dict[int, list[str]]:
    """``{class: [strings]}``, a per-class list of lists, or CODER's synonym records -> {label: [...]}."""
    data = _read_json(path)
    index = {c: i for i, c in enumerate(class_names)}
    index.update({c.replace("_", " "): i for i, c in enumerate(class_names)})
    out: dict[int, list[str]] = {}
    if isinstance(data, list) and all(isinstance(d, dict) and "class_name" in d for d in data):
        data = {d["class_name"]: d.get("syno", []) for d in data}
    if isinstance(data, list):
        if len(data) != len(class_names):
            raise ConfigError(f"{path}: a list needs one entry per class ({len(class_names)}), got {len(data)}")
        items = enumerate(data)
    elif isinstance(data, dict):
        items = []
        for name, values in data.items():
            if name not in index:
                raise ConfigError(f"{path}: unknown class {name!r}")
            items.append((index[name], values))
    else:
        raise ConfigError(f"{path}: expected {{class: [strings]}} or a list per class")
    for label, values in items:
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ConfigError(f"{path}: entry of class {class_names[label]!r} must be a list of strings")
        out[label] = values
    return out


def load_one_to_one(path: str | Path, class_names: Sequence[str]) -> dict[tuple[int, int], list[str]]:
    data = _read_json(path)
    index = {c: i for i, c in enumerate(class_names)}
    index.update({c.replace("_", " "): i for i, c in enumerate(class_names)})
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected {{class: {{other class: [attributes]}}}}")
    out = {}
    for c1, others in data.items():
        if c1 not in index or not isinstance(others, dict):
            raise ConfigError(f"{path}: bad entry {c1!r} (unknown class or not a {{class: [attributes]}} map)")
        for c2, attrs in others.items():
            if c2 not in index or not isinstance(attrs, list) or not all(isinstance(a, str) for a in attrs):
                raise ConfigError(f"{path}: bad entry {c1!r} -> {c2!r} (unknown class or not a list of strings)")
            out[(index[c1], index[c2])] = attrs
    return out


def _clean(values: Sequence[str]) -> list[str]:
    """Strip, drop empties and duplicates, keep the first occurrence's order."""
    seen, out = set(), []
    for v in values:
        v = " ".join(v.split())
        if v and v.lower() not in seen:
            seen.add(v.lower())
            out.append(v)
    return out


@dataclass
class TextSet:
    """Texts with the class and kind each belongs to, plus one-to-one texts per ordered class pair."""

    texts: list[str] = field(default_factory=list)
    classes: list[int] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    ovo: dict[tuple[int, int], list[str]] = field(default_factory=dict)

    def add(self, label: int, kind: str, texts: Sequence[str]) -> None:
        for t in texts:
            self.texts.append(t)
            self.classes.append(label)
            self.kinds.append(kind)


def build_text_set(class_names: Sequence[str], dataset: str | None = None, *, synonyms: str | None = None,
                   attributes: str | None = None, analogous: str | None = None, descriptions: str | None = None,
                   one_to_one: str | None = None, task: str = "few-shot",
                   embed: Callable[[list[str]], torch.Tensor] | None = None,
                   analogous_threshold: float = 0.9) -> TextSet:
    """The General Text Set (name, synonyms, attributes, analogous classes, descriptions) and the
    One-to-One Text Sets, from class names and the optional files. ``embed`` (normalised text
    embeddings) enables the analogous-class filter."""
    if task not in ("few-shot", "zero-shot"):
        raise ConfigError(f"task: must be 'few-shot' or 'zero-shot', got {task!r}")
    ds = canonical_dataset(dataset) or ""
    names = [c.replace("_", " ") for c in class_names]
    zero = task == "zero-shot"
    name_t = NAME_TEMPLATES.get(ds, NAME_DEFAULT)
    att_t = (ATT_ZERO_SHOT.get(ds) if zero else None) or ATT_TEMPLATES.get(ds, ATT_DEFAULT)
    ana_t = (ANA_ZERO_SHOT.get(ds) if zero else None) or ANA_TEMPLATES.get(ds, ANA_DEFAULT)
    syn = load_per_class(synonyms, class_names) if synonyms else {}
    att = load_per_class(attributes, class_names) if attributes else {}
    ana = load_per_class(analogous, class_names) if analogous else {}
    desc = load_per_class(descriptions, class_names) if descriptions else {}
    if ana and embed is not None:
        ana = _filter_analogous(ana, names, embed, analogous_threshold)
    out = TextSet()
    for label, c in enumerate(names):
        # the reference's order within a class: att, ana, name, syno
        out.add(label, "att", _clean(att_t.format(c=c, a=a) for a in att.get(label, [])))
        out.add(label, "ana", _clean(ana_t.format(c=c, x=x) for x in ana.get(label, [])))
        out.add(label, "name", [name_t.format(c=c)])
        syno = [s.replace("_", " ") for s in syn.get(label, []) if s.replace("_", " ").lower() != c.lower()]
        out.add(label, "syno", _clean(name_t.format(c=s) for s in syno))
        out.add(label, "desc", _clean(desc.get(label, [])))
    if one_to_one:
        for (c1, c2), attrs in load_one_to_one(one_to_one, class_names).items():
            texts = _clean(t.format(a=a, c=names[c1], o=names[c2]) for a in _clean(attrs) for t in OVO_TEMPLATES)
            if texts:
                out.ovo[(c1, c2)] = texts
    return out


def _filter_analogous(ana: dict[int, list[str]], names: list[str], embed, threshold: float) -> dict[int, list[str]]:
    """Drop analogous classes that collide with another class of the dataset (cosine > threshold)."""
    class_emb = embed([f"a photo of {c}" for c in names])
    out = {}
    for label, candidates in ana.items():
        candidates = _clean(candidates)
        if not candidates:
            continue
        sims = embed([f"a photo of {x}" for x in candidates]) @ class_emb.T
        sims[:, label] = -1.0  # similarity to its own class is allowed
        out[label] = [x for x, s in zip(candidates, sims.max(1).values.tolist()) if s <= threshold]
    return out


# -- embedded form, stored in feature files -----------------------------------------------------------------
@dataclass
class EmbeddedTextSet:
    """A `TextSet` through a text encoder: what CODER computes with.

    ``embeddings`` [M, D] normalised; ``classes`` [M]; ``kinds`` [M] (index into `KINDS`);
    ``ovo_pairs`` [P, 2] ordered class pairs with ``ovo_means`` [P, D] the mean of their texts'
    normalised embeddings (mean cosine to a set = cosine-dot with its mean vector).
    """

    embeddings: torch.Tensor
    classes: torch.Tensor
    kinds: torch.Tensor
    ovo_pairs: torch.Tensor
    ovo_means: torch.Tensor

    PREFIX = "coder."

    @classmethod
    def from_text_set(cls, text_set: TextSet, embed: Callable[[list[str]], torch.Tensor]) -> EmbeddedTextSet:
        emb = F.normalize(embed(text_set.texts).float(), dim=-1)
        pairs, means = [], []
        for (c1, c2), texts in sorted(text_set.ovo.items()):
            pairs.append((c1, c2))
            means.append(F.normalize(embed(texts).float(), dim=-1).mean(0))
        dim = emb.shape[1]
        return cls(emb, torch.tensor(text_set.classes, dtype=torch.long),
                   torch.tensor([KINDS.index(k) for k in text_set.kinds], dtype=torch.long),
                   torch.tensor(pairs, dtype=torch.long).view(-1, 2),
                   torch.stack(means) if means else torch.zeros(0, dim))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{self.PREFIX}{k}": getattr(self, k) for k in ("embeddings", "classes", "kinds", "ovo_pairs", "ovo_means")}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> EmbeddedTextSet | None:
        keys = ("embeddings", "classes", "kinds", "ovo_pairs", "ovo_means")
        if f"{cls.PREFIX}embeddings" not in tensors:
            return None
        return cls(*(tensors[f"{cls.PREFIX}{k}"] for k in keys))
