"""The frozen open_clip backbone every method sits on.

`FrozenCLIP` wraps an open_clip model built from a model name and a ``pretrained`` value, which may be
a hub tag (``openai``, ``laion2b_s34b_b79k``), a local checkpoint file, or ``None`` (random weights,
with a warning). It never trains: parameters have ``requires_grad=False`` and the module stays in eval
mode even when a parent LightningModule calls ``.train()``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlparse

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


SCHEMAS = ("hf-hub:", "local-dir:")
_HF_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _is_file_path(pretrained: str) -> bool:
    return os.path.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


def _reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether ``host`` answers on HTTPS within ``timeout`` seconds (False when the hub is offline by
    configuration: ``HF_HUB_OFFLINE=1``)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hf_cached(repo_id: str, filenames: Sequence[str], cache_dir: str | None) -> str | None:
    """The path of the first of ``filenames`` of a Hugging Face repo in the local cache, or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in filenames:
        path = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def _unavailable(what: str, cache_dir: str | None, host: str) -> ConfigError:
    where = f"cache_dir {cache_dir}" if cache_dir else "the default caches (~/.cache/huggingface, ~/.cache/clip)"
    return ConfigError(f"pretrained: {what}: not found in {where}, and {host} cannot be reached; pass a local "
                       "checkpoint (pretrained: /path/to/file.pt), point cache_dir at the folder holding the "
                       "downloaded weights, or download them on a node with internet first")


@contextlib.contextmanager
def _hub_offline():
    """Make huggingface_hub answer from its cache only (no request, no retries) inside this block."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    previous, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def check_weights(model_name: str, pretrained: str | None, cache_dir: str | None = None) -> bool:
    """Check that the weights named by (``model_name``, ``pretrained``) can be loaded, fast and offline-aware:
    True when they are local (a file, or in the cache: load them without touching the network), False
    when they must be downloaded (the hub answered). Raises a one-line `ConfigError` naming the model and
    tag when they are neither (instead of a minute of retries and a wall of traceback)."""
    register_model_configs()
    if model_name.startswith("local-dir:"):
        if not Path(model_name[len("local-dir:"):]).is_dir():
            raise ConfigError(f"backbone: {model_name}: no such directory")
        return True
    if model_name.startswith("hf-hub:"):
        repo = model_name[len("hf-hub:"):]
        if _hf_cached(repo, ("open_clip_config.json",), cache_dir) and _hf_cached(repo, _HF_WEIGHTS, cache_dir):
            return True
        if _reachable("huggingface.co"):
            return False
        raise _unavailable(f"model {model_name}", cache_dir, "huggingface.co")
    if model_name not in open_clip.list_models():
        raise ConfigError(f"backbone: unknown open_clip architecture {model_name!r} (or use hf-hub:<repo> / "
                          "local-dir:<folder>)")
    if pretrained is None or str(pretrained).lower() in {"", "none", "random"}:
        return True
    pretrained = str(pretrained)
    if _is_file_path(pretrained):
        if not Path(pretrained).is_file():
            raise ConfigError(f"pretrained: checkpoint file not found: {pretrained}")
        return True
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        known = open_clip.list_pretrained_tags_by_model(model_name)
        raise ConfigError(f"pretrained: unknown tag {pretrained!r} for model {model_name!r} "
                          f"(known: {', '.join(known) or 'none'}; or a local checkpoint file)")
    hub = cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub)
        names = [filename] if filename else list(_HF_WEIGHTS)
        if filename.endswith(".bin"):
            names.insert(0, filename[:-4] + ".safetensors")
        if _hf_cached(repo, names, cache_dir):
            return True
    url = cfg.get("url", "")
    if url and os.path.isfile(os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))):
        return True
    host = "huggingface.co" if hub else urlparse(url).hostname or "the download host"
    if _reachable(host):
        return False
    raise _unavailable(f"weights {pretrained!r} for {model_name}", cache_dir, host)


def embed_dim_of(model_name: str, cache_dir: str | None = None) -> int:
    """The joint embedding dimension of an architecture, read from its config without loading weights
    (``hf-hub:`` / ``local-dir:`` names: their ``open_clip_config.json``)."""
    register_model_configs()
    if model_name.startswith(SCHEMAS):
        if model_name.startswith("local-dir:"):
            path = Path(model_name[len("local-dir:"):]) / "open_clip_config.json"
        else:
            repo = model_name[len("hf-hub:"):]
            path = _hf_cached(repo, ("open_clip_config.json",), cache_dir)
            if path is None:
                if not _reachable("huggingface.co"):
                    raise _unavailable(f"the config of {model_name}", cache_dir, "huggingface.co")
                from huggingface_hub import hf_hub_download

                path = hf_hub_download(repo, "open_clip_config.json", cache_dir=cache_dir)
        try:
            return int(json.loads(Path(path).read_text())["model_cfg"]["embed_dim"])
        except (OSError, KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"backbone: {model_name}: unreadable open_clip_config.json ({e})") from None
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ConfigError(f"backbone: unknown open_clip architecture {model_name!r} (or use hf-hub:<repo> / "
                          "local-dir:<folder>)")
    return int(cfg["embed_dim"])


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
        model_name: open_clip architecture name (``ViT-B-32``, ``ViT-B-16``, ``tiny-clip``, ...), or an
            open_clip ``hf-hub:<repo>`` / ``local-dir:<folder>`` name (config and weights from there).
        pretrained: hub tag, path to a local checkpoint file, or ``None`` for random weights.
        cache_dir: where open_clip caches hub downloads (and looks for them first: weights found there
            load without any network request).
    """

    def __init__(self, model_name: str = TINY_MODEL, pretrained: str | None = None, cache_dir: str | None = None):
        super().__init__()
        local = check_weights(model_name, pretrained, cache_dir)
        schema = model_name.startswith(SCHEMAS)
        resolved = None if schema or pretrained is None or str(pretrained).lower() in {"", "none", "random"} \
            else str(pretrained)
        if resolved is None and not schema:
            warnings.warn(
                f"FrozenCLIP({model_name!r}): no pretrained weights, the backbone is randomly initialised "
                "(fine for tests and demos, meaningless for accuracy)",
                stacklevel=2,
            )
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # open_clip repeats the warning above on the root logger
        try:
            with _hub_offline() if local else contextlib.nullcontext():  # cached: no request, no retries
                model, _, eval_transform = open_clip.create_model_and_transforms(
                    model_name, pretrained=resolved, cache_dir=cache_dir
                )
                tokenizer = open_clip.get_tokenizer(model_name, cache_dir=cache_dir)
        except (OSError, RuntimeError, ValueError) as e:  # a download that failed half-way, a corrupt file
            raise ConfigError(f"backbone: cannot load {model_name} with pretrained={pretrained!r} "
                              f"({' '.join(str(e).split())[:200]})") from None
        finally:
            root.setLevel(level)
        self.model_name = model_name
        self.pretrained = None if resolved is None else str(pretrained)
        self.model = model
        self.tokenizer = tokenizer
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
