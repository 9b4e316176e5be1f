"""IMO: adapters inside every ViT block, trained once on a generic labelled set to reduce intra-modal overlap.

"CLIP Adaptation by Intra-modal Overlap Reduction" (Kravets & Namboodiri, BMVC 2024); spec and the
code's choices: ../shared/reference/methods-dac-imo.md §2. An AdaptFormer-style parallel bottleneck
(down d->64, ReLU, dropout 0.1, up 64->d, fixed scale 0.03; up projection and all biases zero, so the
adapted model starts exactly equal to CLIP) sits beside the MLP of every residual block of open_clip's
VisionTransformer:

    x <- x + MLP(LN_2(x)) + s * up(dropout(relu(down(x))))

with x the residual stream after attention. The adapters are attached with forward hooks on each
block's ``ln_2`` (to read x) and ``ls_2`` (to add the branch): no open_clip code is copied, and with
``adapters_enabled = False`` the same module gives CLIP's features bit for bit. Only the adapters and a
linear head over the training classes train (cross-entropy, or BCE for multi-label shards); AdamW
lr 8e-3, batch 128, 1 epoch by default (``configs/imo/openimages.yaml``).

**CLIP normalisation.** The reference code trains on [0, 1] pixels (its ``Normalize`` is commented
out) while evaluation normalises, so the adapter is trained on inputs it never sees at test time.
``clip_normalization=True`` (default) trains on what the evaluation uses; set False to reproduce.

After training, ``train.py predict`` with this model writes both the original and the adapted
features of every split; ``evaluate.py`` then compares ZS, TA (cache on original features) and TA++
(cache on adapted features, zero-shot term on the original ones, as the reference does).
"""
from __future__ import annotations

import math
from typing import Literal

import open_clip
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms as T

from adapters.backbone import FrozenCLIP, pool_views, register_model_configs
from adapters.base import AdapterModule, derived, register_adapter
from adapters.errors import ConfigError
from adapters.heads import FitData, TipAdapterHead, first_best, mixing_correct, register_head, row_chunks


class ParallelAdapter(nn.Module):
    """down -> ReLU -> dropout -> up, times a fixed scale; the up projection and biases start at zero."""

    def __init__(self, width: int, bottleneck: int, scale: float, dropout: float):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        self.drop = nn.Dropout(dropout)
        self.scale = scale
        nn.init.zeros_(self.down.bias)  # the reference's "lora" init: Kaiming down, zero up and biases
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.drop(F.relu(self.down(x))))


