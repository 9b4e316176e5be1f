"""Reference parity: every head and trained method against a plain transcription of its authors'
equations, written here with loops (../shared/reference/methods-*.md), to 1e-5 relative; and every
vectorised search against a brute-force loop over the same grid (strict ``>``: the first best wins).

Image-only heads run on the real ViT-B/32 feature files of ../shared/data; heads that need text (or a
text set, or projectors) run on fixed small tensors. The README's methods table names these tests.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adapters.coder import CoderAdapterHead, CoderClassifier, CoderHead, adapter_texts, minmax_affinity
from adapters.heads import FitData, GDAHead, IsoCLIPHead, MixingHead, PrototypeHead, TipAdapterHead, build_head
from adapters.imo import TipIMOGridHead, TipXHead
from adapters.textsets import EmbeddedTextSet
from datamodules.feature_file import FeatureFile
from tests.conftest import shared


def close(ours: torch.Tensor, plain, rtol: float = 1e-5) -> None:
    """``ours`` equals the transcription to ``rtol`` relative (of the largest magnitude)."""
    plain = torch.as_tensor(np.asarray(plain), dtype=torch.float64)
    ours = ours.double()
    scale = float(plain.abs().max()) or 1.0
    torch.testing.assert_close(ours, plain, rtol=rtol, atol=rtol * scale)


def accuracy(logits, labels) -> float:
    return float((torch.as_tensor(logits).argmax(-1) == torch.as_tensor(labels)).double().mean())


def one_hot(labels, c) -> np.ndarray:
    out = np.zeros((len(labels), c))
    out[np.arange(len(labels)), np.asarray(labels)] = 1.0
    return out


@pytest.fixture(scope="module")
def caltech():
    ff = FeatureFile(shared("clip-vit-b32-features/caltech101.safetensors"))
    norm = lambda s: F.normalize(ff.features(s).float(), dim=-1)  # noqa: E731
    return {"train": (norm("train_16shot"), ff.labels("train_16shot")), "val": (norm("val"), ff.labels("val")),
            "test": (norm("test"), ff.labels("test")), "classes": ff.num_classes}


def _toy(c=5, d=12, shots=4, n_val=6, seed=0, views=None):
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(c, d, generator=g), dim=-1)

    def sample(n):
        y = torch.arange(c).repeat_interleave(n)
        return F.normalize(centers[y] + 0.7 * torch.randn(len(y), d, generator=g) / d ** 0.5, dim=-1), y
    x, y = sample(shots)
    vx, vy = sample(n_val)
    text = F.normalize(centers + 0.6 * torch.randn(c, d, generator=g) / d ** 0.5, dim=-1)
    return x, y, vx, vy, text


# -- zero-shot, prototype -------------------------------------------------------------------------------
def test_zeroshot_is_scaled_cosine_to_the_class_text_embeddings():
    x, y, vx, vy, text = _toy()
    plain = [[100.0 * sum(float(q[k]) * float(t[k]) for k in range(len(q))) for t in text] for q in vx]
    close(build_head("zeroshot").fit(FitData(x, y, 5, text=text))(vx), plain)


def test_prototype_on_real_features(caltech):
    (x, y), (tx, _), c = caltech["train"], caltech["test"], caltech["classes"]
    xn, tn = x.double().numpy(), tx.double().numpy()
    prototypes = []
    for k in range(c):
        mean = xn[y.numpy() == k].mean(0)
        prototypes.append(mean / np.linalg.norm(mean))
    plain = 100.0 * tn @ np.stack(prototypes).T
    close(PrototypeHead().fit(FitData(x, y, c))(tx), plain)


# -- Tip-Adapter ----------------------------------------------------------------------------------------
def _plain_tip(x, keys, labels, c, alpha, beta, text=None):
    """methods-dac-imo.md §1.3: 100 f W + alpha exp(-beta (1 - f K^T)) L (the cache alone without text)."""
    x, keys = np.asarray(x, dtype=np.float64), np.asarray(keys, dtype=np.float64)
    cache = np.exp(-beta * (1.0 - x @ keys.T)) @ one_hot(labels, c)
    return cache if text is None else 100.0 * x @ np.asarray(text, dtype=np.float64).T + alpha * cache


def test_tip_adapter_with_text_logits_and_search():
    x, y, vx, vy, text = _toy(seed=3)
    head = TipAdapterHead(beta_steps=25, alpha_steps=12, beta_scale=9, alpha_scale=6, chunk=7)
    head.fit(FitData(x, y, 5, text=text, val_x=vx, val_y=vy))
    close(head(vx), _plain_tip(vx, x, y, 5, head.alpha, head.beta, text))
    betas, alphas = head.grid()
    best, picked = -1.0, None
    for beta in betas.tolist():  # Tip-Adapter's search_hp: beta outer, alpha inner, strict >
        for alpha in alphas.tolist():
            acc = accuracy(_plain_tip(vx, x, y, 5, alpha, beta, text), vy)
            if acc > best:
                best, picked = acc, (alpha, beta)
    assert (head.alpha, head.beta) == pytest.approx(picked)


def _plain_cache_log(x, keys, labels, c, beta):
    """The log of the cache term, per class (a log-sum-exp: finite at any beta), float64."""
    a = beta * (np.asarray(x, np.float64) @ np.asarray(keys, np.float64).T - 1.0)
    out = np.empty((len(a), c))
    for k in range(c):
        cols = a[:, np.asarray(labels) == k]
        top = cols.max(1, keepdims=True)
        out[:, k] = (top + np.log(np.exp(cols - top).sum(1, keepdims=True)))[:, 0]
    return out


def test_tip_adapter_cache_only_on_real_features_logits_and_search(caltech):
    (x, y), (vx, vy), c = caltech["train"], caltech["val"], caltech["classes"]
    head = TipAdapterHead("caltech101").fit(FitData(x, y, c, val_x=vx, val_y=vy))
    close(head(vx[:300]).exp(), _plain_tip(vx[:300], x, y, c, 1.0, head.beta))  # the cache term itself
    lo, hi, steps = head.image_only_betas
    coarse = np.logspace(math.log10(lo), math.log10(hi), steps)
    accs = [accuracy(torch.from_numpy(_plain_cache_log(vx, x, y, c, b)), vy) for b in coarse]
    i = int(np.argmax(accs))  # the first maximum
    fine = np.linspace(coarse[max(i - 1, 0)], coarse[min(i + 1, steps - 1)], head.refine_steps)
    accs = [accuracy(torch.from_numpy(_plain_cache_log(vx, x, y, c, b)), vy) for b in fine]
    assert head.beta == pytest.approx(float(fine[int(np.argmax(accs))]), rel=1e-5)


# -- GDA ------------------------------------------------------------------------------------------------
def _plain_gda(x, y, c):
    """GDA Eq. 3-4 (methods-coder-gda-iso.md §4.2): class means, KS ridge precision of the pooled
    class-centred covariance D ((N-1) S + tr(S) I)^-1, w = P mu, b = log(1/C) - mu^T P mu / 2."""
    x, y = np.asarray(x, np.float64), np.asarray(y)
    means = np.stack([x[y == k].mean(0) for k in range(c)])
    centred = x - means[y]
    n, d = x.shape
    s = sum(np.outer(r, r) for r in centred) / (n - 1)
    p = d * np.linalg.inv((n - 1) * s + np.trace(s) * np.eye(d))
    w = means @ p
    return w, np.log(1.0 / c) - 0.5 * (w * means).sum(1)


def test_gda_on_real_features(caltech):
    (x, y), (tx, _), c = caltech["train"], caltech["test"], caltech["classes"]
    w, b = _plain_gda(x, y, c)
    close(GDAHead().fit(FitData(x, y, c))(tx), tx.double().numpy() @ w.T + b)


def test_gda_fits_on_view_rows_and_searches_alpha_with_text():
    x, y, vx, vy, text = _toy(seed=5)
    views = F.normalize(x[:, None] + 0.05 * torch.randn(len(x), 3, x.shape[1], generator=torch.Generator().manual_seed(0)),
                        dim=-1)
    rows, rows_y = views.flatten(0, 1), y.repeat_interleave(3)
    head = GDAHead().fit(FitData(x, y, 5, text=text, val_x=vx, val_y=vy, train_views=views))
    w, b = _plain_gda(rows, rows_y, 5)  # every view a sample (N = V K C), as the reference
    gda = vx.double().numpy() @ w.T + b
    close(head(vx), 100.0 * vx.double().numpy() @ text.double().numpy().T + head.alpha * gda)
    best, picked = -1.0, None
    for alpha in GDAHead.ALPHAS:
        acc = accuracy(100.0 * vx.double().numpy() @ text.double().numpy().T + alpha * gda, vy)
        if acc > best:
            best, picked = acc, alpha
    assert head.alpha == pytest.approx(picked)


# -- IsoCLIP, prototype mixing ----------------------------------------------------------------------------
def test_isoclip_filtered_projector_and_class_means(tiny_clip):
    g = torch.Generator().manual_seed(2)
    pre, y = torch.randn(24, 64, generator=g), torch.arange(24) % 4
    wi, wt = tiny_clip.image_projection.double().numpy(), tiny_clip.text_projection.double().numpy()
    k_top, k_bottom = 6, 4
    # IsoCLIP (methods-coder-gda-iso.md §5): Psi = W_i^T W_t = proj_img proj_txt^T, keep singular directions
    # k_top .. r - k_bottom, project: f -> norm(f U_S U_S^T proj_img)
    u, _, _ = np.linalg.svd(wi @ wt.T, full_matrices=False)
    r = min(u.shape[1], wi.shape[1])
    u_s = u[:, k_top:r - k_bottom]
    projector = u_s @ u_s.T @ wi
    def embed(f):
        z = f @ projector
        return z / np.linalg.norm(z, axis=-1, keepdims=True)
    p = pre.double().numpy()
    prototypes = embed(np.stack([p[y.numpy() == k].mean(0) for k in range(4)]))
    head = IsoCLIPHead(k_top=k_top, k_bottom=k_bottom).fit(FitData(
        pre, y, 4, extras={"isoclip.image_projection": tiny_clip.image_projection,
                           "isoclip.text_projection": tiny_clip.text_projection}, normalize=False))
    close(head(pre), 100.0 * embed(p) @ prototypes.T, rtol=1e-4)  # float32 SVD vs float64


def _plain_mixing(x, y, text, c, lam, rank, gamma):
    """Our reading of TAMP (methods-coder-gda-iso.md §6.3), as MixingHead documents it."""
    x, text = np.asarray(x, np.float64), np.asarray(text, np.float64)
    means = np.stack([x[np.asarray(y) == k].mean(0) for k in range(c)])
    protos = means / np.linalg.norm(means, axis=1, keepdims=True)
    directions = np.linalg.svd(text, full_matrices=False)[2][:rank]
    aligned = protos @ directions.T @ directions
    aligned /= np.linalg.norm(aligned, axis=1, keepdims=True)
    mixed = lam * aligned + (1 - lam) * text
    mixed /= np.linalg.norm(mixed, axis=1, keepdims=True)
    w, b = _plain_gda(x, y, c)
    return lambda q: 100.0 * np.asarray(q, np.float64) @ mixed.T + gamma * (np.asarray(q, np.float64) @ w.T + b)


def test_mixing_logits_and_search():
    x, y, vx, vy, text = _toy(seed=7)
    head = MixingHead().fit(FitData(x, y, 5, text=text, val_x=vx, val_y=vy))
    close(head(vx), _plain_mixing(x, y, text, 5, head.lam, head.rank, head.gamma)(vx), rtol=1e-4)
    best, picked = -1.0, None
    for rank in sorted({max(1, round(f * 5)) for f in head.ranks}):
        for lam in head.lambdas:
            for gamma in head.gammas:
                acc = accuracy(_plain_mixing(x, y, text, 5, lam, rank, gamma)(vx), vy)
                if acc > best:
                    best, picked = acc, (lam, rank, gamma)
    assert (head.lam, head.rank, head.gamma) == pytest.approx(picked)


# -- CODER ----------------------------------------------------------------------------------------------
def _text_set(c=4, d=10, seed=0):
    """Per class: a name, a synonym, two attributes, an analogous class; one-to-one texts for 3 pairs."""
    g = torch.Generator().manual_seed(seed)
    kinds = torch.tensor([0, 1, 2, 2, 3] * c)
    classes = torch.arange(c).repeat_interleave(5)
    emb = F.normalize(torch.randn(5 * c, d, generator=g), dim=-1)
    pairs = torch.tensor([[0, 1], [1, 0], [2, 3]])
    return EmbeddedTextSet(emb, classes, kinds, pairs, F.normalize(torch.randn(3, d, generator=g), dim=-1))


def test_coder_stage_one_and_rerank():
    ts = _text_set()
    x = F.normalize(torch.randn(30, 10, generator=torch.Generator().manual_seed(1)), dim=-1)
    plain = []
    for q in x.double():
        scores = []
        for k in range(4):  # §3.4: mean of the att/ana similarities with the best name-or-synonym one
            sims = [float(q @ t) for t, ck, kind in zip(ts.embeddings.double(), ts.classes, ts.kinds) if ck == k and kind >= 2]
            ns = max(float(q @ t) for t, ck, kind in zip(ts.embeddings.double(), ts.classes, ts.kinds) if ck == k and kind < 2)
            scores.append(100.0 * (sum(sims) + ns) / (len(sims) + 1))
        plain.append(scores)
    clf = CoderClassifier(ts, 4)
    close(clf.stage1(x), plain)
    # stage 2 (§3.5): top-k of low-confidence rows reordered by g_c; a pair needs both directions
    stage1 = clf.stage1(x)
    out = clf.rerank(x, stage1, tau=1.5, k=3)  # a probability gap is at most 1: every row is reranked
    ovo = {tuple(p.tolist()): m.double() for p, m in zip(ts.ovo_pairs, ts.ovo_means)}
    for q, row, new in zip(x.double(), stage1, out):
        top = row.topk(3).indices.tolist()
        gaps = []
        for c1 in top:
            total = 0.0
            for c2 in top:
                if c2 != c1 and (c1, c2) in ovo and (c2, c1) in ovo:
                    total += float(q @ ovo[(c1, c2)]) - float(q @ ovo[(c2, c1)])
            gaps.append(total / 2)
        winner = top[max(range(3), key=lambda i: (gaps[i], -i))]  # ties keep the stage-1 order
        assert int(new.argmax()) == winner


def test_coder_adapter_logits_and_search_with_refinements():
    ts = _text_set(c=4)
    x, y, vx, vy, text = _toy(c=4, d=10, seed=9)
    head = CoderAdapterHead(beta_steps=12, alpha_steps=6, refinements=2, beta_max=60, alpha_max=10)
    head.fit(FitData(x, y, 4, text=text, val_x=vx, val_y=vy, extras=ts.tensors()))
    t = adapter_texts(ts).double().numpy()  # name, att, ana texts only (§3.6)

    def phi(f):
        z = np.asarray(f, np.float64) @ t.T
        return z / np.linalg.norm(z, axis=1, keepdims=True)

    def logits(q, alpha, beta):  # §3.6: per-query min-max normalised affinities in Tip-Adapter's formula
        a = phi(q) @ phi(x).T
        a = (a - a.min(1, keepdims=True)) / (a.max(1, keepdims=True) - a.min(1, keepdims=True))
        return 100.0 * np.asarray(q, np.float64) @ text.double().numpy().T + alpha * np.exp(-beta * (1 - a)) @ one_hot(y, 4)

    close(head(vx), logits(vx, head.alpha, head.beta), rtol=1e-4)
    betas = [0.1 + i * (60 - 0.1) / 12 for i in range(12)]
    alphas = [0.1 + j * (10 - 0.1) / 6 for j in range(6)]
    for _round in range(3):  # round 1, then two refinements over [0.5, 1.5] x the best; best reset each round
        best, picked = -1.0, None
        for beta in betas:
            for alpha in alphas:
                acc = accuracy(logits(vx, alpha, beta), vy)
                if acc > best:
                    best, picked = acc, (alpha, beta)
        betas = np.linspace(0.5 * picked[1], 1.5 * picked[1], 12).tolist()
        alphas = np.linspace(0.5 * picked[0], 1.5 * picked[0], 6).tolist()
    assert (head.alpha, head.beta) == pytest.approx(picked, rel=1e-5)
    # a round-1 value on its grid's edge is noted together with what the refinement rounds made of it
    edges = [n for n in head.notes if "edge of its grid" in n]
    assert edges and all(n.endswith(f"in round 1; 2 refinement rounds then chose alpha={head.alpha:.4g}, "
                                    f"beta={head.beta:.4g}") for n in edges), head.notes


def test_coder_zero_shot_head_needs_no_tuning():
    ts = _text_set()
    x = F.normalize(torch.randn(8, 10), dim=-1)
    head = CoderHead("my_dataset").fit(FitData(x, torch.arange(8) % 4, 4, text=F.normalize(torch.randn(4, 10), dim=-1),
                                               extras=ts.tensors()))
    assert head.active_tau is None and "set tau" in head.notes[0]  # no tau for an unknown dataset: stage 1 only


# -- IMO's protocol: TA on IMO's grid, Tip-X ------------------------------------------------------------
def test_tip_on_imos_grid_search():
    x, y, vx, vy, text = _toy(seed=11)
    head = TipIMOGridHead().fit(FitData(x, y, 5, text=text, val_x=vx, val_y=vy))
    best, picked = -1.0, None
    for beta in np.linspace(0, 20, 20):  # methods-dac-imo.md §2.5: alpha linspace(0, 20, 200), beta (0, 20, 20)
        for alpha in np.linspace(0, 20, 200):
            acc = accuracy(_plain_tip(vx, x, y, 5, alpha, beta, text), vy)
            if acc > best:
                best, picked = acc, (alpha, beta)
    assert (head.alpha, head.beta) == pytest.approx(picked, rel=1e-5, abs=1e-6)
    close(head(vx), _plain_tip(vx, x, y, 5, head.alpha, head.beta, text))


def _plain_tipx_terms(q, q_orig, keys, keys_orig, labels, text, c):
    """Tip-X (SuS-X) as IMO's code: the zero-shot logits, the rescaled KL logits and the affinities.
    KL(p_test || q_train) of softmax(cos / 0.5) text distributions, for every row (without the
    reference's remainder bug), min-max rescaled into the range of the affinity matrix."""
    q, q_orig, keys, keys_orig, text = (np.asarray(a, np.float64) for a in (q, q_orig, keys, keys_orig, text))

    def dist(f):
        z = f @ text.T / 0.5
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)
    p, r = dist(q_orig), dist(keys_orig)
    kl = np.array([[float((pi * np.log(pi / rj)).sum()) for rj in r] for pi in p])
    affinity = q @ keys.T
    scaled = (kl - kl.min()) / (kl.max() - kl.min()) * (affinity.max() - affinity.min()) + affinity.min()
    return 100.0 * q_orig @ text.T, (-scaled) @ one_hot(labels, c), affinity


