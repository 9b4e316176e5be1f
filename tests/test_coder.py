import json

import pytest
import torch
import torch.nn.functional as F

from adapters.backbone import TINY_MODEL
from adapters.coder import CoderAdapterHead, CoderClassifier, CoderHead, coder_features
from adapters.errors import ConfigError
from adapters.heads import FitData, IsoCLIPHead, MixingHead, build_head, isoclip_projector
from adapters.textsets import EmbeddedTextSet, TextSet, build_text_set

NAMES = ["golden retriever", "tabby cat", "red fox"]


def fake_embed(dim=16):
    """Deterministic 'text encoder': a seeded random unit vector per string."""
    def embed(texts):
        out = []
        for t in texts:
            g = torch.Generator().manual_seed(abs(hash(t)) % (2 ** 31))
            out.append(torch.randn(dim, generator=g))
        return F.normalize(torch.stack(out), dim=-1) if out else torch.zeros(0, dim)
    return embed


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_text_sets_from_sample_files(tmp_path):
    files = {
        "synonyms": _write(tmp_path, "syn.json", [{"class_name": "tabby cat", "syno": ["tabby", "tabby cat", "Tabby"]}]),
        "attributes": _write(tmp_path, "att.json", [["golden fur", "golden fur ", ""], ["striped coat"], []]),
        "analogous": _write(tmp_path, "ana.json", {"red fox": ["coyote", "golden retriever"]}),
        "descriptions": _write(tmp_path, "cupl.json", {"tabby cat": ["A tabby cat has an M on its forehead."]}),
        "one_to_one": _write(tmp_path, "ovo.json", {"tabby cat": {"red fox": ["stripes"]}}),
    }
    embed = fake_embed()
    ts = build_text_set(NAMES, "oxford_pets", embed=embed, analogous_threshold=2.0, **files)
    by_kind = {(c, k): t for t, c, k in zip(ts.texts, ts.classes, ts.kinds)}
    assert ts.texts.count("golden retriever which has golden fur") == 1  # stripped and de-duplicated
    assert by_kind[(1, "name")] == "a photo of a tabby cat, a type of pet."
    assert [t for t, c, k in zip(ts.texts, ts.classes, ts.kinds) if k == "syno"] == ["a photo of a tabby, a type of pet."]
    assert (2, "ana") in by_kind and by_kind[(1, "desc")] == "A tabby cat has an M on its forehead."
    assert ts.ovo[(1, 2)] == ["Because of stripes, tabby cat is different from red fox.",
                              "tabby cat stands out in stripes compared to red fox."]  # the reference's two


def test_analogous_class_that_collides_with_another_class_is_dropped(tmp_path):
    path = _write(tmp_path, "ana.json", {"red fox": ["coyote", "golden retriever"]})
    ts = build_text_set(NAMES, None, analogous=path, embed=fake_embed())  # identical strings: cosine 1 > 0.9
    analogous = [t for t, k in zip(ts.texts, ts.kinds) if k == "ana"]
    assert analogous == ["a red fox similar to coyote."]


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"zebra": ["stripes"]}), "unknown class 'zebra'"),
    (json.dumps({"red fox": "bushy tail"}), "must be a list of strings"),
    (json.dumps([["a"], ["b"]]), "one entry per class"),
])
def test_malformed_text_set_file_is_a_clear_error(tmp_path, content, message):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(ConfigError, match=message) as err:
        build_text_set(NAMES, None, attributes=str(tmp_path / "bad.json"))
    assert "bad.json" in str(err.value)


def _embedded(ts: TextSet, embed):
    return EmbeddedTextSet.from_text_set(ts, embed)


def test_coder_with_only_class_prompts_reduces_to_zero_shot_ranking():
    embed = fake_embed()
    ts = build_text_set(NAMES, None)  # names only: one "a photo of {c}" text per class
    emb = _embedded(ts, embed)
    x = F.normalize(torch.randn(20, 16), dim=-1)
    data = FitData(x, torch.arange(20) % 3, 3, text=emb.embeddings, extras=emb.tensors())
    head = CoderHead(rerank=False).fit(data)
    torch.testing.assert_close(head(x), build_head("zeroshot").fit(data)(x))


