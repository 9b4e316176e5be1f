"""DAC-style adapter: intra-modal contrastive image adapter + modulated class text embeddings.

DAC ("Domain Aligned CLIP for Few-shot Classification", Gondal et al., WACV 2024) improves image-image
(intra-modal) and image-text (inter-modal) alignment without touching CLIP. Its paper text and code
were not available (../shared/reference/methods-dac-imo.md §3), so this module builds the design of
§3.3 with every choice a config field:

(a) **intra-modal adapter**: ``g(f) = norm(f + r * up(drop(relu(down(f)))))`` on L2-normalised image
    embeddings, ``up`` zero-initialised so that g starts as the identity; trained with a supervised
    contrastive loss (positives: same class, and the other augmented views of an image when training
    online; optional Gaussian feature noise gives views on cached features), temperature ``temperature``;
    negatives gathered across DDP ranks with gradients when ``gather_negatives``.
(b) **inter-modal modulation**: ``W' = norm(s * (W + delta))`` with a per-dimension scale s (init 1)
    and a per-class residual delta (init 0), trained with cross-entropy on ``100 * f W'^T``.
(c) **inference**: ``100 * f W'^T + alpha * exp(-beta (1 - g(f) g(K)^T)) L`` (Tip-Adapter's cache on
    adapted features, text term on the original ones by default), alpha/beta searched on val only.
    Without text features, (b) is off and the image-only head (``tip`` cache, ``prototype`` or ``gda``)
    runs on adapted features.

``schedule="sequential"`` trains (a) for the first ``intra_fraction`` of the optimiser steps (at least
one step for each stage), then (b); ``"joint"`` optimises both losses from the start.

**Views.** Online (`ImageShardDataModule` with ``train_views >= 2``) each image comes with several
augmented views, and the contrastive loss takes an image's other views as positives beside its
class-mates. On cached features with one row per image, ``feature_noise > 0`` makes a second, noisy
view; without it, positives are other images of the class only.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from adapters.base import register_adapter
from adapters.cached import CachedHeadAdapter
from adapters.errors import ConfigError
from adapters.heads import CLIP_SCALE, BlockEnsembleHead, Head, build_head


class ResidualAdapter(nn.Module):
    """Residual bottleneck MLP on normalised embeddings, identity at initialisation."""

    def __init__(self, dim: int, hidden: int, residual: float, dropout: float):
        super().__init__()
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)
        self.residual = residual
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x + self.residual * self.up(self.drop(F.relu(self.down(x)))), dim=-1)


class TextModulation(nn.Module):
    """``W' = norm(scale * (W + residual))``: per-dimension scale and per-class residual, identity at init."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.residual = nn.Parameter(torch.zeros(num_classes, dim))

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.scale * (text + self.residual), dim=-1)


def supervised_contrastive_loss(z: torch.Tensor, labels: torch.Tensor, z_all: torch.Tensor, labels_all: torch.Tensor,
                                temperature: float, offset: int = 0) -> torch.Tensor:
    """SupCon (Khosla et al. 2020): anchors ``z`` [n, D] against candidates ``z_all`` [m, D] that contain
    the anchors at rows ``offset .. offset + n``. Positives share the label; anchors without any
    positive are left out."""
    n = len(z)
    sim = z @ z_all.T / temperature
    self_mask = torch.zeros_like(sim, dtype=torch.bool)
    self_mask[torch.arange(n), offset + torch.arange(n, device=z.device)] = True
    sim = sim.masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    positives = (labels[:, None] == labels_all[None, :]) & ~self_mask
    count = positives.sum(1)
    valid = count > 0
    if not valid.any():
        return z.sum() * 0.0
    per_anchor = -log_prob.masked_fill(~positives, 0.0).sum(1) / count.clamp_min(1)
    return per_anchor[valid].mean()


