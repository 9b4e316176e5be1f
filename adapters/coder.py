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

from adapters.base import register_adapter
from adapters.cached import TrainableCacheAdapter
from adapters.errors import ConfigError
from adapters.heads import CLIP_SCALE, FitData, Head, HeadSkipped, TipAdapterHead, register_head
from adapters.protocol import canonical_dataset
from adapters.stores import ExtractionStore, register_store
from adapters.textsets import KINDS, EmbeddedTextSet, build_text_set

#: Per-dataset gap thresholds of stage 2 (``utils.get_thres`` of the reference code).
RERANK_TAU = {"imagenet": 0.1, "imagenet_v2": 0.05, "places365": 0.1, "caltech101": 0.3, "dtd": 0.6, "cub200": 0.2,
              "eurosat": 0.3, "food101": 0.1, "oxford_pets": 0.1}
_NS = (KINDS.index("name"), KINDS.index("syno"))
#: CODER-Adapter's text kinds (the reference's ``['name', 'att', 'ana']``: no synonyms, descriptions or
#: one-to-one texts in its CODER vectors).
ADAPTER_KINDS = tuple(KINDS.index(k) for k in ("name", "att", "ana"))


def adapter_texts(text_set: EmbeddedTextSet) -> torch.Tensor:
    """The text embeddings CODER-Adapter builds its vectors from (`ADAPTER_KINDS`), [M', D]."""
    keep = torch.isin(text_set.kinds, torch.tensor(ADAPTER_KINDS))
    return text_set.embeddings[keep].float()


def coder_features(x: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """CODER vectors: cosine similarities to every text, re-normalised (§3.6). [B, M]."""
    return F.normalize(F.normalize(x.float(), dim=-1) @ text_embeddings.T, dim=-1)


def _text_set(data: FitData) -> EmbeddedTextSet:
    text_set = EmbeddedTextSet.from_tensors(data.extras)
    if text_set is None:
        raise HeadSkipped("needs a CODER text set in the feature file (extract with store: {coder: {...}})")
    return text_set


@register_store
class CoderTextSetStore(ExtractionStore):
    """CODER's text set, embedded by the backbone that embeds the images, stored as ``coder.*`` tensors.

    The class names alone give one name text per class; the options add local files
    (`adapters.textsets.build_text_set`: ``synonyms``, ``attributes``, ``analogous``, ``descriptions``,
    ``one_to_one``; ``task``; ``analogous_threshold``). Stored by default.
    """

    name = "coder"
    default = True

    def __init__(self, **options):
        self.options = options
        self.text_set: EmbeddedTextSet | None = None

    def setup(self, backbone, class_names, dataset) -> None:
        if class_names and self.text_set is None:
            texts = build_text_set(class_names, dataset, embed=backbone.encode_text, **self.options)
            self.text_set = EmbeddedTextSet.from_text_set(texts, backbone.encode_text)

    def file_tensors(self, backbone) -> dict[str, torch.Tensor]:
        return {} if self.text_set is None else self.text_set.tensors()


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
    original_only = True
    reads = (EmbeddedTextSet.PREFIX,)

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

    def _row_cost(self) -> int:
        return len(self.classifier.embeddings) + 4 * self.num_classes

    def _logits(self, x: torch.Tensor, text_x: torch.Tensor | None) -> torch.Tensor:
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
    min-max normalised affinities: ``100 x W^T + alpha * exp(-beta (1 - minmax(phi(x) K^T))) L``, the
    vectors over the name, attribute and analogous-class texts (`ADAPTER_KINDS`, as the reference).
    Searched on val over the reference's 500 x 50 grid, then ``refinements`` rounds over
    [0.5, 1.5] x the best."""

    name = "coder_adapter"
    reads = (EmbeddedTextSet.PREFIX,)
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
        self.register_buffer("text_embeddings", adapter_texts(_text_set(data)))
        super()._fit(data, keys)

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
        # a refinement window's edge is not a truncated search; a round-1 edge is, unless refining left it
        if self.refinements:
            notes = [f"{n} in round 1; {self.refinements} refinement rounds then chose alpha={best[0]:.4g}, "
                     f"beta={best[1]:.4g}" if "edge of its grid" in n else n for n in notes]
        self.notes = notes
        return best

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Round 1: Tip-Adapter's formula on [0.1, max); refinement rounds: around the last best."""
        refined = getattr(self, "_refined", None)
        return refined if refined is not None else super().grid()


@register_adapter
class CoderAdapter(TrainableCacheAdapter):
    """Trainable CODER-Adapter: CODER cache keys fine-tuned with cross-entropy (Tip-Adapter-F style).

    alpha and beta stay at ``init_alpha``/``init_beta`` during training (as Tip-Adapter-F does), then are
    searched on val on the ``search_steps`` grid, without refinement rounds (`CoderAdapterHead`): *ours*,
    the reference's CODER-Adapter is training-free. Needs a feature file with a CODER text set.

    Args:
        init_alpha: alpha during training.
        init_beta: beta during training.
        search_steps: (beta steps, alpha steps) of the final search (the reference uses 500 x 50).
        **kwargs: `AdapterModule` arguments.
    """

    method = "coder_adapter"

    def __init__(self, init_alpha: float = 1.0, init_beta: float = 1.0, search_steps: tuple[int, int] = (200, 20),
                 **kwargs):
        super().__init__(init_alpha=init_alpha, init_beta=init_beta, **kwargs)
        self.register_buffer("text_set_embeddings", torch.zeros(0, self.embed_dim))

    def setup(self, stage: str) -> None:
        if not self.has_train_set:
            text_set = EmbeddedTextSet.from_tensors(self.data.extras) if self.data is not None else None
            if text_set is None:
                raise ConfigError("data: CoderAdapter needs a feature file with a CODER text set "
                                  "(train.py predict with store: {coder: {...}})")
            self.text_set_embeddings = adapter_texts(text_set).to(self.device)
        super().setup(stage)

    def key_map(self, x: torch.Tensor) -> torch.Tensor:
        return coder_features(x, self.text_set_embeddings)

    def affinity(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return minmax_affinity(queries @ keys.T)

    def new_head(self) -> CoderAdapterHead:
        beta_steps, alpha_steps = self.hparams.search_steps
        return CoderAdapterHead(self.hparams.dataset, beta_steps=beta_steps, alpha_steps=alpha_steps, refinements=0,
                                init_alpha=self.hparams.init_alpha, init_beta=self.hparams.init_beta)

    def head_extras(self) -> dict:
        kinds = torch.full((len(self.text_set_embeddings),), ADAPTER_KINDS[0])  # already the adapter's texts
        texts = EmbeddedTextSet(self.text_set_embeddings.cpu(), torch.zeros(len(kinds), dtype=torch.long), kinds,
                                torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, self.embed_dim))
        return texts.tensors()
