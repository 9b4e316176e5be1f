"""The frozen open_clip backbone every method sits on.

`FrozenCLIP` wraps an open_clip model built from a model name and a ``pretrained`` value, which may be
a hub tag (``openai``, ``laion2b_s34b_b79k``), a local checkpoint file, or ``None`` (random weights,
with a warning). It never trains: parameters have ``requires_grad=False`` and the module stays in eval
mode even when a parent LightningModule calls ``.train()``.
"""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms as T

from adapters.errors import ConfigError

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
#: A tiny ViT config (2 blocks, width 64, 32-px input) for tests and the offline demo.
TINY_MODEL = "tiny-clip"

_registered = False


def register_model_configs() -> None:
    """Register this package's open_clip architectures (e.g. ``tiny-clip``) once per process."""
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def _resolve_pretrained(model_name: str, pretrained: str | None) -> str | None:
    """Validate ``pretrained`` early so a typo fails with one clear line, not deep in open_clip."""
    if pretrained is None or str(pretrained).lower() in {"", "none", "random"}:
        return None
    pretrained = str(pretrained)
    if os.path.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt")):
        if not Path(pretrained).is_file():
            raise ConfigError(f"pretrained: checkpoint file not found: {pretrained}")
        return pretrained
    known = open_clip.list_pretrained_tags_by_model(model_name)
    if known and pretrained not in known:
        raise ConfigError(
            f"pretrained: unknown tag {pretrained!r} for model {model_name!r} (known: {', '.join(known)})"
        )
    return pretrained


def pool_views(raw: torch.Tensor) -> torch.Tensor:
    """One embedding per image from its augmented views: the mean of the *unnormalised* view
    embeddings [..., V, D], then L2-normalised (Tip-Adapter's cache keys, methods-dac-imo.md §1.2).

    The one definition of view pooling: extraction, the caches built from shards and the pooled keys
    of a views-as-rows feature file all go through it.
    """
    return F.normalize(raw.float().mean(-2), dim=-1)


class FrozenCLIP(nn.Module):
    """A frozen open_clip model with the accessors adapters need.

    Args:
        model_name: open_clip architecture name (``ViT-B-32``, ``ViT-B-16``, ``tiny-clip``, ...).
        pretrained: hub tag, path to a local checkpoint file, or ``None`` for random weights.
        cache_dir: where open_clip caches hub downloads.
    """

    def __init__(self, model_name: str = TINY_MODEL, pretrained: str | None = None, cache_dir: str | None = None):
        super().__init__()
        register_model_configs()
        if model_name not in open_clip.list_models():
            raise ConfigError(f"model_name: unknown open_clip architecture {model_name!r}")
        resolved = _resolve_pretrained(model_name, pretrained)
        if resolved is None:
            warnings.warn(
                f"FrozenCLIP({model_name!r}): no pretrained weights, the backbone is randomly initialised "
                "(fine for tests and demos, meaningless for accuracy)",
                stacklevel=2,
            )
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # open_clip repeats the warning above on the root logger
        try:
            model, _, eval_transform = open_clip.create_model_and_transforms(
                model_name, pretrained=resolved, cache_dir=cache_dir
            )
        finally:
            root.setLevel(level)
        self.model_name = model_name
        self.pretrained = None if resolved is None else str(pretrained)
        self.model = model
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.eval_transform: Callable = eval_transform
        self.train_transform: Callable = self._few_shot_train_transform()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()

    # -- frozen by construction ------------------------------------------------------------------
    def train(self, mode: bool = True) -> FrozenCLIP:
        """Ignore ``mode``: the backbone is always in eval mode (no dropout, fixed norm statistics)."""
        return super().train(False)

    # -- shapes and transforms -------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        """Dimension of the joint image-text embedding space."""
        return int(self.model.text_projection.shape[-1] if not isinstance(self.model.text_projection, nn.Linear)
                   else self.model.text_projection.out_features)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.model.visual.preprocess_cfg["size"])

    def _few_shot_train_transform(self) -> Callable:
        """The few-shot protocol's train augmentation (CoOp/Tip-Adapter): RandomResizedCrop with
        scale (0.5, 1), bicubic, horizontal flip, then the model's own normalisation."""
        cfg = self.model.visual.preprocess_cfg
        return T.Compose([
            T.RandomResizedCrop(cfg["size"], scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(0.5),
            T.Lambda(lambda im: im.convert("RGB") if hasattr(im, "convert") else im),
            T.ToTensor(),
            T.Normalize(cfg["mean"], cfg["std"]),
        ])

    @property
    def device(self) -> torch.device:
        return self.model.visual.proj.device if self.model.visual.proj is not None else next(self.parameters()).device

    # -- image side ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image embeddings after the visual projection, L2-normalised by default."""
        return self.model.encode_image(images, normalize=normalize)

    @torch.no_grad()
    def encode_image_preprojection(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled image features *before* ``visual.proj`` (IsoCLIP's f_i), shape [B, width]."""
        visual = self._vit()
        tokens = visual.transformer(visual._embeds(images))
        pooled, _ = visual._pool(tokens)
        return pooled

    @property
    def image_projection(self) -> torch.Tensor:
        """``visual.proj`` as stored by open_clip, shape [d_v, d] (so W_i = proj.T)."""
        return self._vit().proj

    def _vit(self) -> nn.Module:
        visual = self.model.visual
        if not isinstance(visual, open_clip.transformer.VisionTransformer) or visual.proj is None:
            raise ConfigError(
                f"model_name: {self.model_name} has no ViT projection matrix (pre-projection features and "
                "projector access need an open_clip VisionTransformer with `proj`)"
            )
        return visual

    # -- text side -------------------------------------------------------------------------------
    @property
    def text_projection(self) -> torch.Tensor:
        """``text_projection`` as a [d_t, d] matrix (so W_t = text_projection.T)."""
        proj = self.model.text_projection
        return proj.weight.T if isinstance(proj, nn.Linear) else proj

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], normalize: bool = True, batch_size: int = 256) -> torch.Tensor:
        """Embed strings in batches; L2-normalised by default. Returns [len(texts), embed_dim]."""
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenize(texts[i:i + batch_size]).to(self.device)
            out.append(self.model.encode_text(tokens, normalize=normalize).float())
        return torch.cat(out) if out else torch.empty(0, self.embed_dim)

    @torch.no_grad()
    def zero_shot_classifier(
        self, class_names: Sequence[str], templates: Sequence[str], batch_size: int = 256
    ) -> torch.Tensor:
        """The shared zero-shot classifier of the few-shot literature, [C, embed_dim].

        For each class: format every template with the class name (underscores become spaces), embed,
        L2-normalise each prompt, average over templates, L2-normalise again. All prompts of all
        classes go through the text encoder in batches of ``batch_size``.
        """
        if not class_names:
            raise ConfigError("class_names: empty list, cannot build a zero-shot classifier")
        if not templates:
            raise ConfigError("templates: empty list, cannot build a zero-shot classifier")
        prompts = [t.format(c.replace("_", " ")) for c in class_names for t in templates]
        emb = self.encode_text(prompts, normalize=True, batch_size=batch_size)
        emb = emb.view(len(class_names), len(templates), -1).mean(dim=1)
        return F.normalize(emb, dim=-1)

    def describe(self) -> dict:
        """Identity of the backbone, recorded in feature files and adapter exports."""
        return {"backbone": self.model_name, "pretrained": self.pretrained or "none", "dim": self.embed_dim}
