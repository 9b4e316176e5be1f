"""FeatureExtractor: the frozen backbone as a LightningModule for ``train.py predict``.

Pair it with `ImageShardDataModule` and the `callbacks.feature_writer.FeatureWriter` callback
(``configs/extract.yaml``). Besides the image embeddings of every predicted split it writes what the
heads need from the same backbone: the zero-shot classifier of the class names, CODER's text set
(class names, plus the synonym/attribute/analogous/description/one-to-one files given in
``text_set``), and with ``preprojection: true`` the pre-projection features and both projectors
(IsoCLIP). With ``adapter: DIR`` (an exported image-encoder adapter such as IMO) it writes the
original embeddings and the adapted ones (``{split}.adapted``): ``evaluate.py`` then reports TA and TA++.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from adapters.base import AdapterModule
from adapters.errors import ConfigError
from adapters.textsets import EmbeddedTextSet, build_text_set


class FeatureExtractor(AdapterModule):
    """Extract CLIP features (see the module docstring).

    Args:
        text_set: options of `adapters.textsets.build_text_set` (``synonyms``, ``attributes``,
            ``analogous``, ``descriptions``, ``one_to_one``: JSON file paths; ``task``); the class names
            alone when None.
        preprojection: also store pre-projection image features and the projector matrices.
        **kwargs: `AdapterModule` arguments (backbone, pretrained, class names ...).
    """

    method = "extract"

    def __init__(self, text_set: dict | None = None, preprojection: bool = False, adapter: str | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        self._text_set: EmbeddedTextSet | None = None
        self.__dict__["_encoder"] = None  # an exported encoder adapter (IMO), sharing this backbone

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.hparams.adapter and self.__dict__["_encoder"] is None:
            from adapters.base import load_adapter

            encoder = load_adapter(self.hparams.adapter, backbone=self.backbone, map_location=str(self.device))
            if not hasattr(encoder, "encode"):
                raise ConfigError(f"adapter: {self.hparams.adapter} is not an image-encoder adapter (e.g. IMO)")
            self.__dict__["_encoder"] = encoder.to(self.device)
        if self.hparams.class_names and self._text_set is None:
            embed = self.backbone.encode_text
            texts = build_text_set(self.hparams.class_names, self.hparams.dataset, embed=embed,
                                   **(self.hparams.text_set or {}))
            self._text_set = EmbeddedTextSet.from_text_set(texts, embed)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return 100.0 * features @ self.text_features.T

    def feature_file_extras(self) -> dict[str, torch.Tensor]:
        """Tensors the feature writer stores beside the features."""
        extras = dict(self._text_set.tensors()) if self._text_set is not None else {}
        if self.hparams.preprojection and self.__dict__["_encoder"] is None:
            extras["isoclip.image_projection"] = self.backbone.image_projection.detach().float()
            extras["isoclip.text_projection"] = self.backbone.text_projection.detach().float()
        return extras

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        encoder = self.__dict__["_encoder"]
        if encoder is not None:  # original and adapted embeddings (TA vs TA++)
            return encoder.predict_step(batch, batch_idx, dataloader_idx)
        if not self.hparams.preprojection:
            return super().predict_step(batch, batch_idx, dataloader_idx)
        images = batch["image"]
        views = images.shape[1] if images.ndim == 5 else 1
        pre = self.backbone.encode_image_preprojection(images.flatten(0, 1) if views > 1 else images).float()
        pre = pre.view(len(batch["label"]), views, -1).mean(1)  # the projection is linear: average first
        features = F.normalize(pre @ self.backbone.image_projection.float(), dim=-1)
        return {"features": features, "preproj": pre, "label": batch["label"], "key": batch.get("key"),
                "dataloader_idx": dataloader_idx}
