"""Training-free few-shot heads on cached CLIP features.

Every head has the same life cycle::

    head = build_head("tip", dataset="caltech101")
    head.fit(FitData(train_x, train_y, num_classes, text=W, val_x=vx, val_y=vy))
    logits = head(test_x)            # [M, C]
    head.hparams, head.notes         # what was chosen (on val) and how the head ran

Inputs are L2-normalised post-projection CLIP features. ``text`` is the zero-shot classifier [C, D]
(`FrozenCLIP.zero_shot_classifier`) or None; heads that need it run their image-only part (said in
``notes``) or are skipped with a reason (`HeadSkipped`). Hyper-parameters are chosen on ``val_x`` /
``val_y`` only, with vectorised grid searches (one batched evaluation per chunk of the grid, no Python
loop over grid points). Specs: ../shared/reference/methods-coder-gda-iso.md §1, §2, §4.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from adapters.errors import ConfigError
from adapters.protocol import tip_search_config
from adapters.stores import ExtractionStore, register_store

#: CLIP's logit scale, applied to the zero-shot term only (as all reference codes do).
CLIP_SCALE = 100.0

#: Bound on one block of work: a [queries x keys] affinity block, or a [grid x queries x classes] block
#: of a search, holds at most this many elements (2**25 float32 = 128 MB), whatever the number of
#: queries, keys and classes. None computes whole matrices (the unchunked path, for comparison).
CHUNK_ELEMENTS: int | None = 1 << 25


@contextlib.contextmanager
def chunking(elements: int | None):
    """Set `CHUNK_ELEMENTS` inside the block (``evaluate.py --chunk_mb``)."""
    global CHUNK_ELEMENTS
    previous, CHUNK_ELEMENTS = CHUNK_ELEMENTS, elements
    try:
        yield
    finally:
        CHUNK_ELEMENTS = previous


def row_chunks(rows: int, per_row: int) -> list[slice]:
    """Slices of ``rows`` queries such that a block of ``per_row`` elements per query fits the bound."""
    if CHUNK_ELEMENTS is None or rows == 0:
        return [slice(0, rows)]
    step = max(1, CHUNK_ELEMENTS // max(1, per_row))
    return [slice(s, min(rows, s + step)) for s in range(0, rows, step)]


class HeadSkipped(Exception):
    """The head cannot run on this input (e.g. it needs text features and the file has none)."""


@dataclass
class FitData:
    """What a head may look at when it is fit: training features, the text classifier, val data."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    num_classes: int
    text: torch.Tensor | None = None
    val_x: torch.Tensor | None = None
    val_y: torch.Tensor | None = None
    dataset: str | None = None
    #: Features for the zero-shot (text) term on val when they differ from ``val_x``: TA++ and DAC
    #: score the cache on adapted features but the text term on the original ones.
    val_text_x: torch.Tensor | None = None
    #: File-level tensors a head declared it reads (`Head.reads`), by their full names in the file.
    extras: dict = field(default_factory=dict)
    #: The feature file's metadata (``backbone``, ``pretrained``, ...).
    metadata: dict = field(default_factory=dict)
    #: Every augmented view of each training image as its own row, [N, V, D] (``train_x`` holds the
    #: per-image pooled rows): what heads whose reference fits on views take (`Head.fits_on_views`).
    train_views: torch.Tensor | None = None
    #: Features for the zero-shot (text) term of the training rows when they differ from ``train_x``
    #: (Tip-X's cache-side text distributions on adapted features).
    train_text_x: torch.Tensor | None = None
    #: L2-normalise the features (post-projection embeddings); False for pre-projection features.
    normalize: bool = True

    def __post_init__(self) -> None:
        norm = (lambda t: F.normalize(t.float(), dim=-1)) if self.normalize else (lambda t: t.float())
        self.train_x = norm(self.train_x)
        self.train_y = self.train_y.long()
        if self.train_views is not None:
            self.train_views = norm(self.train_views)
        self.train_text_x = self.train_x if self.train_text_x is None else F.normalize(self.train_text_x.float(), dim=-1)
        if self.text is not None:
            if self.text.shape[0] != self.num_classes:
                raise ConfigError(f"text features: {self.text.shape[0]} classes but the data has {self.num_classes}")
            self.text = F.normalize(self.text.float(), dim=-1)
        if self.val_x is not None:
            self.val_x = norm(self.val_x)
            self.val_y = self.val_y.long()
            self.val_text_x = self.val_x if self.val_text_x is None else F.normalize(self.val_text_x.float(), dim=-1)

    @property
    def has_val(self) -> bool:
        return self.val_x is not None and len(self.val_x) > 0


HEADS: dict[str, type[Head]] = {}


def register_head(cls: type[Head]) -> type[Head]:
    """Class decorator: make a head available by its ``name`` to `build_head` and ``evaluate.py``."""
    HEADS[cls.name] = cls
    return cls


def build_head(name: str, **config) -> Head:
    """Instantiate a registered head by name; unknown names are a `ConfigError` listing the known ones."""
    if name not in HEADS:
        raise ConfigError(f"heads: unknown head {name!r} (known: {', '.join(sorted(HEADS))})")
    return HEADS[name](**config)