def _plain_tipx(q, q_orig, keys, keys_orig, labels, text, c, alpha, beta, gamma):
    zs, kl, affinity = _plain_tipx_terms(q, q_orig, keys, keys_orig, labels, text, c)
    return zs + gamma * kl + alpha * np.exp(-beta * (1 - affinity)) @ one_hot(labels, c)


def test_tipx_logits_and_search():
    x, y, vx, vy, text = _toy(c=4, d=10, n_val=5, seed=13)
    head = TipXHead().fit(FitData(x, y, 4, text=text, val_x=vx, val_y=vy))
    close(head(vx), _plain_tipx(vx, vx, x, x, y, text, 4, head.alpha, head.beta, head.gamma), rtol=1e-4)
    zs, kl, affinity = _plain_tipx_terms(vx, vx, x, x, y, text, 4)
    betas, alphas, gammas = np.linspace(0, 20, 20), np.linspace(0, 20, 200), np.linspace(0, 30, 50)
    acc = np.empty((20, 200, 50))  # every grid point evaluated directly, indexed (beta, alpha, gamma)
    for b, beta in enumerate(betas):
        cache = np.exp(-beta * (1 - affinity)) @ one_hot(y, 4)
        for g, gamma in enumerate(gammas):
            logits = zs + gamma * kl + alphas[:, None, None] * cache
            acc[b, :, g] = (logits.argmax(-1) == vy.numpy()).mean(-1)
    b, a, g = np.unravel_index(int(np.argmax(acc)), acc.shape)  # the first best: beta, then alpha, then gamma
    assert (head.alpha, head.beta, head.gamma) == pytest.approx((alphas[a], betas[b], gammas[g]), rel=1e-5, abs=1e-6)


