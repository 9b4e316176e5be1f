import torch

from adapters.protocol import IMAGENET_TEMPLATES, canonical_dataset, few_shot_indices, templates_for, tip_search_config


def test_templates_per_dataset():
    assert templates_for("oxford_flowers") == ("a photo of a {}, a type of flower.",)
    assert templates_for("FGVC-Aircraft".replace("-", "_")) == ("a photo of a {}, a type of aircraft.",)
    assert templates_for("imagenet") == IMAGENET_TEMPLATES and len(IMAGENET_TEMPLATES) == 7
    assert templates_for("my_own_dataset") == ("a photo of a {}.",)
    assert canonical_dataset("Caltech-101") == "caltech101"


def test_tip_search_ranges_follow_the_official_configs():
    cfg = tip_search_config("caltech101")
    assert (cfg.beta_scale, cfg.alpha_scale, cfg.init_alpha) == (12, 5, 3)
    assert tip_search_config("oxford_flowers").beta_scale == 50


def test_few_shot_indices_are_k_per_class_and_seeded():
    labels = torch.arange(100) % 5  # 20 per class
    a = few_shot_indices(labels, 4, seed=1)
    assert torch.bincount(labels[a]).tolist() == [4] * 5
    assert torch.equal(a, few_shot_indices(labels, 4, seed=1))
    assert not torch.equal(a, few_shot_indices(labels, 4, seed=2))
    small = torch.tensor([0, 0, 1, 1, 1, 1])
    assert torch.bincount(small[few_shot_indices(small, 3, seed=1)]).tolist() == [2, 3]
