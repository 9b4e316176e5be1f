"""Trained methods that infer with a cache head: one life cycle for DAC, CODER-Adapter and Tip-Adapter-F.

`CachedHeadAdapter` does, once for every such method:

1. **embed the few-shot set** at setup (`AdapterData.head_data`, cached features as they are, images
   through the backbone with views pooled) and keep it, sorted by label, for the cache; keep val;
2. during training, score validation with the head at its **default** hyper-parameters;
3. after training (`finalize`: end of fit, export, load), fit the head and **search** its
   hyper-parameters on val, once, and keep them (``head_hparams``, exported; `selection` says the
   split they were chosen on);
4. infer with that head.

A subclass says what the head is: `new_head`, the features it is fit on (`head_train_x`), the keys
it uses when they are trained parameters (`head_keys`), what a query looks like to it
(`head_query`, `text_query`) and its defaults. `TrainableCacheAdapter` adds cache keys trained with
cross-entropy on the full logits, alpha and beta fixed during training (Tip-Adapter-F's recipe).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adapters.base import AdapterModule, derived, eval_mode
from adapters.heads import CLIP_SCALE, CacheModel, FitData, Head


class CachedHeadAdapter(AdapterModule):
    """Base of trained methods whose inference head is fit after training (see the module docstring).

    Args:
        search_each_epoch: validate every epoch with the head's hyper-parameters searched on val, i.e.
            the head the run would end with if it ended there (what `callbacks.best_on_val` should
            compare when it chooses the epoch); otherwise with the head at its defaults (cheaper).
        **kwargs: `AdapterModule` arguments.
    """

    def __init__(self, search_each_epoch: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.register_buffer("train_labels", torch.zeros(0, dtype=torch.long))
        self.head_hparams: dict | None = None
        self._val: tuple[torch.Tensor, torch.Tensor] | None = None
        self._val_name = "val"
        derived(self, "head", None)

    # -- what a subclass says -------------------------------------------------------------------------
    def new_head(self) -> Head:
        """A fresh, unfitted inference head."""
        raise NotImplementedError

    def store_train(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Keep what the cache is built from (features sorted by label; ``train_labels`` is set)."""
        raise NotImplementedError

    @property
    def has_train_set(self) -> bool:
        return self.train_labels.numel() > 0

    def head_train_x(self) -> torch.Tensor:
        """The features the head is fit on, [N, D] (in ``train_labels`` order)."""
        return torch.zeros(len(self.train_labels), self.embed_dim)

    def head_keys(self) -> torch.Tensor | None:
        """Trained cache keys to use as they are (None: the head builds its keys from `head_train_x`)."""
        return None

    def head_text(self) -> torch.Tensor | None:
        """The zero-shot classifier the head mixes in (None: image-only)."""
        return self.text_features if self.has_text else None

    def head_query(self, x: torch.Tensor) -> torch.Tensor:
        """What the head's cache sees of normalised query embeddings."""
        return x

    def text_query(self, x: torch.Tensor) -> torch.Tensor:
        """What the head's zero-shot term sees of normalised query embeddings."""
        return x

    def head_extras(self) -> dict:
        """Extra inputs of the head (`adapters.heads.FitData.extras`)."""
        return {}

    def default_head_hparams(self, head: Head) -> dict:
        """The head's hyper-parameters during training (no search)."""
        return {"alpha": head.init_alpha, "beta": head.init_beta} if hasattr(head, "init_alpha") else {"alpha": 1.0}

    # -- the shared life cycle ------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.has_train_set:  # restored from a checkpoint or an export
            return
        train, val = (None if s is None else self.embed_split(s) for s in self.data.head_data())
        order = torch.argsort(train.labels, stable=True)  # the cache's own order: trained keys line up with it
        self.train_labels = train.labels[order].to(self.device)
        self.store_train(train.features[order].to(self.device), self.train_labels)
        if val is not None:
            self._val = (val.features.to(self.device), val.labels.to(self.device))
            self._val_name = val.name
            self.selection["protocol"] = self.data.protocol

    def _fit_head(self, search: bool) -> Head:
        with torch.no_grad(), eval_mode(self):  # the cache must not depend on dropout
            val_x = val_y = None
            if search and self._val is not None:
                val_x, val_y = self._val
            text = self.head_text()
            data = FitData(self.head_train_x().cpu(), self.train_labels.cpu(), self.hparams.num_classes,
                           text=None if text is None else text.detach().cpu(),
                           val_x=None if val_x is None else self.head_query(val_x).cpu(),
                           val_y=None if val_y is None else val_y.cpu(), dataset=self.hparams.dataset,
                           val_text_x=None if val_x is None else self.text_query(val_x).cpu(),
                           extras=self.head_extras())
            head = self.new_head()
            hparams = None if search else (self.head_hparams or self.default_head_hparams(head))
            keys = self.head_keys()
            return head.fit(data, hparams=hparams, **({} if keys is None else {"keys": keys.detach().cpu()}))

    def on_validation_epoch_start(self) -> None:
        if self.head_hparams is None:  # during training: the head at its defaults (or searched), current weights
            derived(self, "head", self._fit_head(search=self.hparams.search_each_epoch and self._val is not None))

    def finalize(self) -> None:
        """Choose the head's hyper-parameters on val (once), after training."""
        if not self.has_train_set:
            return
        if self.head_hparams is None:
            head = derived(self, "head", self._fit_head(search=self._val is not None))
            self.head_hparams = dict(head.hparams)
            if head.searched:
                self.selection["head"] = self._val_name
        elif self.head is None:
            derived(self, "head", self._fit_head(search=False))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            derived(self, "head", self._fit_head(search=False))
        features = F.normalize(features.float(), dim=-1)
        with eval_mode(self):
            query, text_x = self.head_query(features), self.text_query(features)
        return self.head(query.detach().cpu(), text_x=text_x.detach().cpu()).to(features.device)

    def export_config(self) -> dict:
        return {"head_hparams": self.head_hparams}

    def load_export_config(self, config: dict) -> None:
        self.head_hparams = config.get("head_hparams")
        derived(self, "head", None)


