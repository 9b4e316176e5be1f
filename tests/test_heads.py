import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adapters.errors import ConfigError
from adapters.heads import (
    CLIP_SCALE,
    FitData,
    GDAHead,
    HeadSkipped,
    TipAdapterHead,
    build_head,
    ks_precision,
    mixing_accuracy,
)


def _toy(n_per_class=10, c=5, d=16, seed=0, text=True):
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(c, d, generator=g), dim=-1)
    def sample(n):
        y = torch.arange(c).repeat_interleave(n)
        return F.normalize(centers[y] + 0.6 * torch.randn(len(y), d, generator=g) / d ** 0.5, dim=-1), y
    x, y = sample(n_per_class)
    vx, vy = sample(20)
    w = F.normalize(centers + 0.8 * torch.randn(c, d, generator=g) / d ** 0.5, dim=-1) if text else None
    return FitData(x, y, c, text=w, val_x=vx, val_y=vy)


def test_unknown_head_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown head 'nope'"):
        build_head("nope")


def test_zero_shot_is_scaled_cosine_and_needs_text():
    data = _toy()
    head = build_head("zeroshot").fit(data)
    x = data.val_x
    torch.testing.assert_close(head(x), CLIP_SCALE * x @ data.text.T)
    with pytest.raises(HeadSkipped, match="needs text features"):
        build_head("zeroshot").fit(_toy(text=False))


def test_prototype_hand_checkable():
    x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
    y = torch.tensor([0, 0, 1, 1])
    head = build_head("prototype").fit(FitData(x, y, 2))
    assert head(torch.tensor([[1.0, 0.1], [-0.1, 1.0]])).argmax(-1).tolist() == [0, 1]
    torch.testing.assert_close(head.prototypes[0], F.normalize(torch.tensor([1.8, 0.6]), dim=0))


def test_tip_with_alpha_zero_or_flat_cache_reduces_to_zero_shot():
    data = _toy()
    zs = build_head("zeroshot").fit(data)(data.val_x)
    tip = build_head("tip").fit(data)
    tip.alpha = 0.0
    torch.testing.assert_close(tip(data.val_x), zs)
    tip.alpha, tip.beta = 5.0, 0.0  # beta -> 0: every key weighs 1, the cache adds a class-constant
    assert torch.equal(tip(data.val_x).argmax(-1), zs.argmax(-1))


def _looped_tip_search(head: TipAdapterHead, data: FitData):
    """The reference implementation's double loop (Tip-Adapter main.py search_hp)."""
    betas, alphas = head.grid()
    best, best_ab = -1.0, None
    for beta in betas.tolist():
        for alpha in alphas.tolist():
            aff = data.val_x @ data.train_x.T
            cache = torch.exp(-beta * (1 - aff)) @ F.one_hot(data.train_y, data.num_classes).float()
            logits = CLIP_SCALE * data.val_x @ data.text.T + alpha * cache
            acc = (logits.argmax(-1) == data.val_y).float().mean().item()
            if acc > best:
                best, best_ab = acc, (alpha, beta)
    return best_ab


def test_vectorised_tip_search_matches_the_reference_double_loop():
    data = _toy(seed=3)
    head = TipAdapterHead(beta_steps=30, alpha_steps=10, beta_scale=8, alpha_scale=6, chunk=7)
    head.fit(data)
    alpha, beta = _looped_tip_search(head, data)
    assert (head.alpha, head.beta) == pytest.approx((alpha, beta))


def test_mixing_accuracy_equals_brute_force():
    g = torch.Generator().manual_seed(1)
    base, extra = torch.randn(50, 7, generator=g), torch.randn(3, 50, 7, generator=g)
    labels = torch.randint(0, 7, (50,), generator=g)
    alphas = torch.linspace(0, 5, 40)
    brute = ((base + alphas[:, None, None, None] * extra).argmax(-1) == labels).float().mean(-1).T
    torch.testing.assert_close(mixing_accuracy(base, extra, labels, alphas), brute)