def test_stage_one_is_mean_of_attribute_sims_with_best_name_or_synonym():
    e = torch.eye(4)
    ts = EmbeddedTextSet(embeddings=e, classes=torch.tensor([0, 0, 0, 1]), kinds=torch.tensor([2, 0, 1, 0]),
                         ovo_pairs=torch.zeros(0, 2, dtype=torch.long), ovo_means=torch.zeros(0, 4))
    x = torch.tensor([[0.5, 0.3, 0.8, 0.1]])
    scores = CoderClassifier(ts, 2).stage1(x) / 100
    xn = F.normalize(x, dim=-1)[0]
    assert torch.allclose(scores[0, 0], (xn[0] + max(xn[1], xn[2])) / 2)  # (att + best of name/syno) / (1 + 1)
    assert torch.allclose(scores[0, 1], xn[3])


def test_rerank_only_permutes_the_top_five():
    g = torch.Generator().manual_seed(0)
    c, d = 12, 16
    pairs = torch.tensor([(a, b) for a in range(c) for b in range(c) if a != b])
    ts = EmbeddedTextSet(F.normalize(torch.randn(c, d, generator=g), dim=-1), torch.arange(c), torch.zeros(c, dtype=torch.long),
                         pairs, F.normalize(torch.randn(len(pairs), d, generator=g), dim=-1))
    clf = CoderClassifier(ts, c)
    x = torch.randn(50, d, generator=g)
    logits = torch.randn(50, c, generator=g)
    out = clf.rerank(x, logits, tau=1.0)  # every row qualifies
    assert not torch.equal(out.argmax(-1), logits.argmax(-1))
    top_before, top_after = logits.topk(5).indices, out.topk(5).indices
    assert all(set(a.tolist()) == set(b.tolist()) for a, b in zip(top_before, top_after))
    outside = torch.ones_like(logits, dtype=torch.bool).scatter_(1, top_before, False)
    assert torch.equal(out[outside], logits[outside])
    torch.testing.assert_close(out.topk(5).values, logits.topk(5).values)
    assert torch.equal(clf.rerank(x, logits, tau=0.0), logits)  # no row below the gap threshold


def test_rerank_follows_the_one_to_one_gap_hand_case():
    # two classes; class 1's one-to-one texts match the image, class 0's do not
    ts = EmbeddedTextSet(torch.eye(3)[:2], torch.tensor([0, 1]), torch.zeros(2, dtype=torch.long),
                         torch.tensor([[0, 1], [1, 0]]), torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, 1.0]]))
    clf = CoderClassifier(ts, 2)
    x = torch.tensor([[0.1, 0.0, 1.0]])
    logits = torch.tensor([[2.0, 1.9]])
    assert clf.rerank(x, logits, tau=0.5).argmax(-1).item() == 1
    assert clf.rerank(x, logits, tau=0.01).argmax(-1).item() == 0  # confident: untouched


def test_coder_adapter_head_uses_minmax_affinities_and_searches_on_val():
    embed = fake_embed()
    emb = _embedded(build_text_set(NAMES, None), embed)
    g = torch.Generator().manual_seed(1)
    centers = F.normalize(torch.randn(3, 16, generator=g), dim=-1)
    y = torch.arange(3).repeat(8)
    x = F.normalize(centers[y] + 0.3 * torch.randn(24, 16, generator=g), dim=-1)
    data = FitData(x[:12], y[:12], 3, text=None, val_x=x[12:], val_y=y[12:], extras=emb.tensors())
    head = CoderAdapterHead(beta_steps=20, alpha_steps=5, refinements=1).fit(data)
    assert set(head.hparams) == {"beta"}
    aff = head.affinity(x)
    assert torch.allclose(aff.amin(-1), torch.zeros(24)) and torch.allclose(aff.amax(-1), torch.ones(24))
    assert torch.equal(head.cache.keys, coder_features(x[:12], emb.embeddings)[torch.argsort(y[:12], stable=True)])