def class_means(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class mean of rows of ``x`` [C, D] (zeros for a class with no sample)."""
    sums = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, y, x)
    counts = torch.bincount(y, minlength=num_classes).clamp_min(1).to(x.dtype)
    return sums / counts[:, None]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy of logits [..., M, C] against labels [M], reduced over M."""
    return correct(logits, labels).float() / len(labels)


def correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Number of correct top-1 predictions of logits [..., M, C] against labels [M]: [...] (integers, so
    that sums over blocks of queries are exact and ties are ties)."""
    return (logits.argmax(-1) == labels).sum(-1)


def mixing_accuracy(base: torch.Tensor, extra: torch.Tensor, labels: torch.Tensor,
                    alphas: torch.Tensor) -> torch.Tensor:
    """Accuracy of ``argmax(base + alpha * extra)`` for every alpha at once: [..., A]."""
    return mixing_correct(base, extra, labels, alphas).float() / len(labels)


def mixing_correct(base: torch.Tensor, extra: torch.Tensor, labels: torch.Tensor,
                   alphas: torch.Tensor) -> torch.Tensor:
    """Number of correct predictions of ``argmax(base + alpha * extra)`` for every alpha at once: [..., A].

    ``base`` [M, C] (or broadcastable) and ``extra`` [..., M, C]. The true class y wins at alpha iff
    for every other class c: ``(base_y - base_c) + alpha * (extra_y - extra_c) > 0``, an intersection of
    half-lines, i.e. an open interval (lo, hi) per sample. So the alpha axis costs O(M C), not
    O(A M C), and no [A, M, C] tensor is built. Exact except for exact ties (measure zero), which
    count as errors.
    """
    idx = labels[:, None]
    d_base = base.gather(-1, idx.expand(base.shape[:-1] + (1,))) - base
    d_extra = extra.gather(-1, idx.expand(extra.shape[:-1] + (1,))) - extra
    d_base, d_extra = torch.broadcast_tensors(d_base, d_extra)
    is_true = F.one_hot(labels, base.shape[-1]).bool()
    cross = -d_base / d_extra  # alpha where class c draws level with y
    lo = torch.where(d_extra > 0, cross, -math.inf).amax(-1)
    hi = torch.where(d_extra < 0, cross, math.inf).amin(-1)
    never = ((d_extra == 0) & (d_base <= 0) & ~is_true).any(-1)
    alphas = alphas.to(lo.device, lo.dtype)
    wins = (alphas > lo[..., None]) & (alphas < hi[..., None]) & ~never[..., None]
    return wins.sum(-2)


def first_best(acc: torch.Tensor) -> tuple[int, ...]:
    """Index of the first maximum in row-major order (the reference codes' strict ``>`` search)."""
    flat = int(torch.argmax(acc.flatten()))  # torch.argmax returns the first maximal index
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), acc.shape))