def test_tipx_plus_plus_takes_the_kl_term_from_original_features():
    x, y, vx, vy, text = _toy(c=4, d=10, seed=17)
    rotate = torch.linalg.qr(torch.randn(10, 10, generator=torch.Generator().manual_seed(0)))[0]
    ax, avx = F.normalize(x @ rotate + 0.1, dim=-1), F.normalize(vx @ rotate + 0.1, dim=-1)  # "adapted" features
    head = TipXHead().fit(FitData(ax, y, 4, text=text, val_x=avx, val_y=vy, val_text_x=vx, train_text_x=x),
                          hparams={"alpha": 2.0, "beta": 3.0, "gamma": 5.0})
    close(head(avx, text_x=vx), _plain_tipx(avx, vx, ax, x, y, text, 4, 2.0, 3.0, 5.0), rtol=1e-4)


# -- trained methods ------------------------------------------------------------------------------------
def _cache_adapter(cls, x, y, text, **kwargs):
    """A trainable cache adapter set up on a few-shot set without a trainer (what setup does)."""
    from adapters.backbone import TINY_MODEL

    model = cls(num_classes=int(y.max()) + 1, backbone=TINY_MODEL, embed_dim=x.shape[1], dataset="caltech101", **kwargs)
    if text is not None:
        model.text_features = text
    order = torch.argsort(y, stable=True)
    model.train_labels = y[order]
    model.store_train(x[order], y[order])
    return model, order


