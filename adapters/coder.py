"""CODER: an image as its similarities to many texts about the classes (Yi et al., CVPR 2024).

Spec: ../shared/reference/methods-coder-gda-iso.md §3 (the authors' code; the paper's text was not
available). The text sets come from `adapters.textsets` and are stored, embedded by the same backbone
as the images, in feature files (``coder.*`` tensors, written by ``train.py predict``).

* ``coder`` head (zero-shot): stage 1 scores class c by the mean of the image's similarities to c's
  attribute/analogous/description texts together with its best name-or-synonym similarity; stage 2
  (``rerank``) re-orders the top 5 of images whose top-1/top-2 softmax gap is below tau by the
  one-to-one gap scores g_c (§3.5). Reranking only permutes the top 5; stage-1 scores of the others stay.
* ``coder_adapter`` head (training-free CODER-Adapter, §3.6): Tip-Adapter on CODER vectors
  ``phi(x) = norm(norm(x) T^T)`` with per-query min-max normalised affinities; beta/alpha searched on val
  over the reference's 500 x 50 grid plus two refinement rounds.
* `CoderAdapter` (trainable, Tip-Adapter-F style): the cache keys are fine-tuned with cross-entropy, alpha
  and beta fixed during training, searched on val afterwards; exported like every adapter.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adapters.base import AdapterModule, register_adapter
from adapters.errors import ConfigError
from adapters.heads import CLIP_SCALE, FitData, Head, HeadSkipped, TipAdapterHead, register_head
from adapters.protocol import canonical_dataset
from adapters.textsets import KINDS, EmbeddedTextSet

#: Per-dataset gap thresholds of stage 2 (``utils.get_thres`` of the reference code).
RERANK_TAU = {"imagenet": 0.1, "imagenet_v2": 0.05, "places365": 0.1, "caltech101": 0.3, "dtd": 0.6, "cub200": 0.2,
              "eurosat": 0.3, "food101": 0.1, "oxford_pets": 0.1}
_NS = (KINDS.index("name"), KINDS.index("syno"))


def coder_features(x: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """CODER vectors: cosine similarities to every text, re-normalised (§3.6). [B, M]."""
    return F.normalize(F.normalize(x.float(), dim=-1) @ text_embeddings.T, dim=-1)


def _text_set(data: FitData) -> EmbeddedTextSet:
    text_set = data.extras.get("text_set")
    if text_set is None:
        raise HeadSkipped("needs a CODER text set in the feature file (extract with train.py predict)")
    return text_set


class CoderClassifier(nn.Module):
    """Stage-1 scores and stage-2 reranking for one embedded text set (all batched)."""

    def __init__(self, text_set: EmbeddedTextSet, num_classes: int):
        super().__init__()
        ts = text_set
        self.register_buffer("embeddings", ts.embeddings.float())
        name_syno = (ts.kinds == _NS[0]) | (ts.kinds == _NS[1])
        onehot = F.one_hot(ts.classes, num_classes).T.float()  # [C, M]
        self.register_buffer("aa", onehot * (~name_syno).float())  # attribute-like texts per class
        counts = self.aa.sum(1)
        self.register_buffer("aa_count", counts)
        # name/synonym text indices per class, padded with -1, for a batched max
        per_class = [torch.nonzero((ts.classes == c) & name_syno).flatten() for c in range(num_classes)]
        if any(len(p) == 0 for p in per_class):
            missing = next(c for c, p in enumerate(per_class) if len(p) == 0)
            raise ConfigError(f"CODER text set: class {missing} has no name text")
        width = max(len(p) for p in per_class)
        self.register_buffer("ns_index", torch.stack([F.pad(p, (0, width - len(p)), value=-1) for p in per_class]))
        # ordered pair -> row of ovo_means (-1: no one-to-one texts for that pair)
        pair_index = torch.full((num_classes, num_classes), -1, dtype=torch.long)
        if len(ts.ovo_pairs):
            pair_index[ts.ovo_pairs[:, 0], ts.ovo_pairs[:, 1]] = torch.arange(len(ts.ovo_pairs))
        self.register_buffer("pair_index", pair_index)
        self.register_buffer("ovo_means", ts.ovo_means.float())

    def stage1(self, x: torch.Tensor) -> torch.Tensor:
        """``100 * (sum of attribute-like sims + max name/synonym sim) / (n_attribute-like + 1)``."""
        sims = F.normalize(x.float(), dim=-1) @ self.embeddings.T  # [B, M]
        ns = sims[:, self.ns_index.clamp_min(0)].masked_fill(self.ns_index < 0, float("-inf")).amax(-1)
        return CLIP_SCALE * (sims @ self.aa.T + ns) / (self.aa_count + 1)

    def rerank(self, x: torch.Tensor, logits: torch.Tensor, tau: float, k: int = 5) -> torch.Tensor:
        """Re-order the top k of low-confidence rows by the one-to-one gap scores; other entries unchanged."""
        k = min(k, logits.shape[1])
        probs = logits.softmax(-1)
        top2 = probs.topk(2, dim=-1).values
        rows = torch.nonzero(top2[:, 0] - top2[:, 1] < tau).flatten()
        if len(rows) == 0 or len(self.ovo_means) == 0:
            return logits
        top = logits[rows].topk(k, dim=-1)  # values, indices [R, k]
        cls = top.indices
        idx = self.pair_index[cls[:, :, None], cls[:, None, :]]  # [R, k, k]: c -> c'
        f = F.normalize(x[rows].float(), dim=-1)
        mean_sim = torch.einsum("rd,rijd->rij", f, self.ovo_means[idx.clamp_min(0)])
        # A pair scores only when both directions have one-to-one texts; otherwise its term is 0 (the
        # reference's try/except around the pair). Keeping a one-sided similarity would reward the
        # classes an LLM happened to be asked about, not the image.
        both = (idx >= 0) & (idx >= 0).transpose(1, 2)
        gap = (mean_sim - mean_sim.transpose(1, 2)).masked_fill(~both, 0.0).sum(-1) / (k - 1)
        # new order inside the top k: by gap, ties kept in the stage-1 order
        order_key = gap - 1e-6 * torch.arange(k, dtype=gap.dtype)
        new_rank = order_key.argsort(dim=-1, descending=True)  # positions sorted best-first
        reranked = logits[rows].clone()
        # give the top-k classes the stage-1 top-k values, re-assigned in the new order
        reranked.scatter_(1, torch.gather(cls, 1, new_rank), top.values)
        out = logits.clone()
        out[rows] = reranked
        return out


@register_head
class CoderHead(Head):
    """CODER zero-shot classification: stage 1, plus stage-2 reranking when ``rerank`` (tau per dataset
    from the reference, or ``tau``)."""

    name = "coder"

    def __init__(self, dataset: str | None = None, rerank: bool = True, tau: float | None = None):
        super().__init__(dataset)
        self.rerank, self.tau = rerank, tau

    def _fit(self, data: FitData) -> None:
        self.classifier = CoderClassifier(_text_set(data), data.num_classes)
        tau = self.tau if self.tau is not None else RERANK_TAU.get(canonical_dataset(self.dataset) or "")
        self.active_tau = tau if self.rerank and len(self.classifier.ovo_means) else None
        if self.rerank and tau is None:
            self.notes.append("no rerank threshold for this dataset (set tau)")
        elif self.rerank and not len(self.classifier.ovo_means):
            self.notes.append("no one-to-one texts: stage 1 only")
        if self.active_tau is not None:
            self.hparams = {"tau": self.active_tau}

    def forward(self, x: torch.Tensor, text_x: torch.Tensor | None = None) -> torch.Tensor:
        x = x if text_x is None else text_x  # CODER works on the original embeddings
        logits = self.classifier.stage1(x)
        return logits if self.active_tau is None else self.classifier.rerank(x, logits, self.active_tau)


def minmax_affinity(affinity: torch.Tensor) -> torch.Tensor:
    """Per-query min-max normalisation of cache affinities to [0, 1] (CODER-Adapter)."""
    lo, hi = affinity.aminmax(dim=-1, keepdim=True)
    return (affinity - lo) / (hi - lo).clamp_min(1e-12)


@register_head
class CoderAdapterHead(TipAdapterHead):
    """Training-free CODER-Adapter: Tip-Adapter with CODER vectors as keys and queries and per-query
    min-max normalised affinities: ``100 x W^T + alpha * exp(-beta (1 - minmax(phi(x) K^T))) L``.
    Searched on val over the reference's 500 x 50 grid, then ``refinements`` rounds over
    [0.5, 1.5] x the best."""

    name = "coder_adapter"
    wide_image_only_search = False  # the reference's own grid and refinements, with or without text

    def __init__(self, dataset: str | None = None, beta_max: float = 200.0, alpha_max: float = 20.0,
                 beta_steps: int = 500, alpha_steps: int = 50, refinements: int = 2, chunk: int = 20,
                 init_alpha: float = 1.0, init_beta: float = 1.0):
        super().__init__(dataset, beta_scale=beta_max, alpha_scale=alpha_max, beta_steps=beta_steps,
                         alpha_steps=alpha_steps, chunk=chunk)
        self.refinements, self.init_alpha, self.init_beta = refinements, init_alpha, init_beta

    def _cache_keys(self, data: FitData) -> torch.Tensor:
        return coder_features(data.train_x, self.text_embeddings)

    def _fit(self, data: FitData, keys: torch.Tensor | None = None) -> None:
        self.register_buffer("text_embeddings", _text_set(data).embeddings.float())
        super()._fit(data, keys)

    def fit_keys(self, data: FitData, keys: torch.Tensor, hparams: dict | None = None) -> "CoderAdapterHead":
        """Fit with given (e.g. fine-tuned) CODER keys instead of the training features' own."""
        self._given = hparams
        self._fit(data, keys=keys)
        return self

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        return minmax_affinity(self.cache.affinity(coder_features(x, self.text_embeddings)))

    def search(self, val_x, val_y, val_text_x=None) -> tuple[float, float]:
        """Tip-Adapter's vectorised search on this grid, then the reference's refinement rounds."""
        self._refined = None
        best = super().search(val_x, val_y, val_text_x)  # notes a round-1 value on its grid's edge
        notes = list(self.notes)
        for _ in range(self.refinements):
            alpha, beta = best
            self._refined = (torch.linspace(0.5 * beta, 1.5 * beta, self.beta_steps),
                             torch.linspace(0.5 * alpha, 1.5 * alpha, self.alpha_steps))
            best = super().search(val_x, val_y, val_text_x)
        self._refined = None
        self.notes = notes  # a refinement window's edge is not a truncated search
        return best

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Round 1: Tip-Adapter's formula on [0.1, max); refinement rounds: around the last best."""
        refined = getattr(self, "_refined", None)
        return refined if refined is not None else super().grid()