class Head(nn.Module):
    """Base class of the training-free heads: ``fit`` on `FitData`, then ``forward(x) -> logits``.

    A head declares what it needs, and the evaluation pipeline asks (it never names a head):
    `inputs`, `original_only`, `reads`, `needs_text`, `in_default_set`.
    """

    name: ClassVar[str]
    #: Whether the head is meaningless without text features (it is then skipped).
    needs_text: ClassVar[bool] = False
    #: The per-row features the head takes: ``"embeddings"`` (L2-normalised post-projection CLIP
    #: embeddings) or the name of a per-row tensor stored at extraction (``"preproj"``), with
    #: `inputs_hint` saying how to get it.
    inputs: ClassVar[str] = "embeddings"
    inputs_hint: ClassVar[str] = ""
    #: Only meaningful on the original CLIP features (not run on an adapter's adapted features).
    original_only: ClassVar[bool] = False
    #: Prefixes of the file-level tensors the head reads (e.g. ``("coder.",)``), passed in `FitData.extras`.
    reads: ClassVar[tuple[str, ...]] = ()
    #: Run by ``evaluate.py`` when ``--heads`` is not given.
    in_default_set: ClassVar[bool] = True
    #: Fits on every augmented view as its own row when the data has them (`FitData.train_views`).
    fits_on_views: ClassVar[bool] = False

    def __init__(self, dataset: str | None = None):
        super().__init__()
        self.dataset = dataset
        self.hparams: dict[str, float | int | str] = {}
        self.notes: list[str] = []
        #: Whether hyper-parameters were chosen on the val data given to `fit` (records say so).
        self.searched = False

    def fit(self, data: FitData, hparams: dict | None = None, **inputs) -> Head:
        """Fit on ``data``; with ``hparams`` (e.g. restored from an export) no search is run. ``inputs``
        are head-specific (a cache head takes trained ``keys``)."""
        if self.needs_text and data.text is None:
            raise HeadSkipped(f"{self.name} needs text features (a zero-shot classifier); the file has none")
        self._given = dict(hparams) if hparams is not None else None
        self.num_classes = data.num_classes
        self._fit(data, **inputs)
        return self

    def _fit(self, data: FitData) -> None:
        raise NotImplementedError

    def adapted_note(self, has_text: bool) -> str | None:
        """What a record of this head on an adapter's adapted features should say (None: nothing)."""
        return None

    def forward(self, x: torch.Tensor, text_x: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [M, C]; ``text_x`` are the features for the zero-shot term when they differ from ``x``.
        Computed over blocks of queries (`row_chunks`, each head's `_logits`): the work of one block is
        bounded whatever M, and the output is the only [M, C] tensor."""
        out = None
        for rows in row_chunks(len(x), self._row_cost()):
            block = self._logits(x[rows], None if text_x is None else text_x[rows])
            if out is None:
                out = torch.empty((len(x),) + block.shape[1:], dtype=block.dtype, device=block.device)
            out[rows] = block
        return out

    def _logits(self, x: torch.Tensor, text_x: torch.Tensor | None) -> torch.Tensor:
        """Logits of one block of queries."""
        raise NotImplementedError

    def _row_cost(self) -> int:
        """Elements of work per query in `_logits` (a few [C]-sized rows by default)."""
        return 4 * self.num_classes

    def _zero_shot(self, x: torch.Tensor, text_x: torch.Tensor | None) -> torch.Tensor:
        x = x if text_x is None else F.normalize(text_x.float(), dim=-1)
        return CLIP_SCALE * x @ self.text.T

    def _note_edge(self, name: str, index: int, grid: torch.Tensor | tuple, why: str = "") -> None:
        """Say so when a searched value is the first or last point of its grid: the best value may lie
        outside the range searched (or the range's bound is the answer)."""
        values = torch.as_tensor(grid, dtype=torch.float64).flatten()
        if len(values) > 1 and index in (0, len(values) - 1):
            side = "lower" if index == 0 else "upper"
            self.notes.append(f"{name}={float(values[index]):.4g} is at the {side} edge of its grid "
                              f"[{float(values[0]):.4g}, {float(values[-1]):.4g}]{why}")

    def _skip_search(self, data: FitData, what: str) -> bool:
        """True when the search must not run: hyper-parameters were given, or there is no val split."""
        if self._given is not None:
            return True
        if data.has_val:
            self.searched = True
            return False
        self.notes.append(f"no val split: {what} at default")
        return True


@register_head
class ZeroShotHead(Head):
    """Zero-shot CLIP: ``100 * x @ W.T`` with W the prompt-ensemble text classifier."""

    name = "zeroshot"
    needs_text = True
    original_only = True

    def _fit(self, data: FitData) -> None:
        self.register_buffer("text", data.text)

    def _logits(self, x: torch.Tensor, text_x: torch.Tensor | None) -> torch.Tensor:
        return self._zero_shot(F.normalize(x.float(), dim=-1), text_x)


@register_head
class PrototypeHead(Head):
    """Nearest class mean: cosine to the L2-normalised mean of each class's few-shot features."""

    name = "prototype"

    def _fit(self, data: FitData) -> None:
        self.register_buffer("prototypes", F.normalize(class_means(data.train_x, data.train_y, data.num_classes), dim=-1))

    def _logits(self, x: torch.Tensor, text_x: torch.Tensor | None) -> torch.Tensor:
        return CLIP_SCALE * F.normalize(x.float(), dim=-1) @ self.prototypes.T


class CacheModel(nn.Module):
    """Tip-Adapter's key-value cache: ``exp(-beta * (1 - x @ keys.T)) @ one_hot(values)``.

    Shared by Tip-Adapter, DAC's inference head and CODER-Adapter. Keys are stored sorted by label so
    that, when every class has the same number of keys (the K-shot case), the per-class sum is a
    reshape-and-sum; otherwise an exact ``index_add`` on the label index. Neither needs an [N, C]
    one-hot matmul.
    """

    def __init__(self, keys: torch.Tensor, labels: torch.Tensor, num_classes: int):
        super().__init__()
        order = torch.argsort(labels, stable=True)
        self.register_buffer("order", order)  # key j of the cache is row order[j] of the inputs
        self.register_buffer("keys", keys[order])
        self.register_buffer("labels", labels[order].long())
        self.num_classes = num_classes
        counts = torch.bincount(self.labels, minlength=num_classes)
        self.shots_per_class = int(counts[0]) if bool((counts == counts[0]).all()) and counts[0] > 0 else 0

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.keys.T

    def from_affinity(self, affinity: torch.Tensor, beta: torch.Tensor | float,
                      buffer: torch.Tensor | None = None, shift: torch.Tensor | None = None) -> torch.Tensor:
        """Cache logits [*beta.shape, M, C] for affinities [M, N]: a tensor of betas adds leading dims.

        ``buffer`` (at least [*beta.shape, M, N]) is reused for the weights, which saves a large
        allocation per call during grid searches. ``shift`` [M, 1] (a per-query maximum affinity)
        computes ``exp(-beta (shift - A))`` instead of ``exp(-beta (1 - A))``: the same logits up to a
        positive factor per query (so the same ranking), without underflow at large beta.
        """
        beta = torch.as_tensor(beta, dtype=affinity.dtype, device=affinity.device)
        beta = beta.reshape(beta.shape + (1,) * affinity.ndim)
        centred = affinity - (1 if shift is None else shift)
        if buffer is None:
            weights = beta * centred
        else:
            weights = torch.mul(beta, centred, out=buffer[: beta.shape[0]] if beta.ndim > affinity.ndim else buffer)
        return self.class_sum(weights.exp_())

    def class_sum(self, weights: torch.Tensor) -> torch.Tensor:
        """``weights @ L``: per-query weights of the keys [..., M, N] summed per class, [..., M, C]."""
        if self.shots_per_class:
            return weights.unflatten(-1, (self.num_classes, self.shots_per_class)).sum(-1)
        out = torch.zeros(weights.shape[:-1] + (self.num_classes,), dtype=weights.dtype, device=weights.device)
        return out.index_add_(-1, self.labels, weights)

    def log_from_affinity(self, affinity: torch.Tensor, beta: float) -> torch.Tensor:
        """``log`` of `from_affinity`'s cache logits [M, C], computed as a per-class logsumexp of
        ``-beta (1 - A)``: finite at any beta (a class without keys is -inf)."""
        z = beta * (affinity - 1)
        if self.shots_per_class:
            return z.unflatten(-1, (self.num_classes, self.shots_per_class)).logsumexp(-1)
        top = torch.full(z.shape[:-1] + (self.num_classes,), -math.inf, dtype=z.dtype, device=z.device)
        top = top.scatter_reduce(-1, self.labels.expand_as(z), z, reduce="amax")
        total = torch.zeros_like(top).index_add_(-1, self.labels, (z - top[..., self.labels]).exp())
        return total.log() + top

    def forward(self, x: torch.Tensor, beta: float) -> torch.Tensor:
        return self.from_affinity(self.affinity(x), beta)


@register_head
class TipAdapterHead(Head):
    """Tip-Adapter (training-free): ``100 x W.T + alpha * exp(-beta (1 - x K.T)) L``.

    Keys K are the few-shot features (in the shared feature files, already the mean of 10 augmented
    views), values L their one-hot labels. With text features, alpha and beta are searched on val over
    Tip-Adapter's grid: ``beta_i = 0.1 + i (s_beta - 0.1) / 200`` (200 values) and
    ``alpha_j = 0.1 + j (s_alpha - 0.1) / 20`` (20 values), with the per-dataset scales of the official
    configs; the first best point wins.

    Without text features only the cache term remains ("cache only"): alpha cannot change the argmax,
    and the official per-dataset beta ranges, set for text + cache, truncate the search (the optimum
    of the cache alone lies at larger beta). So beta is searched on a log grid over
    ``image_only_betas`` (0.1 to 1000; at 1000 the cache is a nearest-neighbour classifier), then
    refined linearly between the neighbours of the best point. The logits are then the log of the
    cache term (same ranking as the cache term, no underflow at large beta). Every chosen value on the
    edge of its grid is noted.
    """

    name = "tip"
    #: Whether the cache-only search uses the wide log grid (CODER-Adapter keeps its reference grid).
    wide_image_only_search: ClassVar[bool] = True

    def __init__(self, dataset: str | None = None, beta_scale: float | None = None, alpha_scale: float | None = None,
                 beta_steps: int = 200, alpha_steps: int = 20, chunk: int = 10,
                 image_only_betas: tuple[float, float, int] = (0.1, 1000.0, 81), refine_steps: int = 41):
        super().__init__(dataset)
        cfg = tip_search_config(dataset)
        self.beta_scale = beta_scale or cfg.beta_scale
        self.alpha_scale = alpha_scale or cfg.alpha_scale
        self.init_alpha, self.init_beta = cfg.init_alpha, cfg.init_beta
        self.beta_steps, self.alpha_steps, self.chunk = beta_steps, alpha_steps, chunk
        self.image_only_betas, self.refine_steps = image_only_betas, refine_steps

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        betas = 0.1 + torch.arange(self.beta_steps) * (self.beta_scale - 0.1) / self.beta_steps
        alphas = 0.1 + torch.arange(self.alpha_steps) * (self.alpha_scale - 0.1) / self.alpha_steps
        return betas, alphas

    def _cache_keys(self, data: FitData) -> torch.Tensor:
        """The cache keys: the few-shot features (CODER-Adapter: their CODER vectors)."""
        return data.train_x

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        """Query-key affinities in [-1, 1] (CODER-Adapter: min-max normalised)."""
        return self.cache.affinity(x)

    @property
    def _log_cache(self) -> bool:
        """Cache-only logits are reported as the log of the cache term (see the class docstring)."""
        return self.text is None and self.wide_image_only_search

    def adapted_note(self, has_text: bool) -> str | None:
        return ("cache on adapted features, zero-shot term on the original ones" if has_text
                else "cache on adapted features (image-only: no zero-shot term)")

    def _fit(self, data: FitData, keys: torch.Tensor | None = None) -> None:
        """``keys``: trained cache keys [N, D] used as they are (Tip-Adapter-F, CODER-Adapter), rows in
        ``data.train_y`` order; by default the keys are built from ``data.train_x``."""
        self.cache = CacheModel(self._cache_keys(data) if keys is None else keys, data.train_y, data.num_classes)
        self.register_buffer("text", data.text)
        self.alpha, self.beta = self.init_alpha, self.init_beta
        if self.text is None:
            self.notes.append("image-only: cache term")
        if self._given is not None:
            self.alpha, self.beta = float(self._given.get("alpha", 1.0)), float(self._given["beta"])
        elif not self._skip_search(data, "alpha/beta"):
            self.alpha, self.beta = self.search(data.val_x, data.val_y, data.val_text_x)
        self.hparams = {"beta": round(self.beta, 4)} if self.text is None else \
            {"alpha": round(self.alpha, 4), "beta": round(self.beta, 4)}

    def search(self, val_x: torch.Tensor, val_y: torch.Tensor,
               val_text_x: torch.Tensor | None = None) -> tuple[float, float]:
        """Vectorised grid search on val.

        Val queries go through in blocks (`row_chunks`: no [val x cache] matrix is kept whole); in each,
        betas go through the cache in chunks sharing one buffer, and each chunk scores all alphas at once
        (`mixing_correct`). Correct counts add up exactly over blocks. Returns (alpha, beta).
        """
        if self.text is None and self.wide_image_only_search:
            return 1.0, self._search_cache_only(val_x, val_y)
        betas, alphas = self.grid()
        zs = None if self.text is None else self._zero_shot(val_x, val_text_x)
        i, j = first_best(self._grid_correct(val_x, val_y, betas, alphas, zs))
        self._note_edge("beta", i, betas)
        if zs is not None:
            self._note_edge("alpha", j, alphas)
        return (1.0 if zs is None else float(alphas[j])), float(betas[i])

    def _grid_correct(self, val_x: torch.Tensor, val_y: torch.Tensor, betas: torch.Tensor,
                      alphas: torch.Tensor | None = None, zs: torch.Tensor | None = None,
                      stable: bool = False) -> torch.Tensor:
        """Correct val predictions [len(betas), len(alphas) or 1] of the cache (plus the zero-shot term
        ``zs``); ``stable``: weights relative to each query's best key (cache-only ranking, any beta)."""
        width = min(self.chunk, len(betas))
        total = None
        for rows in row_chunks(len(val_x), width * len(self.cache.keys)):
            affinity = self.affinity(val_x[rows])
            shift = affinity.amax(-1, keepdim=True) if stable else None
            buffer = torch.empty((width,) + affinity.shape, dtype=affinity.dtype, device=affinity.device)
            y, counts = val_y[rows], []
            for start in range(0, len(betas), self.chunk):
                cache = self.cache.from_affinity(affinity, betas[start:start + self.chunk], buffer, shift=shift)
                counts.append(correct(cache, y)[:, None] if zs is None else mixing_correct(zs[rows], cache, y, alphas))
            block = torch.cat(counts)
            total = block if total is None else total + block
        return total

    def _search_cache_only(self, val_x: torch.Tensor, val_y: torch.Tensor) -> float:
        """Cache-only beta: a log grid, then a linear refinement between the best point's neighbours."""
        lo, hi, steps = self.image_only_betas
        coarse = torch.logspace(math.log10(lo), math.log10(hi), int(steps), dtype=val_x.dtype, device=val_x.device)
        (i, _) = first_best(self._grid_correct(val_x, val_y, coarse, stable=True))
        self._note_edge("beta", i, coarse, " (log grid; at the upper edge the cache is a nearest-neighbour rule)"
                        if i == len(coarse) - 1 else " (log grid)")
        fine = torch.linspace(float(coarse[max(i - 1, 0)]), float(coarse[min(i + 1, len(coarse) - 1)]),
                              self.refine_steps, dtype=val_x.dtype, device=val_x.device)
        (j, _) = first_best(self._grid_correct(val_x, val_y, fine, stable=True))
        return float(fine[j])

    def _row_cost(self) -> int:
        return len(self.cache.keys) + 4 * self.num_classes  # no [M x cache] matrix kept whole

    def _logits(self, x: torch.Tensor, text_x: torch.Tensor | None) -> torch.Tensor:
        x = F.normalize(x.float(), dim=-1)
        affinity = self.affinity(x)
        if self._log_cache:
            return self.cache.log_from_affinity(affinity, self.beta)
        cache = self.cache.from_affinity(affinity, self.beta)
        if self.text is None:
            return cache
        return self._zero_shot(x, text_x) + self.alpha * cache


def ks_precision(x: torch.Tensor, y: torch.Tensor, means: torch.Tensor) -> torch.Tensor | None:
    """Kubokawa-Srivastava ridge-type precision of the pooled within-class covariance (GDA Eq. 4):
    ``D * ((N - 1) S + tr(S) I)^-1`` with S the unbiased covariance of the class-centred features.

    None when the within-class scatter is zero (one sample per class, e.g. 1-shot with view-averaged
    features): the estimator is undefined there.
    """
    centered = x - means[y]
    cov = torch.cov(centered.T.double())
    n, d = x.shape
    if not torch.isfinite(cov).all() or float(torch.trace(cov)) <= 1e-12:
        return None
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    return (d * spd_inverse((n - 1) * cov + torch.trace(cov) * eye)).float()


def spd_inverse(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of a symmetric positive definite matrix (a ridge-regularised covariance) through its
    Cholesky factor: fast, and it cannot fail to converge as an SVD can on rank-deficient scatter
    (4-shot 512-d features did); the eigen-decomposition pseudo-inverse if the factor does not exist."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return torch.cholesky_inverse(factor)
    return torch.linalg.pinv(matrix, hermitian=True)


class GaussianHead(Head):
    """Base of the heads with GDA's shared-covariance Gaussian (LDA) term: GDA and prototype mixing."""

    def _fit_gaussian(self, data: FitData) -> torch.Tensor:
        """Register ``weight`` [C, D] = means @ P and ``bias`` [C] of the LDA rule with the KS precision P
        (the identity when there is no within-class scatter: nearest class mean), and ``text``; returns
        the class means. With `fits_on_views` and view rows in the data, every view is a sample."""
        x, y = data.train_x, data.train_y
        if self.fits_on_views and data.train_views is not None:
            x, y = data.train_views.flatten(0, 1), data.train_y.repeat_interleave(data.train_views.shape[1])
            self.notes.append(f"fit on {data.train_views.shape[1]} views per image as samples ({len(x)} rows)")
        means = class_means(x, y, data.num_classes)
        precision = ks_precision(x, y, means)
        if precision is None:
            self.notes.append("one sample per class: no covariance, identity used (nearest class mean)")
        weight = means if precision is None else means @ precision
        self.register_buffer("weight", weight)
        self.register_buffer("bias", math.log(1.0 / data.num_classes) - 0.5 * (weight * means).sum(-1))
        self.register_buffer("text", data.text)
        return means


@register_head
class GDAHead(GaussianHead):
    """Gaussian Discriminant Analysis (GDA, Wang et al. ICLR 2024).

    Shared-covariance Gaussian classes give a linear classifier ``w_c = P mu_c``,
    ``b_c = log(1/C) - mu_c^T P mu_c / 2`` with P the KS precision (`ks_precision`). With text
    features the logits are ``100 x W.T + alpha (x w.T + b)``, alpha searched on val over
    {1e-4, ..., 100}; without, the GDA classifier alone (image-only).
    """

    name = "gda"
    fits_on_views = True  # the reference fits on all augment_epoch views of each image (N = 10 K C)
    ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)

    def __init__(self, dataset: str | None = None, alphas: tuple[float, ...] = ALPHAS):
        super().__init__(dataset)
        self.alphas = tuple(alphas)

    def _fit(self, data: FitData) -> None:
        self._fit_gaussian(data)
        self.alpha = 1.0
        if self.text is None:
            self.notes.append("image-only: no zero-shot ensemble")
            return
        if self._given is not None:
            self.alpha = float(self._given["alpha"])
        elif not self._skip_search(data, "alpha"):
            alphas = torch.tensor(self.alphas, device=data.val_x.device)
            zs, gda = self._zero_shot(data.val_x, data.val_text_x), data.val_x @ self.weight.T + self.bias
            (i,) = first_best(mixing_accuracy(zs, gda, data.val_y, alphas))
            self.alpha = float(alphas[i])
            self._note_edge("alpha", i, alphas)
        self.hparams = {"alpha": self.alpha}

    def _logits(self, x: torch.Tensor, text_x: torch.Tensor | None) -> torch.Tensor:
        x = F.normalize(x.float(), dim=-1)
        gda = x @ self.weight.T + self.bias
        if self.text is None:
            return gda
        return self._zero_shot(x, text_x) + self.alpha * gda


class BlockEnsembleHead(Head):
    """One ``base`` head per block of the features, log-probabilities averaged: the head of an ensemble
    of adapters whose adapted features are the members' embeddings side by side ([N, B x D]), and
    optionally the original embeddings as the last block (``with_original``), mixed in with weight w
    searched on val (``original_weights``): ``(1 - w) mean_b log p_b + w log p_original``.

    Not registered for ``evaluate.py --heads``: it is what an ensemble adapter (DAC with ``members`` > 1)
    infers with; the blocks' own hyper-parameters (if any) are searched per block.
    """

    name = "block_ensemble"

    def __init__(self, dataset: str | None = None, base: str = "gda", blocks: int = 1, with_original: bool = False,
                 original_weights: tuple[float, ...] = tuple(i / 10 for i in range(11))):
        super().__init__(dataset)
        self.base, self.blocks, self.with_original = base, blocks, with_original
        self.original_weights = tuple(original_weights) if with_original else (0.0,)
        self.heads = nn.ModuleList()

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The blocks of [M, B x D] features, each L2-normalised (one member's embedding space)."""
        return [F.normalize(b, dim=-1) for b in x.float().chunk(self.blocks, dim=-1)]

    def _fit(self, data: FitData) -> None:
        given = self._given or {}
        blocks = zip(self.split(data.train_x), self.split(data.val_x) if data.has_val else [None] * self.blocks)
        for i, (train_x, val_x) in enumerate(blocks):
            # a block's own values (``b{i}.alpha``), else the values given for every block (``alpha``)
            sub = {k: v for k, v in given.items() if "." not in k and k != "original_weight"}
            sub.update({k.split(".", 1)[1]: v for k, v in given.items() if k.startswith(f"b{i}.")})
            block = FitData(train_x, data.train_y, data.num_classes, text=data.text, val_x=val_x, val_y=data.val_y,
                            dataset=data.dataset, val_text_x=data.val_text_x if val_x is not None else None)
            head = build_head(self.base, dataset=self.dataset).fit(block, hparams=sub if self._given else None)
            self.heads.append(head)
            self.searched |= head.searched
            self.hparams.update({f"b{i}.{k}": v for k, v in head.hparams.items()})
        self.notes.extend(dict.fromkeys(n for h in self.heads for n in h.notes))
        self.weight = 0.0
        if self._given is not None:
            self.weight = float(given.get("original_weight", 0.0))
        elif self.with_original and not self._skip_search(data, "original_weight"):
            weights = torch.tensor(self.original_weights, device=data.val_x.device)
            members, original = self._log_probs(data.val_x, data.val_text_x)
            (i,) = first_best(mixing_accuracy(members, original - members, data.val_y, weights))
            self.weight = float(self.original_weights[i])  # the grid's own value, not its float32 copy
            self._note_edge("original_weight", i, weights)
        if self.with_original:
            self.hparams["original_weight"] = self.weight

    def _log_probs(self, x: torch.Tensor, text_x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        lp = [F.log_softmax(h(b, text_x=text_x), dim=-1) for h, b in zip(self.heads, self.split(x))]
        if not self.with_original:
            return torch.stack(lp).mean(0), None
        return torch.stack(lp[:-1]).mean(0), lp[-1]

    def _logits(self, x: torch.Tensor, text_x: torch.Tensor | None) -> torch.Tensor:
        members, original = self._log_probs(x, text_x)
        return members if original is None else (1 - self.weight) * members + self.weight * original

    def _row_cost(self) -> int:
        return 4 * self.blocks * self.num_classes


# -- IsoCLIP ----------------------------------------------------------------------------------------------
#: (k_top, k_bottom) for classification, per (backbone, pretrained), from IsoCLIP's scripts (§5.3).
ISOCLIP_DEFAULTS = {
    ("ViT-B-32", "openai"): (150, 50), ("ViT-B-16", "openai"): (200, 50), ("ViT-L-14", "openai"): (250, 200),
    ("ViT-B-16", "datacomp_xl_s13b_b90k"): (100, 100), ("ViT-B-32", "datacomp_xl_s13b_b90k"): (50, 50),
}


def isoclip_defaults(backbone: str | None, pretrained: str | None, rank: int) -> tuple[int, int]:
    """The authors' (k_top, k_bottom) for a known backbone; else ViT-B/32's share of the rank."""
    if (backbone, pretrained) in ISOCLIP_DEFAULTS:
        return ISOCLIP_DEFAULTS[(backbone, pretrained)]
    return round(rank * 150 / 512), round(rank * 50 / 512)


def isoclip_projector(image_projection: torch.Tensor, text_projection: torch.Tensor, k_top: int,
                      k_bottom: int) -> torch.Tensor:
    """IsoCLIP's filtered image projector [d_v, d].

    With open_clip's storage (``visual.proj`` [d_v, d], ``text_projection`` [d_t, d]),
    Psi = W_i^T W_t = image_projection @ text_projection^T [d_v, d_t]. Its thin SVD U S V^T keeps the
    directions k_top .. r - k_bottom; the filtered projector is U_S U_S^T image_projection, applied to
    pre-projection image features (then L2-normalised). k_top = k_bottom = 0 gives back CLIP's projector
    on its range.
    """
    psi = image_projection.double() @ text_projection.double().T
    u, _, _ = torch.linalg.svd(psi, full_matrices=False)
    r = min(u.shape[1], image_projection.shape[1])  # rank(Psi) <= d, the embedding dimension
    u = u[:, :r]
    if k_top < 0 or k_bottom < 0 or k_top + k_bottom >= r:
        raise ConfigError(f"isoclip: k_top ({k_top}) + k_bottom ({k_bottom}) must be below the rank {r}")
    u_s = u[:, k_top:r - k_bottom]
    return (u_s @ (u_s.T @ image_projection.double())).float()


@register_head
class IsoCLIPHead(Head):
    """IsoCLIP (Magistri et al., CVPR 2026): nearest class mean on pre-projection features mapped by the
    filtered projector (`isoclip_projector`): prototypes are class means of the unnormalised
    pre-projection features, each side mapped and L2-normalised, compared by cosine.
    ``k_top``/``k_bottom`` default to the authors' per-backbone values (§5.3)."""

    name = "isoclip"
    inputs = "preproj"
    inputs_hint = "pre-projection features: extract with store: {isoclip: {}}"
    original_only = True
    reads = ("isoclip.",)

    def __init__(self, dataset: str | None = None, k_top: int | None = None, k_bottom: int | None = None):
        super().__init__(dataset)
        self.k_top, self.k_bottom = k_top, k_bottom

    def _fit(self, data: FitData) -> None:
        ip, tp = data.extras.get("isoclip.image_projection"), data.extras.get("isoclip.text_projection")
        if ip is None or tp is None:
            raise HeadSkipped(f"isoclip needs pre-projection features and projectors ({self.inputs_hint})")
        rank = min(ip.shape[0], tp.shape[0], ip.shape[1])
        k_top, k_bottom = isoclip_defaults(data.metadata.get("backbone"), data.metadata.get("pretrained"), rank)
        self.k_top = k_top if self.k_top is None else self.k_top
        self.k_bottom = k_bottom if self.k_bottom is None else self.k_bottom
        self.register_buffer("projector", isoclip_projector(ip.float(), tp.float(), self.k_top, self.k_bottom))
        means = class_means(data.train_x, data.train_y, data.num_classes)
        self.register_buffer("prototypes", self.transform(means))
        self.hparams = {"k_top": self.k_top, "k_bottom": self.k_bottom}

    def transform(self, preprojection: torch.Tensor) -> torch.Tensor:
        """IsoCLIP image embeddings (for retrieval or any other head), [B, d]."""
        return F.normalize(preprojection.float() @ self.projector, dim=-1)

    def _logits(self, x: torch.Tensor, text_x: torch.Tensor | None) -> torch.Tensor:
        return CLIP_SCALE * self.transform(x) @ self.prototypes.T


@register_store
class IsoCLIPStore(ExtractionStore):
    """What IsoCLIP needs from the extraction: pre-projection image features per sample (views averaged:
    the projection is linear, so this equals pooling the embeddings) and both projector matrices."""

    name = "isoclip"
    uses_preprojection = True

    def file_tensors(self, backbone) -> dict[str, torch.Tensor]:
        return {"isoclip.image_projection": backbone.image_projection.detach().float(),
                "isoclip.text_projection": backbone.text_projection.detach().float()}

    def row_tensors(self, preprojection: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {"preproj": preprojection.mean(1).half()}


# -- prototype mixing (a reading of the TAMP abstract, §6.3) ----------------------------------------------
@register_head
class MixingHead(GaussianHead):
    """Cross-modal prototype alignment and mixing, as *our reading of the abstract* of Goswami et al.
    (arXiv 2603.24528; the method details were not available, methods-coder-gda-iso.md §6.3):

    * image prototypes m_c (normalised class means) are aligned to the text space by projecting onto
      the top-``r`` principal directions P of the class text embeddings: m~_c = norm(P P^T m_c);
    * mixed with the text prototypes: p_c = norm(lambda m~_c + (1 - lambda) t_c);
    * plus an image LDA term with the KS shrinkage covariance (GDA's): logits =
      ``100 cos(x, p_c) + gamma (x w_c + b_c)``.

    lambda, r and gamma are searched on val (``lambdas`` x ``ranks`` x ``gammas``); ``center_text`` centres
    the text embeddings before the principal directions are taken.
    """

    name = "mixing"
    needs_text = True

    def __init__(self, dataset: str | None = None, lambdas: tuple[float, ...] = tuple(i / 10 for i in range(11)),
                 ranks: tuple[float, ...] = (0.25, 0.5, 1.0), gammas: tuple[float, ...] = (0.0, 1e-3, 1e-2, 0.1, 1.0, 10.0),
                 center_text: bool = False):
        super().__init__(dataset)
        self.lambdas, self.ranks, self.gammas, self.center_text = tuple(lambdas), tuple(ranks), tuple(gammas), center_text

    def _fit(self, data: FitData) -> None:
        self._prototypes = F.normalize(self._fit_gaussian(data), dim=-1)
        text = data.text - data.text.mean(0) if self.center_text else data.text
        self._directions = torch.linalg.svd(text.double(), full_matrices=False)[2].float()  # [min(C, D), D]
        given = self._given or {}
        self.lam, self.rank, self.gamma = given.get("lambda", 0.5), given.get("rank", self._directions.shape[0]), \
            given.get("gamma", 1.0)
        if not self._given and not self._skip_search(data, "lambda/rank/gamma"):
            self._search(data)
        self.register_buffer("mixed", self.mix(self.lam, self.rank))
        self.hparams = {"lambda": round(self.lam, 3), "rank": self.rank, "gamma": self.gamma}

    def mix(self, lam: float | torch.Tensor, rank: int) -> torch.Tensor:
        """Mixed prototypes [..., C, D] for one rank and one or more lambdas."""
        p = self._directions[:rank]
        aligned = F.normalize(self._prototypes @ p.T @ p, dim=-1)
        lam = torch.as_tensor(lam, dtype=aligned.dtype, device=aligned.device).reshape(-1, 1, 1)
        return F.normalize(lam * aligned + (1 - lam) * self.text, dim=-1).squeeze(0)

    def _search(self, data: FitData) -> None:
        device = data.val_x.device
        lambdas, gammas = torch.tensor(self.lambdas, device=device), torch.tensor(self.gammas, device=device)
        ranks = sorted({max(1, round(f * self._directions.shape[0])) for f in self.ranks})
        best = (-1.0, None)
        for rank in ranks:  # a handful of ranks; lambdas and gammas are scored in one batch each
            mixed = self.mix(lambdas, rank).reshape(len(lambdas), data.num_classes, -1)
            acc = 0
            # blocks of val queries; the alpha scoring keeps ~4 [lambdas x rows x classes] temporaries alive
            for rows in row_chunks(len(data.val_x), 4 * len(lambdas) * data.num_classes):
                x = data.val_x[rows]
                base = CLIP_SCALE * torch.einsum("md,lcd->lmc", x, mixed)
                acc = acc + mixing_correct(base, x @ self.weight.T + self.bias, data.val_y[rows], gammas)
            i, j = first_best(acc)  # [lambdas, gammas]
            if float(acc[i, j]) > best[0]:
                best = (float(acc[i, j]), (float(lambdas[i]), rank, float(gammas[j])), (i, j))
        self.lam, self.rank, self.gamma = best[1]
        self._note_edge("lambda", best[2][0], lambdas, " (the bounds of the mixing weight)")
        self._note_edge("rank", ranks.index(self.rank), ranks)
        self._note_edge("gamma", best[2][1], gammas)

    def _logits(self, x: torch.Tensor, text_x: torch.Tensor | None) -> torch.Tensor:
        x = F.normalize(x.float(), dim=-1)
        return CLIP_SCALE * x @ self.mixed.T + self.gamma * (x @ self.weight.T + self.bias)
