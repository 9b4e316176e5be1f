import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from adapters.backbone import TINY_MODEL, FrozenCLIP
from adapters.errors import ConfigError
from adapters.protocol import IMAGENET_TEMPLATES


def test_frozen_even_inside_a_training_parent(tiny_clip):
    parent = nn.Module()
    parent.backbone = tiny_clip
    parent.head = nn.Linear(2, 2)
    parent.train()
    assert parent.head.training
    assert not tiny_clip.training and not any(m.training for m in tiny_clip.modules())
    assert not any(p.requires_grad for p in tiny_clip.parameters())


def test_embeddings_are_normalised_with_expected_shapes(tiny_clip):
    images = torch.randn(3, 3, *tiny_clip.image_size)
    emb = tiny_clip.encode_image(images)
    assert emb.shape == (3, tiny_clip.embed_dim) == (3, 32)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    text = tiny_clip.encode_text(["a photo of a cat.", "a photo of a dog."])
    assert text.shape == (2, 32)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))


def test_preprojection_features_times_projector_give_open_clip_embedding(tiny_clip):
    images = torch.randn(4, 3, *tiny_clip.image_size)
    pre = tiny_clip.encode_image_preprojection(images)
    assert pre.shape == (4, 64)  # vision width of the tiny config
    assert tiny_clip.image_projection.shape == (64, 32)
    assert tiny_clip.text_projection.shape == (64, 32)
    torch.testing.assert_close(pre @ tiny_clip.image_projection, tiny_clip.encode_image(images, normalize=False))


def test_transforms_produce_model_sized_tensors(tiny_clip):
    image = Image.new("RGB", (50, 40), color=(120, 30, 200))
    for transform in (tiny_clip.train_transform, tiny_clip.eval_transform):
        assert transform(image).shape == (3, *tiny_clip.image_size)


def test_zero_shot_classifier_is_mean_of_normalised_prompts(tiny_clip):
    names = ["golden_retriever", "tabby cat", "red fox"]
    classifier = tiny_clip.zero_shot_classifier(names, IMAGENET_TEMPLATES, batch_size=5)
    assert classifier.shape == (3, 32)
    expected = []
    for name in names:
        prompts = [t.format(name.replace("_", " ")) for t in IMAGENET_TEMPLATES]
        expected.append(F.normalize(F.normalize(tiny_clip.encode_text(prompts), dim=-1).mean(0), dim=0))
    torch.testing.assert_close(classifier, torch.stack(expected), atol=1e-5, rtol=1e-5)


def test_local_checkpoint_file_loads_those_weights(tmp_path, tiny_clip):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_clip.model.state_dict(), path)
    loaded = FrozenCLIP(TINY_MODEL, pretrained=str(path))
    assert loaded.pretrained == str(path)
    for (k, a), (_, b) in zip(tiny_clip.model.state_dict().items(), loaded.model.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)


def test_random_weights_warn():
    with pytest.warns(UserWarning, match="randomly initialised"):
        FrozenCLIP(TINY_MODEL, pretrained=None)


@pytest.mark.parametrize("kwargs, match", [
    ({"model_name": "not-a-model"}, "backbone: unknown open_clip architecture"),
    ({"model_name": TINY_MODEL, "pretrained": "/no/such/file.pt"}, "pretrained: checkpoint file not found"),
    ({"model_name": "ViT-B-32", "pretrained": "not_a_tag"}, "pretrained: unknown tag"),
])
def test_bad_model_or_pretrained_is_a_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        FrozenCLIP(**kwargs)