def test_tip_adapter_f_loss_and_optimiser_follow_the_reference():
    from adapters.tip_adapter_f import TipAdapterF

    x, y, vx, vy, text = _toy(seed=19)
    model, order = _cache_adapter(TipAdapterF, x, y, text)
    alpha, beta = model.training_alpha_beta()
    assert (alpha, beta) == (3, 1.0)  # caltech101's init_alpha and the reference's init_beta
    # methods-dac-imo.md §1.4: keys initialised from the cache, CE of 100 f W + alpha exp(-beta (1 - f K^T)) L
    keys = x[order].double().numpy()
    plain = _plain_tip(vx, keys, y[order], 5, alpha, beta, text)
    logp = plain - plain.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    loss = -np.mean([logp[i, int(vy[i])] for i in range(len(vy))])
    ours, _ = model.training_loss(vx, vy)
    assert math.isclose(float(ours), loss, rel_tol=1e-5)
    ours.backward()
    assert model.keys.grad is not None and model.keys.grad.abs().sum() > 0  # only the keys train
    # AdamW lr 1e-3, eps 1e-4, weight decay 0.01 (PyTorch's default, as the reference), cosine over all steps
    assert (model.hparams.lr, model.hparams.eps, model.hparams.weight_decay) == (1e-3, 1e-4, 0.01)
    assert model.hparams.scheduler == "cosine"