class TrainableCacheAdapter(CachedHeadAdapter):
    """Cache keys as parameters, trained with cross-entropy on ``100 x W^T + alpha * cache(x)`` (the cache
    term alone without text), alpha and beta fixed at ``init_alpha``/``init_beta`` during training and
    searched on val afterwards (Tip-Adapter-F, methods-dac-imo.md §1.4).

    Args:
        init_alpha / init_beta: alpha and beta during training (None: the head's per-dataset defaults).
        **kwargs: `AdapterModule` arguments.
    """

    def __init__(self, init_alpha: float | None = None, init_beta: float | None = None, **kwargs):
        super().__init__(**kwargs)
        self.keys = nn.Parameter(torch.zeros(0, 0))

    # -- what a subclass says -------------------------------------------------------------------------
    def key_map(self, x: torch.Tensor) -> torch.Tensor:
        """Cache keys (and queries) from normalised embeddings: the identity for Tip-Adapter-F."""
        return x

    def affinity(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Query-key affinities (CODER-Adapter: per-query min-max normalised)."""
        return queries @ keys.T

    # -- training -------------------------------------------------------------------------------------
    @property
    def has_train_set(self) -> bool:
        return self.keys.numel() > 0

    def store_train(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.keys = nn.Parameter(self.key_map(F.normalize(features.float(), dim=-1)))
        derived(self, "_cache", None)

    def head_keys(self) -> torch.Tensor:
        return self.keys

    def training_alpha_beta(self) -> tuple[float, float]:
        head = self.new_head()
        alpha = self.hparams.init_alpha if self.hparams.init_alpha is not None else head.init_alpha
        beta = self.hparams.init_beta if self.hparams.init_beta is not None else head.init_beta
        return float(alpha), float(beta)

    def default_head_hparams(self, head: Head) -> dict:
        alpha, beta = self.training_alpha_beta()
        return {"alpha": alpha, "beta": beta}

    def train_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The full logits with the trainable keys at the training alpha and beta (differentiable)."""
        if self.__dict__.get("_cache") is None:  # labels and per-class layout of the (label-sorted) keys
            derived(self, "_cache", CacheModel(self.keys.detach(), self.train_labels, self.hparams.num_classes))
        alpha, beta = self.training_alpha_beta()
        x = F.normalize(features.float(), dim=-1)
        cache = self.__dict__["_cache"].from_affinity(self.affinity(self.key_map(x), self.keys), beta)
        if not self.has_text:
            return alpha * cache
        return CLIP_SCALE * x @ self.text_features.T + alpha * cache

    def training_loss(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if features.ndim == 3:  # several views of an image: each view is a training sample
            labels = labels.repeat_interleave(features.shape[1])
            features = features.flatten(0, 1)
        return F.cross_entropy(self.train_logits(features), labels), {}

