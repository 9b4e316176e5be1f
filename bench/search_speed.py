"""Tip-Adapter alpha/beta search: vectorised (adapters.heads) vs the reference double loop.

Same process, same val features (caltech101 16-shot, real CLIP ViT-B/32), Tip-Adapter's 200 x 20
grid. The text classifier is synthetic (class prototypes plus noise; the shared files have no
text) so that the alpha axis is searched too. The looped search is timed on the first
``--loop_betas`` betas (x 20 alphas) and scaled to the full grid; the ratio is printed.

    python -m bench.search_speed
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from adapters.heads import CLIP_SCALE, FitData, TipAdapterHead, class_means
from bench import report
from datamodules.feature_file import FeatureFile

DEFAULT_FILE = Path(__file__).resolve().parents[1].parent / "shared/data/clip-vit-b32-features/caltech101.safetensors"


def looped_search(head: TipAdapterHead, data: FitData, betas, alphas):
    """As the reference codes do it: every grid point recomputes affinity, cache and logits."""
    values = F.one_hot(data.train_y, data.num_classes).float()
    best, best_ab = -1.0, None
    for beta in betas.tolist():
        for alpha in alphas.tolist():
            affinity = data.val_x @ data.train_x.T
            cache = torch.exp(-beta * (1 - affinity)) @ values
            logits = CLIP_SCALE * data.val_x @ data.text.T + alpha * cache
            acc = (logits.argmax(-1) == data.val_y).float().mean().item()
            if acc > best:
                best, best_ab = acc, (alpha, beta)
    return best_ab


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--features", default=str(DEFAULT_FILE))
    p.add_argument("--loop_betas", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    ff = FeatureFile(args.features)
    train, _ = ff.train_split(16)
    val = ff.split("val")
    g = torch.Generator().manual_seed(0)
    means = class_means(F.normalize(train.features.float(), dim=-1), train.labels, ff.num_classes)
    text = F.normalize(means + 0.05 * torch.randn(means.shape, generator=g), dim=-1)
    data = FitData(train.features, train.labels, ff.num_classes, text, val.features, val.labels, ff.dataset)
    head = TipAdapterHead(dataset=ff.dataset)
    head.fit(data)  # builds the cache (and warms up)
    vec = min(_timed(lambda: head.search(data.val_x, data.val_y)) for _ in range(args.repeats))
    betas, alphas = head.grid()
    part = _timed(lambda: looped_search(head, data, betas[: args.loop_betas], alphas))
    looped = part * len(betas) / args.loop_betas
    out = {
        "name": "alpha/beta search, 200x20 grid, caltech101 16-shot val",
        "vectorised_s": round(vec, 3), "looped_s_extrapolated": round(looped, 2),
        "ratio": round(looped / vec, 1), "command": "python -m bench.search_speed",
    }
    print(f"vectorised search: {vec:.3f} s for {len(betas) * len(alphas)} points; "
          f"reference double loop: {looped:.1f} s (timed on {args.loop_betas * len(alphas)} points, scaled) "
          f"-> {looped / vec:.0f}x faster")
    return report(out, args.json)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
