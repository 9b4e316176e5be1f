"""What a model and its data exchange: labelled splits of cached features, or of images to embed.

Plain containers (torch only, no Lightning): the feature-file reader (`datamodules.feature_file`)
returns `Split`; the image DataModule hands a model `ImageSplit` loaders, which the model embeds
itself (`AdapterModule.embed_split`). The data side never calls the model.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch


@dataclass
class Split:
    """Features and labels of one split (tensors may be memory-mapped views).

    ``extra`` holds per-row tensors beyond the embeddings, by name (``preproj``: pre-projection
    features; ``adapted``: an adapted encoder's embeddings); methods read what they declared.
    """

    features: torch.Tensor
    labels: torch.Tensor
    name: str
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor, name: str | None = None) -> Split:
        return Split(self.features[index], self.labels[index], name or self.name,
                     {k: v[index] for k, v in self.extra.items()})


@dataclass
class ImageSplit:
    """A split of images still to embed: a loader of ``{"image": [B, (V,) C, H, W], "label": [B]}``
    batches (V augmented views per image when the split is a cache's training set)."""

    loader: Iterable[dict]
    name: str