def test_isoclip_without_filtering_is_clips_projection(tiny_clip):
    images = torch.randn(6, 3, *tiny_clip.image_size)
    pre = tiny_clip.encode_image_preprojection(images)
    projector = isoclip_projector(tiny_clip.image_projection, tiny_clip.text_projection, 0, 0)
    torch.testing.assert_close(F.normalize(pre @ projector, dim=-1), tiny_clip.encode_image(images), atol=1e-5, rtol=1e-4)
    filtered = isoclip_projector(tiny_clip.image_projection, tiny_clip.text_projection, 5, 5)
    assert torch.linalg.matrix_rank(filtered) == 32 - 10
    with pytest.raises(ConfigError, match="must be below the rank 32"):
        isoclip_projector(tiny_clip.image_projection, tiny_clip.text_projection, 20, 12)


def test_isoclip_head_defaults_and_classification(tiny_clip):
    pre = torch.randn(30, 64)
    y = torch.arange(30) % 3
    extras = {"isoclip.image_projection": tiny_clip.image_projection, "isoclip.text_projection": tiny_clip.text_projection}
    meta = {"backbone": TINY_MODEL, "pretrained": "none"}
    head = IsoCLIPHead().fit(FitData(pre, y, 3, extras=extras, metadata=meta, normalize=False))
    assert head.hparams == {"k_top": 9, "k_bottom": 3}  # ViT-B/32's 150/50 of 512, scaled to rank 32
    assert head(pre).shape == (30, 3)
    # the authors' per-backbone values are looked up by (backbone, pretrained): ViT-B/32 openai is 150/50
    with pytest.raises(ConfigError, match=r"k_top \(150\) \+ k_bottom \(50\)"):
        IsoCLIPHead().fit(FitData(pre, y, 3, extras=extras, metadata={"backbone": "ViT-B-32", "pretrained": "openai"},
                                  normalize=False))


def test_mixing_extremes():
    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    y = torch.arange(4).repeat(5)
    x = F.normalize(text[y] + 0.5 * torch.randn(20, 8, generator=g), dim=-1)
    data = FitData(x, y, 4, text=text)
    zs = build_head("zeroshot").fit(data)(x)
    only_text = MixingHead().fit(data, hparams={"lambda": 0.0, "rank": 4, "gamma": 0.0})
    torch.testing.assert_close(only_text(x), zs)
    only_image = MixingHead().fit(data, hparams={"lambda": 1.0, "rank": 4, "gamma": 0.0})
    # every text direction kept: the aligned prototype is the class mean projected onto the text span
    means = F.normalize(torch.stack([x[y == c].mean(0) for c in range(4)]), dim=-1)
    basis = torch.linalg.qr(text.T).Q  # [8, 4] orthonormal basis of the text span
    aligned = F.normalize(means @ basis @ basis.T, dim=-1)
    torch.testing.assert_close(only_image(x), 100 * x @ aligned.T, atol=1e-4, rtol=1e-4)
    searched = MixingHead().fit(FitData(x, y, 4, text=text, val_x=x, val_y=y))
    assert set(searched.hparams) == {"lambda", "rank", "gamma"}


def test_coder_adapter_vectors_use_the_references_text_kinds_only():
    from adapters.coder import adapter_texts

    e = torch.eye(5)
    # name, syno, att, ana, desc of one class: CODER-Adapter keeps name, att and ana (methods-coder-gda-iso.md §3.6)
    ts = EmbeddedTextSet(e, torch.zeros(5, dtype=torch.long), torch.tensor([0, 1, 2, 3, 4]),
                         torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 5))
    assert torch.equal(adapter_texts(ts), e[[0, 2, 3]])
    x = F.normalize(torch.randn(6, 5), dim=-1)
    data = FitData(x, torch.zeros(6, dtype=torch.long), 2, extras=ts.tensors())
    head = CoderAdapterHead(beta_steps=5, alpha_steps=2, refinements=0).fit(data, hparams={"alpha": 1.0, "beta": 1.0})
    assert head.text_embeddings.shape == (3, 5)