def test_tip_adapter_f_inference_uses_its_trained_keys_as_they_are():
    from adapters.tip_adapter_f import TipAdapterF

    x, y, vx, vy, text = _toy(seed=23)
    model, order = _cache_adapter(TipAdapterF, x, y, None)
    with torch.no_grad():
        model.keys.mul_(1.3).add_(0.05)  # trained keys are not normalised
    model._val = (vx, vy)
    model.finalize()
    keys = model.keys.detach().double().numpy()
    plain = _plain_cache_log(vx, keys, y[order], 5, model.head.beta)  # image-only: the cache term (its log)
    close(model.logits(vx), plain)


def test_trainable_coder_adapter_logits():
    from adapters.coder import CoderAdapter

    ts = _text_set(c=4)
    x, y, vx, vy, text = _toy(c=4, d=10, seed=29)
    model, order = _cache_adapter(CoderAdapter, x, y, None, init_beta=5.0)
    # setup reads the text set from the data; here by hand, as setup does: name, att and ana texts
    model.text_set_embeddings = adapter_texts(ts)
    model.store_train(x[order], y[order])
    t = adapter_texts(ts).double().numpy()
    phi = lambda f: (np.asarray(f, np.float64) @ t.T) / np.linalg.norm(np.asarray(f, np.float64) @ t.T, axis=1,  # noqa: E731
                                                                         keepdims=True)
    a = phi(vx) @ phi(x[order]).T
    a = (a - a.min(1, keepdims=True)) / (a.max(1, keepdims=True) - a.min(1, keepdims=True))
    plain = 1.0 * np.exp(-5.0 * (1 - a)) @ one_hot(y[order], 4)  # image-only: alpha (1) times the cache
    close(model.train_logits(vx), plain, rtol=1e-4)
    assert minmax_affinity(torch.tensor([[1.0, 3.0, 2.0]])).tolist() == [[0.0, 1.0, 0.5]]


def test_imo_block_is_clip_plus_the_scaled_parallel_bottleneck():
    """methods-dac-imo.md §2.2: x <- x + MLP(LN_2(x)) + s * up(dropout(relu(down(x)))), x after attention."""
    import warnings

    from adapters.imo import IMOAdapter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = IMOAdapter(num_classes=3, backbone="tiny-clip").eval()
    for p in model.adapters.parameters():
        torch.nn.init.normal_(p, std=0.2)
    block = model.encoder.model.visual.transformer.resblocks[0]
    x = torch.randn(2, 5, block.ln_1.normalized_shape[0])
    with torch.no_grad():
        model.adapters_enabled = False  # CLIP's own block (the hooks add nothing): the plain pieces
        after_attention = x + block.ls_1(block.attention(block.ln_1(x)))
        clip = after_attention + block.ls_2(block.mlp(block.ln_2(after_attention)))
        close(block(x), clip.numpy())
        adapter = model.adapters[0]
        branch = 0.03 * (torch.relu(after_attention @ adapter.down.weight.T + adapter.down.bias) @ adapter.up.weight.T
                         + adapter.up.bias)
        model.adapters_enabled = True
        close(block(x), (clip + branch).numpy())