@register_adapter
class CoderAdapter(AdapterModule):
    """Trainable CODER-Adapter: CODER cache keys fine-tuned with cross-entropy (Tip-Adapter-F style).

    alpha and beta stay at ``init_alpha``/``init_beta`` during training (as Tip-Adapter-F does), then are
    searched on val (`CoderAdapterHead.search`). Needs a feature file with a CODER text set.

    Args:
        init_alpha: alpha during training.
        init_beta: beta during training.
        search_steps: (beta steps, alpha steps) of the final search (the reference uses 500 x 50).
        **kwargs: `AdapterModule` arguments.
    """

    method = "coder_adapter"

    def __init__(self, init_alpha: float = 1.0, init_beta: float = 1.0, search_steps: tuple[int, int] = (200, 20),
                 **kwargs):
        super().__init__(**kwargs)
        self.keys = nn.Parameter(torch.zeros(0, 0))
        self.register_buffer("text_set_embeddings", torch.zeros(0, self.embed_dim))
        self.register_buffer("train_labels", torch.zeros(0, dtype=torch.long))
        self.head_hparams: dict | None = None
        self._val = None
        self.__dict__["_head"] = None  # derived, never a submodule (see DACAdapter)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.keys.numel():  # restored from a checkpoint or an export
            return
        dm = self.trainer.datamodule
        text_set = getattr(dm, "text_set", None)
        if text_set is None:
            raise ConfigError("data: CoderAdapter needs a feature file with a CODER text set (train.py predict)")
        train, val = (None if s is None else self.embed_split(s) for s in dm.head_data())
        self.text_set_embeddings = text_set.embeddings.float().to(self.device)
        self.keys = nn.Parameter(coder_features(train.features, self.text_set_embeddings.cpu()).to(self.device))
        self.train_labels = train.labels.to(self.device)
        if val is not None:
            self._val = (F.normalize(val.features.float(), dim=-1), val.labels)
            self._val_name = val.name

    def logits(self, features: torch.Tensor, alpha: float | None = None, beta: float | None = None) -> torch.Tensor:
        if alpha is None and self.head is not None:
            return self.head(features.cpu()).to(features.device)
        alpha = self.hparams.init_alpha if alpha is None else alpha
        beta = self.hparams.init_beta if beta is None else beta
        affinity = minmax_affinity(coder_features(features, self.text_set_embeddings) @ self.keys.T)
        cache = torch.exp(-beta * (1 - affinity)) @ F.one_hot(self.train_labels, self.hparams.num_classes).float()
        if not self.has_text:
            return cache
        return CLIP_SCALE * F.normalize(features.float(), dim=-1) @ self.text_features.T + alpha * cache

    def training_loss(self, features: torch.Tensor, labels: torch.Tensor):
        if features.ndim == 3:
            features = F.normalize(features.mean(1), dim=-1)
        alpha, beta = self.hparams.init_alpha, self.hparams.init_beta
        return F.cross_entropy(self.logits(features, alpha, beta), labels), {}

    def _evaluate(self, batch, metrics) -> dict:
        if self.head_hparams is None:
            self.__dict__["_head"] = None  # during training: init alpha/beta on the current keys
        return super()._evaluate(batch, metrics)

    @property
    def head(self) -> CoderAdapterHead | None:
        return self.__dict__["_head"]

    def finalize(self) -> None:
        if not self.keys.numel():
            return
        text_set = EmbeddedTextSet(self.text_set_embeddings.cpu(), torch.zeros(0), torch.zeros(0),
                                   torch.zeros(0, 2), torch.zeros(0, self.embed_dim))
        val_x, val_y = self._val if self._val is not None and self.head_hparams is None else (None, None)
        data = FitData(torch.zeros(len(self.train_labels), self.embed_dim), self.train_labels.cpu(),
                       self.hparams.num_classes, text=self.text_features.cpu() if self.has_text else None,
                       val_x=None if val_x is None else val_x.cpu(), val_y=None if val_y is None else val_y.cpu(),
                       dataset=self.hparams.dataset, extras={"text_set": text_set})
        beta_steps, alpha_steps = self.hparams.search_steps
        head = CoderAdapterHead(self.hparams.dataset, beta_steps=beta_steps, alpha_steps=alpha_steps, refinements=0,
                                init_alpha=self.hparams.init_alpha, init_beta=self.hparams.init_beta)
        given = self.head_hparams or (None if val_x is not None else
                                      {"alpha": self.hparams.init_alpha, "beta": self.hparams.init_beta})
        head.fit_keys(data, self.keys.detach().cpu(), hparams=given)
        self.head_hparams = dict(head.hparams)
        if head.searched:
            self.selection["head"] = getattr(self, "_val_name", "val")
        self.__dict__["_head"] = head

    def export_config(self) -> dict:
        return {"head_hparams": self.head_hparams}

    def load_export_config(self, config: dict) -> None:
        self.head_hparams = config.get("head_hparams")
