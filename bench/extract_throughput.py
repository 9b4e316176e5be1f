"""Feature-extraction throughput: the full shard pipeline vs the bare encoder, same process.

Full path: tar shards -> decode -> CLIP eval transform -> frozen encoder, through
`ImageShardDataModule`'s predict loader (``--workers`` loader processes) at batch 32.
Baseline: the same encoder on the same images already decoded and transformed into tensors in memory,
at the same batch size. Both use ViT-B-32 with random weights (throughput does not depend on them)
over ../shared/data/imagenet-sample-images (1,000 real full-size JPEGs). Prints images/s of both and
their ratio (1.0 means the data pipeline costs nothing).

    python -m bench.extract_throughput [--model ViT-B-32] [--workers 2] [--images 320]
"""
from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch
from PIL import Image

from adapters.backbone import FrozenCLIP
from bench import report
from datamodules.images import ImageShardDataModule
from datamodules.shards import Record, write_shards

DEFAULT_IMAGES = Path(__file__).resolve().parents[1].parent / "shared/data/imagenet-sample-images"


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images_dir", default=str(DEFAULT_IMAGES))
    p.add_argument("--images", type=int, default=320, help="how many images to push through each path")
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    files = sorted(Path(args.images_dir).glob("*.JPEG"))[: args.images]
    if not files:
        raise SystemExit(f"no .JPEG files in {args.images_dir}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = FrozenCLIP(args.model, pretrained=None).to(args.device)
    records = [Record(f, i % 10, "train") for i, f in enumerate(files)]
    with tempfile.TemporaryDirectory() as tmp:
        # shards of 40: enough shards for every worker
        write_shards(records, [str(i) for i in range(10)], tmp, max_count=40, progress=False)
        dm = ImageShardDataModule(tmp, batch_size=args.batch_size, num_workers=args.workers,
                                  predict_splits=["train"])
        dm.set_transforms(backbone.train_transform, backbone.eval_transform)

        def full_path() -> int:
            n = 0
            for batch in dm.predict_dataloader()[0]:
                backbone.encode_image(batch["image"].to(args.device, non_blocking=True))
                n += len(batch["label"])
            return n

        tensors = torch.stack([backbone.eval_transform(Image.open(f).convert("RGB")) for f in files])

        def bare_encoder() -> int:
            for i in range(0, len(tensors), args.batch_size):
                backbone.encode_image(tensors[i:i + args.batch_size].to(args.device, non_blocking=True))
            return len(tensors)

        bare_encoder()  # warm-up (allocator, kernels)
        results = {}
        for name, fn in [("bare_encoder", bare_encoder), ("full_pipeline", full_path),
                         ("bare_encoder_2", bare_encoder), ("full_pipeline_2", full_path)]:
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            n = fn()
            if args.device == "cuda":
                torch.cuda.synchronize()
            results[name] = n / (time.perf_counter() - start)
    bare = max(results["bare_encoder"], results["bare_encoder_2"])
    full = max(results["full_pipeline"], results["full_pipeline_2"])
    out = {"name": f"extraction throughput, {args.model}, batch {args.batch_size}, {args.workers} workers, "
                   f"{len(files)} ImageNet JPEGs, {args.device}",
           "full_pipeline_images_per_s": round(full, 1), "bare_encoder_images_per_s": round(bare, 1),
           "images_per_s_per_worker": round(full / max(1, args.workers), 1),
           "ratio": round(full / bare, 3), "command": "python -m bench.extract_throughput"}
    return report(out, args.json)


if __name__ == "__main__":
    main()
