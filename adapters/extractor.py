"""FeatureExtractor: the frozen backbone as a LightningModule for ``train.py predict``.

Pair it with `ImageShardDataModule` and the `callbacks.feature_writer.FeatureWriter` callback
(``configs/extract.yaml``). It writes the image embeddings of every predicted split (training images
with their ``views`` augmented views pooled, the Tip-Adapter cache recipe) and the zero-shot
classifier of the class names, plus what the enabled extraction stores add (`adapters.stores`:
each method declares what it needs stored; ``store: {name: {options}}`` enables them).

With ``view_rows: true``, every augmented view of a training image is also kept as its own
L2-normalised row: ``{split}.views`` [N, V, D] (image key = the sample's key, view index = the second
axis) and ``{split}.view_norms`` [N, V] (the raw embeddings' norms, so that `pool_views` recomputes
the pooled row exactly). ``{split}.features`` stays the pooled row, so every reader of the old layout
reads these files unchanged; heads that fit on views (GDA) take the rows.

With ``adapter: DIR`` (an exported adapter that changes the image encoder) it writes the original
embeddings and the adapted ones (``{split}.adapted``): ``evaluate.py`` then runs every head on both.
Stores that need per-sample tensors of the plain encoder are not computed then.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from adapters.backbone import pool_views
from adapters.base import BackboneModule, derived
from adapters.errors import ConfigError
from adapters.stores import ExtractionStore, build_stores


class FeatureExtractor(BackboneModule):
    """Extract CLIP features (see the module docstring).

    Args:
        store: extraction stores to enable, ``{name: {option: value}}`` (`adapters.stores.STORES`);
            None: the stores on by default.
        view_rows: also keep each augmented view of a training image as its own row (see above).
        adapter: an exported image-encoder adapter whose adapted embeddings are written beside the
            original ones.
        **kwargs: `BackboneModule` arguments (backbone, pretrained, class names ...).
    """

    def __init__(self, store: dict[str, dict] | None = None, adapter: str | None = None, view_rows: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        from adapters.loading import register_builtin_methods

        register_builtin_methods()  # the methods' stores register on import
        derived(self, "stores", build_stores(store))
        derived(self, "encoder", None)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.hparams.adapter and self.encoder is None:
            from adapters.loading import load_adapter

            encoder = load_adapter(self.hparams.adapter, backbone=self.backbone, map_location=str(self.device))
            if not encoder.adapts_encoder:
                raise ConfigError(f"adapter: {self.hparams.adapter} ({encoder.method}) does not change the image "
                                  "encoder; export an encoder adapter (e.g. IMO)")
            derived(self, "encoder", encoder.to(self.device))
        for store in self.stores:
            store.setup(self.backbone, self.hparams.class_names, self.hparams.dataset)

    @property
    def _row_stores(self) -> list[ExtractionStore]:
        return [] if self.encoder is not None else [s for s in self.stores if s.uses_preprojection]

    def feature_file_extras(self) -> dict[str, torch.Tensor]:
        extras = {}
        for store in self.stores:
            if store.uses_preprojection and self.encoder is not None:
                continue
            extras.update(store.file_tensors(self.backbone))
        return extras

    def feature_file_metadata(self) -> dict[str, str]:
        meta = super().feature_file_metadata()
        meta["stores"] = ",".join(s.name for s in self.stores)
        if self.encoder is not None:
            meta["adapter"] = self.encoder.method
        return meta

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        if self.encoder is not None:  # original and adapted embeddings
            return self.encoder.predict_step(batch, batch_idx, dataloader_idx)
        rows = self._row_stores
        images = batch["image"]
        views = images.shape[1] if images.ndim == 5 else 1
        flat = images.flatten(0, 1) if views > 1 else images
        pre = None
        if rows:  # one pass through the encoder: the projection of the pre-projection features is the embedding
            pre = self.backbone.encode_image_preprojection(flat).float().view(len(batch["label"]), views, -1)
            raw = pre @ self.backbone.image_projection.float()
        else:
            raw = self.encode(flat, normalize=False).view(len(batch["label"]), views, -1)
        out = {"features": pool_views(raw), "label": batch["label"], "key": batch.get("key"),
               "dataloader_idx": dataloader_idx}
        if self.hparams.view_rows and views > 1:
            out["views"], out["view_norms"] = F.normalize(raw, dim=-1).half(), raw.norm(dim=-1)
        for store in rows:
            out.update(store.row_tensors(pre))
        return out