@register_adapter
class IMOAdapter(AdapterModule):
    """Parallel adapters in every block of the frozen image encoder (see the module docstring).

    Args:
        bottleneck: adapter width (64 in the reference).
        scale: fixed scale of the adapter branch (0.03 supervised; 0.1 in the reference's DINO variant).
        dropout: dropout inside the adapters (train mode only).
        loss: ``"ce"`` (one label per image, as the reference) or ``"bce"`` (multi-label shards).
        clip_normalization: train on CLIP-normalised pixels (default) or on [0, 1] pixels as the reference.
        grad_checkpointing: recompute block activations in backward (less memory, more compute).
        **kwargs: `AdapterModule` arguments (num_classes: the training classes; backbone; lr ...).
    """

    method = "imo"
    adapts_encoder = True  # `encode` gives adapted embeddings; predict_step writes original and adapted
    uses_text = False  # no zero-shot classifier: IMO's classes are the generic training set's

    def __init__(self, bottleneck: int = 64, scale: float = 0.03, dropout: float = 0.1,
                 loss: Literal["ce", "bce"] = "ce", clip_normalization: bool = True, grad_checkpointing: bool = False,
                 **kwargs):
        kwargs.setdefault("lr", 8e-3)
        kwargs.setdefault("scheduler", "constant")
        super().__init__(**kwargs)
        if loss not in ("ce", "bce"):
            raise ConfigError(f"loss: must be 'ce' or 'bce', got {loss!r}")
        # sizes from the architecture's config: the weights are loaded only when first used
        register_model_configs()
        vision = open_clip.get_model_config(self.hparams.backbone)["vision_cfg"]
        if not isinstance(vision.get("layers"), int) or "width" not in vision:
            raise ConfigError(f"backbone: IMO needs a ViT image encoder, {self.hparams.backbone} is not one")
        self.adapters = nn.ModuleList(ParallelAdapter(vision["width"], bottleneck, scale, dropout)
                                      for _ in range(vision["layers"]))
        self.classifier = nn.Linear(self.embed_dim, self.hparams.num_classes)
        self.adapters_enabled = True
        derived(self, "_attached_to", None)

    # -- hooks ----------------------------------------------------------------------------------------
    @staticmethod
    def _blocks(backbone: FrozenCLIP) -> list[nn.Module]:
        visual = backbone._vit()  # raises a clear error for non-ViT encoders
        return list(visual.transformer.resblocks)

    @property
    def encoder(self) -> FrozenCLIP:
        """The backbone, with this module's adapters hooked into its blocks."""
        backbone = self.backbone
        if self._attached_to is not backbone:
            self._attach(backbone)
        return backbone

    def _attach_once(self) -> None:
        _ = self.encoder

    def _attach(self, backbone: FrozenCLIP) -> None:
        for handle in getattr(self, "_handles", []):
            handle.remove()
        self._stream: dict[int, torch.Tensor] = {}
        self._handles = []
        blocks = self._blocks(backbone)
        if len(blocks) != len(self.adapters):
            raise ConfigError(f"backbone: {len(blocks)} blocks, the adapter has {len(self.adapters)}")
        for i, block in enumerate(blocks):
            self._handles.append(block.ln_2.register_forward_pre_hook(self._capture(i)))
            self._handles.append(block.ls_2.register_forward_hook(self._add(i)))
        if self.hparams.grad_checkpointing:
            backbone.model.visual.set_grad_checkpointing(True)
        derived(self, "_attached_to", backbone)

    def _capture(self, i: int):
        def hook(module, args):
            self._stream[i] = args[0]  # the residual stream after attention
        return hook

    def _add(self, i: int):
        def hook(module, args, output):
            if not self.adapters_enabled:
                return output  # untouched: CLIP's own computation
            return output + self.adapters[i](self._stream[i])
        return hook

    def use_backbone(self, backbone: FrozenCLIP) -> None:
        super().use_backbone(backbone)
        self._attach(backbone)

    def on_fit_start(self) -> None:
        self._attach_once()  # before DDP or the first step

    # -- features -------------------------------------------------------------------------------------
    @property
    def train_transform(self):
        """What the DataModule trains with: resize + centre crop, normalised unless clip_normalization=False."""
        if self.hparams.clip_normalization:
            return self.encoder.eval_transform
        cfg = self.encoder.model.visual.preprocess_cfg
        return T.Compose([T.Resize(cfg["size"][0], interpolation=T.InterpolationMode.BICUBIC),
                          T.CenterCrop(cfg["size"]), T.Lambda(lambda im: im.convert("RGB")), T.ToTensor()])

    def encode(self, images: torch.Tensor, adapted: bool = True, normalize: bool = True) -> torch.Tensor:
        """Image embeddings through the adapted (or original) encoder; gradients reach the adapters."""
        previous, self.adapters_enabled = self.adapters_enabled, adapted
        try:
            return self.encoder.model.encode_image(images, normalize=normalize).float()
        finally:
            self.adapters_enabled = previous

    def image_features(self, batch: dict) -> torch.Tensor:
        images = batch["image"]
        if images.ndim == 5:
            b, v = images.shape[:2]
            return self.encode(images.flatten(0, 1)).view(b, v, -1)
        return self.encode(images)

    # -- training -------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images, labels, targets = batch["image"], batch["label"], batch.get("targets")
        if images.ndim == 5:  # several views of an image: each view is a training sample
            views = images.shape[1]
            images, labels = images.flatten(0, 1), labels.repeat_interleave(views)
            targets = None if targets is None else targets.repeat_interleave(views, 0)
        logits = self.classifier(self.encode(images, normalize=False))
        if self.hparams.loss == "bce":
            if targets is None:
                raise ConfigError("loss: 'bce' needs multi-label shards (datamodules.openimages --label_policy multi)")
            loss = F.binary_cross_entropy_with_logits(logits, targets.float())
        else:
            loss = F.cross_entropy(logits, labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["label"]))
        return loss

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        raise ConfigError("IMO classifies its training classes from images; use evaluate.py (TA/TA++) on features")

    def _evaluate(self, batch: dict, metrics) -> dict:
        raw = self.encode(batch["image"], normalize=False)
        metrics.update(self.classifier(raw), batch["label"])
        self.log_dict(metrics, on_epoch=True, batch_size=len(batch["label"]))
        return {"original": self.encode(batch["image"], adapted=False), "adapted": F.normalize(raw, dim=-1),
                "label": batch["label"]}

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Original and adapted embeddings (views pooled by `pool_views`)."""
        images = batch["image"]
        views = images.shape[1] if images.ndim == 5 else 1
        flat = images.flatten(0, 1) if views > 1 else images
        out = {}
        for name, adapted in (("features", False), ("adapted", True)):
            out[name] = pool_views(self.encode(flat, adapted=adapted, normalize=False).view(len(batch["label"]), views, -1))
        out["adapted"] = out["adapted"].half()  # stored as the features are
        return {**out, "label": batch["label"], "key": batch.get("key"), "dataloader_idx": dataloader_idx}


# -- IMO's own evaluation protocol (methods-dac-imo.md §2.5): heads evaluate.py runs ---------------------
#: IMO's grids: alpha in linspace(0, 20, 200), beta in linspace(0, 20, 20), gamma in linspace(0, 30, 50).
IMO_ALPHAS = (0.0, 20.0, 200)
IMO_BETAS = (0.0, 20.0, 20)
IMO_GAMMAS = (0.0, 30.0, 50)
#: Temperature of Tip-X's image-to-text class distributions (softmax of cosines / 0.5).
TIPX_TEMPERATURE = 0.5


def _linspace(spec: tuple[float, float, int]) -> torch.Tensor:
    return torch.linspace(spec[0], spec[1], int(spec[2]))


@register_head
class TipIMOGridHead(TipAdapterHead):
    """TA / TA++ as IMO's evaluation searches them: Tip-Adapter's logits with alpha and beta on IMO's
    grid (``linspace(0, 20, 200)`` x ``linspace(0, 20, 20)``, zero included, beta outer, first best on
    val) instead of Tip-Adapter's per-dataset one. On an IMO extraction's adapted features (the
    ``tip_imo+imo`` row) the cache is on adapted features and the zero-shot term on the original ones:
    TA++. Without text only beta matters (cache only), on the same grid."""

    name = "tip_imo"
    in_default_set = False  # IMO's protocol: ask for it with --heads
    wide_image_only_search = False  # IMO's grid, with or without text

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _linspace(IMO_BETAS), _linspace(IMO_ALPHAS)


def kl_divergence(p: torch.Tensor, q: torch.Tensor | None = None, log_q: torch.Tensor | None = None) -> torch.Tensor:
    """``KL(p_i || q_j)`` for every pair of rows: [M, C] x [N, C] -> [M, N] (all rows: the reference's loop
    leaves the last ``M mod 100`` rows at 0, a bug not reproduced). ``log_q`` may be given instead of
    ``q`` (a head computes it once, not per block of queries)."""
    return (p * p.log()).sum(-1, keepdim=True) - p @ (q.log() if log_q is None else log_q).T


def rescale_into(values: torch.Tensor, value_range: tuple, target_range: tuple) -> torch.Tensor:
    """Min-max rescale ``values`` from ``value_range`` into ``target_range`` (SuS-X's ``scale_``, whose
    ranges are those of the whole matrices of a split)."""
    (lo, hi), (t_lo, t_hi) = value_range, target_range
    return (values - lo) / max(hi - lo, 1e-12) * (t_hi - t_lo) + t_lo


@register_head
class TipXHead(TipAdapterHead):
    """Tip-X (SuS-X), as IMO evaluates it: ``100 f W^T + gamma * (-KL~) L + alpha * exp(-beta (1 - A)) L``.

    ``A`` = query-key affinities (on adapted features for Tip-X++); ``KL(p || q)`` compares the query's
    and each cache image's image-to-text class distributions (softmax of cosines to the class text
    embeddings / 0.5), always from the *original* features, and is rescaled into the range of ``A``
    over the split (the reference's ``scale_``: a query's logits therefore depend on the split it is
    scored with; the ranges are taken in a first pass over blocks of queries, so no [queries x cache]
    matrix is kept whole). alpha, beta, gamma on IMO's grid (beta, then alpha, then gamma; first best
    on val), the search run separately for Tip-X and Tip-X++ (each feature space is its own row)."""

    name = "tipx"
    needs_text = True
    in_default_set = False
    wide_image_only_search = False

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _linspace(IMO_BETAS), _linspace(IMO_ALPHAS)

    def adapted_note(self, has_text: bool) -> str | None:
        return "cache on adapted features; zero-shot and KL terms on the original ones (Tip-X++)"

    def _text_distribution(self, x: torch.Tensor) -> torch.Tensor:
        return (F.normalize(x.float(), dim=-1) @ self.text.T / TIPX_TEMPERATURE).softmax(-1)

    def _fit(self, data: FitData, keys: torch.Tensor | None = None) -> None:
        self.gamma = 0.0
        self.register_buffer("text", data.text)
        # the cache images' text distributions, in the cache's own (label-sorted) order
        order = torch.argsort(data.train_y, stable=True)
        self.register_buffer("cache_log_q", self._text_distribution(data.train_text_x[order]).log())
        super()._fit(data, keys)
        if self._given is not None:
            self.gamma = float(self._given.get("gamma", 0.0))
        self.hparams["gamma"] = round(self.gamma, 4)

    def _split_ranges(self, x: torch.Tensor, text_x: torch.Tensor) -> tuple[tuple, tuple]:
        """(KL range, affinity range) over the whole split, in blocks of queries."""
        kl_lo = a_lo = math.inf
        kl_hi = a_hi = -math.inf
        for rows in row_chunks(len(x), 3 * len(self.cache.keys)):  # KL, affinity and a temporary alive
            kl = kl_divergence(self._text_distribution(text_x[rows]), log_q=self.cache_log_q)
            affinity = self.affinity(x[rows])
            kl_lo, kl_hi = min(kl_lo, float(kl.min())), max(kl_hi, float(kl.max()))
            a_lo, a_hi = min(a_lo, float(affinity.min())), max(a_hi, float(affinity.max()))
        return (kl_lo, kl_hi), (a_lo, a_hi)

    def _kl_logits(self, text_x: torch.Tensor, ranges: tuple) -> torch.Tensor:
        """``(-KL~) L`` [M, C] for a block of queries: the rescaled negative KL term summed per class."""
        kl = kl_divergence(self._text_distribution(text_x), log_q=self.cache_log_q)
        return self.cache.class_sum(-rescale_into(kl, *ranges))

    def search(self, val_x: torch.Tensor, val_y: torch.Tensor,
               val_text_x: torch.Tensor | None = None) -> tuple[float, float]:
        betas, alphas = self.grid()
        gammas = _linspace(IMO_GAMMAS).to(val_x.device)
        text_x = val_x if val_text_x is None else val_text_x
        ranges = self._split_ranges(val_x, text_x)
        per_row = max(len(self.cache.keys), 8 * len(gammas) * self.text.shape[0])  # a block's largest tensors
        total = 0
        for rows in row_chunks(len(val_x), per_row):
            affinity, y = self.affinity(val_x[rows]), val_y[rows]
            base = self._zero_shot(val_x[rows], text_x[rows]) + gammas[:, None, None] * self._kl_logits(text_x[rows], ranges)
            total = total + torch.stack([mixing_correct(base, self.cache.from_affinity(affinity, beta), y, alphas).T
                                         for beta in betas])  # [B, A, G]
        i, j, k = first_best(total)
        self._note_edge("beta", i, betas)
        self._note_edge("alpha", j, alphas)
        self._note_edge("gamma", k, gammas)
        self.gamma = float(gammas[k])
        return float(alphas[j]), float(betas[i])

    def forward(self, x: torch.Tensor, text_x: torch.Tensor | None = None) -> torch.Tensor:
        x = F.normalize(x.float(), dim=-1)
        text_x = x if text_x is None else F.normalize(text_x.float(), dim=-1)
        self._ranges = self._split_ranges(x, text_x)  # the split's ranges first, then block by block
        return super().forward(x, text_x)

    def _row_cost(self) -> int:
        return 4 * len(self.cache.keys) + 4 * self.num_classes  # KL, affinity, its exp and a temporary

    def _logits(self, x: torch.Tensor, text_x: torch.Tensor | None) -> torch.Tensor:
        affinity = self.affinity(x)
        return (self._zero_shot(x, text_x) + self.gamma * self._kl_logits(text_x, self._ranges)
                + self.alpha * self.cache.from_affinity(affinity, self.beta))
