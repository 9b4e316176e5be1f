"""What a method stores in a feature file at extraction, declared by the method itself.

``train.py predict`` with `adapters.extractor.FeatureExtractor` writes the image embeddings of every
split and the zero-shot classifier of the class names. Anything more a method needs from the same
backbone is an `ExtractionStore`, registered by the method's module and enabled by name in the
extractor's ``store`` option::

    model:
      class_path: adapters.extractor.FeatureExtractor
      init_args:
        store: {coder: {attributes: att.json}, isoclip: {}}

A store contributes file-level tensors (a text set, projector matrices), stored under its own prefix
(``coder.*``), and/or per-row tensors stored beside each split's features (``{split}.preproj``).
Heads read them back by declaring the prefixes and the per-row input they need
(`adapters.heads.Head`). Nothing outside the method's own module knows what a store holds.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from adapters.errors import ConfigError

if TYPE_CHECKING:
    from adapters.backbone import FrozenCLIP

STORES: dict[str, type[ExtractionStore]] = {}


def register_store(cls: type[ExtractionStore]) -> type[ExtractionStore]:
    """Class decorator: make a store available by ``name`` to the extractor's ``store`` option."""
    STORES[cls.name] = cls
    return cls


def build_stores(options: dict[str, dict] | None) -> list[ExtractionStore]:
    """The stores named in ``options`` (name -> keyword arguments); None: every store with ``default``."""
    if options is None:
        return [cls() for cls in STORES.values() if cls.default]
    unknown = sorted(set(options) - set(STORES))
    if unknown:
        raise ConfigError(f"store: unknown extraction store {unknown[0]!r} (known: {', '.join(sorted(STORES))})")
    return [STORES[name](**(kwargs or {})) for name, kwargs in options.items()]


class ExtractionStore:
    """Base of what a method stores at extraction (see the module docstring)."""

    #: The store's name in the extractor's ``store`` option.
    name: ClassVar[str]
    #: Stored when the extractor's ``store`` option is left unset.
    default: ClassVar[bool] = False
    #: Needs the pre-projection image features (the extractor then computes them once per batch and
    #: projects them itself: one pass through the encoder, not two).
    uses_preprojection: ClassVar[bool] = False

    def setup(self, backbone: FrozenCLIP, class_names: list[str] | None, dataset: str | None) -> None:
        """Prepare from the backbone and the class names (e.g. embed a text set), once per run."""

    def file_tensors(self, backbone: FrozenCLIP) -> dict[str, torch.Tensor]:
        """Tensors stored once per file, each named with this store's prefix (``<name>.<what>``)."""
        return {}

    def row_tensors(self, preprojection: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Tensors stored per sample beside its embedding (``{split}.<key>``), from the batch's
        pre-projection features [B, V, W] (V augmented views) when `uses_preprojection`."""
        return {}