def test_gda_equals_closed_form_lda_with_the_ks_precision():
    rng = np.random.default_rng(0)
    cov = np.array([[1.0, 0.6], [0.6, 0.8]])
    mu = np.array([[0.0, 0.0], [1.5, -0.5]])
    x = np.concatenate([rng.multivariate_normal(m, cov, 3000) for m in mu])
    y = np.repeat([0, 1], 3000)
    # Closed form, written independently with numpy: shared covariance, KS ridge precision.
    means = np.stack([x[y == c].mean(0) for c in (0, 1)])
    centred = x - means[y]
    s = np.cov(centred.T)
    n, d = x.shape
    p = d * np.linalg.inv((n - 1) * s + np.trace(s) * np.eye(d))
    w = means @ p
    b = np.log(0.5) - 0.5 * np.einsum("cd,cd->c", w, means)
    data = FitData(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), 2)
    data.train_x, data.train_y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)  # raw, not normalised
    head = GDAHead()
    head._fit(data)
    test = rng.normal(size=(200, 2)) * 2
    expected = test @ w.T + b
    got = torch.tensor(test, dtype=torch.float32) @ head.weight.T + head.bias
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32), atol=1e-4, rtol=1e-4)
    # and its decisions follow the Bayes rule of the true Gaussians (the shrinkage is negligible at this N)
    inv = np.linalg.inv(cov)
    bayes = test @ (inv @ (mu[1] - mu[0])) - 0.5 * (mu[1] @ inv @ mu[1] - mu[0] @ inv @ mu[0])
    agree = ((got[:, 1] > got[:, 0]).numpy() == (bayes > 0)).mean()
    assert agree > 0.97


def test_ks_precision_is_symmetric_positive_definite():
    x = torch.randn(30, 3)
    y = torch.arange(30) % 3
    means = torch.stack([x[y == c].mean(0) for c in range(3)])
    p = ks_precision(x, y, means)
    torch.testing.assert_close(p, p.T)
    assert torch.linalg.eigvalsh(p).min() > 0


def test_gda_alpha_is_chosen_on_val_and_image_only_without_text():
    head = build_head("gda").fit(_toy())
    assert head.hparams["alpha"] in GDAHead.ALPHAS
    image_only = build_head("gda").fit(_toy(text=False))
    assert "image-only" in image_only.notes[0] and "alpha" not in image_only.hparams


def test_searches_do_not_touch_test_data_and_default_without_val():
    data = _toy()
    data.val_x = data.val_y = None
    head = build_head("tip", dataset="caltech101").fit(data)
    assert (head.alpha, head.beta) == (3, 1.0)
    assert any("no val split" in n for n in head.notes)
    assert not math.isnan(head(data.train_x).sum().item())


def test_gda_with_one_sample_per_class_falls_back_to_nearest_class_mean():
    data = _toy(n_per_class=1, text=False)
    gda = build_head("gda").fit(data)
    assert any("one sample per class" in n for n in gda.notes)
    prototype = build_head("prototype").fit(data)
    assert torch.equal(gda(data.val_x).argmax(-1), prototype(data.val_x).argmax(-1))  # unit-norm means


def test_spd_inverse_is_the_inverse_and_falls_back_to_the_pseudo_inverse():
    """GDA's precision: Cholesky for the ridge covariance (an SVD failed to converge on 4-shot scatter),
    the hermitian pseudo-inverse when the matrix is not positive definite."""
    from adapters.heads import spd_inverse

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 64, generator=g, dtype=torch.float64)  # fewer samples than dimensions
    cov = torch.cov(x.T)
    ridge = 39 * cov + torch.trace(cov) * torch.eye(64, dtype=torch.float64)
    torch.testing.assert_close(spd_inverse(ridge) @ ridge, torch.eye(64, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(spd_inverse(cov), torch.linalg.pinv(cov, hermitian=True))  # singular: not PD