@register_adapter
class DACAdapter(CachedHeadAdapter):
    """DAC-style intra-modal contrastive adapter with text-embedding modulation (see the module docstring).

    Args:
        hidden_dim: bottleneck width of the image adapter.
        residual: weight r of the adapter branch.
        dropout: dropout inside the adapter.
        temperature: SupCon temperature.
        feature_noise: std of Gaussian noise giving a second view of cached features (0: off).
        gather_negatives: gather embeddings across DDP ranks (with gradients) for global negatives.
        modulate_text: train the text modulation (b) when text features exist.
        text_on_adapted: score the text term with adapted instead of original image features.
        schedule: ``"sequential"`` ((a) then (b)) or ``"joint"``.
        intra_fraction: share of optimiser steps for (a) in the sequential schedule (rounded, and at
            least one step for each of (a) and (b) when both train).
        inter_weight: weight of the cross-entropy in the joint schedule.
        inference_head: ``"tip"``, ``"prototype"`` or ``"gda"``, fit on adapted features after training.
        members: number of independently initialised image adapters trained side by side (a deep
            ensemble; each has its own SupCon loss on the same batches). With more than one, the adapted
            features are the members' embeddings side by side and the inference head is one
            ``inference_head`` per member, log-probabilities averaged (`BlockEnsembleHead`).
        with_original: also keep the original embeddings as a block of the adapted features, mixed into
            the head with a weight searched on val (0 ... 1): the adapter cannot end worse on val than
            the head on raw features.
        **kwargs: `AdapterModule` arguments (num_classes, backbone, pretrained, lr, ...).
    """

    method = "dac"

    def __init__(self, hidden_dim: int = 256, residual: float = 1.0, dropout: float = 0.0, temperature: float = 0.07,
                 feature_noise: float = 0.0, gather_negatives: bool = True, modulate_text: bool = True,
                 text_on_adapted: bool = False, schedule: Literal["sequential", "joint"] = "sequential",
                 intra_fraction: float = 0.5, inter_weight: float = 1.0,
                 inference_head: Literal["tip", "prototype", "gda"] = "tip", members: int = 1,
                 with_original: bool = False, **kwargs):
        super().__init__(**kwargs)
        if schedule not in ("sequential", "joint"):
            raise ConfigError(f"schedule: must be 'sequential' or 'joint', got {schedule!r}")
        if inference_head not in ("tip", "prototype", "gda"):
            raise ConfigError(f"inference_head: must be 'tip', 'prototype' or 'gda', got {inference_head!r}")
        if not 0.0 <= intra_fraction <= 1.0:
            raise ConfigError(f"intra_fraction: must be in [0, 1], got {intra_fraction}")
        if members < 1:
            raise ConfigError(f"members: must be >= 1, got {members}")
        if (members > 1 or with_original) and text_on_adapted:
            raise ConfigError("text_on_adapted: not available with members > 1 or with_original (the adapted "
                              "features are several embeddings side by side)")
        self.adapter = ResidualAdapter(self.embed_dim, hidden_dim, residual, dropout)
        self.members = nn.ModuleList(ResidualAdapter(self.embed_dim, hidden_dim, residual, dropout)
                                     for _ in range(members - 1))
        self.modulation = TextModulation(self.hparams.num_classes, self.embed_dim)
        # The few-shot set (original embeddings) becomes the cache of the inference head; exported.
        self.register_buffer("train_features", torch.zeros(0, self.embed_dim))

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if not self._train_text:
            self.modulation.requires_grad_(False)  # nothing to modulate: keep it out of the optimiser

    # -- the inference head (CachedHeadAdapter) -------------------------------------------------------------
    def store_train(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.train_features = F.normalize(features.float(), dim=-1)

    def new_head(self) -> Head:
        if not self._side_by_side:
            return build_head(self.hparams.inference_head, dataset=self.hparams.dataset)
        return BlockEnsembleHead(self.hparams.dataset, base=self.hparams.inference_head,
                                 blocks=self.hparams.members + self.hparams.with_original,
                                 with_original=self.hparams.with_original)

    def head_train_x(self) -> torch.Tensor:
        return self.adapt(self.train_features)

    def head_text(self) -> torch.Tensor | None:
        return self.modulated_text() if self.has_text else None

    def head_query(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapt(x)

    def text_query(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(x) if self.hparams.text_on_adapted else x

    def export_config(self) -> dict:
        return {"head": self.hparams.inference_head, **super().export_config()}

    # -- model ----------------------------------------------------------------------------------------------
    @property
    def _side_by_side(self) -> bool:
        return self.hparams.members > 1 or self.hparams.with_original

    def image_adapters(self) -> list[ResidualAdapter]:
        return [self.adapter, *self.members]

    def adapt(self, features: torch.Tensor) -> torch.Tensor:
        if not self._side_by_side:
            return self.adapter(features)
        original = [F.normalize(features.float(), dim=-1)] if self.hparams.with_original else []
        return torch.cat([a(features) for a in self.image_adapters()] + original, dim=-1)

    def modulated_text(self) -> torch.Tensor:
        return self.modulation(self.text_features) if self.has_text else self.text_features

    @property
    def _train_text(self) -> bool:
        return self.has_text and self.hparams.modulate_text

    def _stage(self) -> str:
        """Which losses train now: 'intra', 'inter' or 'joint'."""
        if not self._train_text:
            return "intra"
        if self.hparams.schedule == "joint":
            return "joint"
        return "intra" if self.global_step < self.intra_steps() else "inter"

    def intra_steps(self) -> int:
        """Optimiser steps of stage (a) in the sequential schedule: ``round(intra_fraction * total)``,
        clamped so that each enabled stage gets at least one step. Steps, not epochs: well defined for
        one epoch and for ``max_steps`` runs alike."""
        if "_intra_steps" not in self.__dict__:
            total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
            frac = self.hparams.intra_fraction
            if frac in (0.0, 1.0):
                steps = 0 if frac == 0.0 else total
            elif total >= 2:
                steps = min(max(round(frac * total), 1), total - 1)
            elif self.trainer.fast_dev_run:
                steps = 1  # a smoke test: one step, of stage (a)
            else:
                raise ConfigError(f"schedule: sequential with intra_fraction={frac} trains two stages, but the run "
                                  f"has {total} optimiser step; give it at least 2 (trainer.max_epochs / max_steps)")
            self.__dict__["_intra_steps"] = steps
        return self.__dict__["_intra_steps"]

    def training_loss(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        stage = self._stage()
        extra, loss = {}, features.new_zeros(())
        if features.ndim == 3:  # online: V augmented views per image; the text loss takes each view
            views = features
            originals = features.flatten(0, 1)
        else:
            originals = features
            views = features[:, None]
            if self.hparams.feature_noise > 0 and stage != "inter":
                noisy = F.normalize(features + self.hparams.feature_noise * torch.randn_like(features), dim=-1)
                views = torch.stack([features, noisy], 1)
        if stage in ("intra", "joint"):
            v = views.shape[1]
            y = labels.repeat_interleave(v)
            gather = self.hparams.gather_negatives and self._trainer is not None and self.trainer.world_size > 1
            intra = features.new_zeros(())
            for adapter in self.image_adapters():  # independent members: the sum's gradients do not mix
                z = adapter(views.flatten(0, 1))
                if gather:
                    intra = intra + self._global_batch_supcon(z, y)
                else:
                    intra = intra + supervised_contrastive_loss(z, y, z, y, self.hparams.temperature)
            loss = loss + intra
            extra["supcon"] = intra.detach()
        if stage in ("inter", "joint"):
            x = self.adapter(originals) if self.hparams.text_on_adapted else originals
            inter = F.cross_entropy(CLIP_SCALE * x @ self.modulated_text().T,
                                    labels.repeat_interleave(len(originals) // len(labels)))
            loss = loss + (self.hparams.inter_weight if stage == "joint" else 1.0) * inter
            extra["text_ce"] = inter.detach()
        # DDP needs a gradient for every trainable parameter at every step: keep the part this stage
        # does not train in the graph with weight 0; its gradients are dropped before the optimiser step.
        for p in self._inactive_parameters(stage):
            loss = loss + 0.0 * p.sum()
        return loss, extra

    def _global_batch_supcon(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """SupCon over the global batch on every rank, with gradients through this rank's rows only.

        The other ranks' rows come from a plain all-gather (no collective in the backward, which would
        race DDP's own gradient all-reduce). Each rank's gradient is then its rows' share of the global
        loss's gradient; the shares sum to the whole, and DDP averages them, so the loss carries R times
        the gradient (its value unchanged): the step is the one-process step over the global batch."""
        world, rank, n = self.trainer.world_size, self.global_rank, len(z)
        z_all = self.all_gather(z.detach()).flatten(0, 1)
        z_all = torch.cat([z_all[:rank * n], z, z_all[(rank + 1) * n:]])
        y_all = self.all_gather(y).flatten(0, 1)
        loss = supervised_contrastive_loss(z_all, y_all, z_all, y_all, self.hparams.temperature)
        return loss + (world - 1) * (loss - loss.detach())

    def _inactive_parameters(self, stage: str) -> list[torch.nn.Parameter]:
        if stage == "intra":
            group = self.modulation
        elif stage == "inter" and not self.hparams.text_on_adapted:
            group = nn.ModuleList(self.image_adapters())
        else:
            return []
        return [p for p in group.parameters() if p.requires_grad]

    def on_before_optimizer_step(self, optimizer) -> None:
        # None, not zero: AdamW leaves parameters without a gradient alone (no momentum, no decay)
        for p in self._inactive_parameters(self._stage()):
            p.grad = None
