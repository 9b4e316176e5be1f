"""ImageNet-size evaluation within a workstation's memory: peak RSS and time per head.

Generates (fixed seed, in a temporary folder) a synthetic 1000-class feature file the size of 16-shot
ImageNet: 16,000 cache keys, 10,000 val, 50,000 test, 512-d fp16, with a text classifier. Each head
then runs through ``evaluate.py`` in its own process, chunked (the default) and unchunked
(``--chunk_mb 0``: whole [val x cache] matrices, the previous behaviour), and the script prints the
peak resident memory and the time of each, their ratio, and whether both chose the same
hyper-parameters and scored the same accuracy.

    python -m bench.eval_scale [--heads prototype,tip,gda] [--classes 1000] [--no_unchunked]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import report

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_HEADS = "zeroshot,prototype,tip,gda,mixing,tip_imo,tipx"


def make_file(path: Path, classes: int = 1000, shots: int = 16, val: int = 10_000, test: int = 50_000,
              dim: int = 512, seed: int = 0) -> Path:
    from datamodules.feature_file import write_feature_file

    g = torch.Generator().manual_seed(seed)
    # classes share a low-rank structure and samples vary along it (as CLIP's fine-grained classes do), so
    # that the file is hard enough for the heads to disagree and their searches to matter
    basis = torch.randn(8, dim, generator=g) / dim ** 0.5
    centers = F.normalize(torch.randn(classes, 8, generator=g) @ basis + 0.5 * torch.randn(classes, dim, generator=g)
                          / dim ** 0.5, dim=-1)

    def split(n):
        y = torch.arange(n) % classes
        along = 0.3 * (torch.randn(n, 8, generator=g) @ basis) * torch.rand(n, 1, generator=g)
        return F.normalize(centers[y] + along + 1.0 * torch.randn(n, dim, generator=g) / dim ** 0.5, dim=-1), y

    text = F.normalize(centers + 1.5 * torch.randn(classes, dim, generator=g) / dim ** 0.5, dim=-1)
    return write_feature_file(path, {f"train_{shots}shot": split(classes * shots), "val": split(val),
                                     "test": split(test)}, text_features=text,
                              metadata={"dataset": "imagenet-size", "backbone": "ViT-B-32"})


#: evaluate.py in a fresh process that reports its own peak resident memory (KiB) on its last line
_CHILD = ("import json, resource, sys; from clip_adapters import evaluate; code = evaluate.main(sys.argv[1:]); "
          "print(json.dumps({'code': code, 'maxrss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))")


def run_head(path: Path, head: str, shots: int, extra: list[str]) -> dict:
    """One evaluate.py run in a child process: its peak RSS (MB), wall time and record."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", _CHILD, "--features", str(path), "--shots", str(shots),
                                 "--heads", head, "--output", out.name, *extra], cwd=ROOT, capture_output=True,
                                text=True)
        seconds = time.perf_counter() - start
        status = json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else {"code": -1}
        if result.returncode != 0 or status["code"] != 0:
            raise SystemExit(f"evaluate.py --heads {head} failed:\n{result.stderr[-2000:]}")
        (record,) = [r for r in json.loads(Path(out.name).read_text()) if r.get("head") == head]
    return {"peak_mb": round(status["maxrss"] / 1024, 1), "seconds": round(seconds, 1),
            "acc1": record["metrics"]["acc1"], "hyperparameters": record["hyperparameters"]}


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", default=DEFAULT_HEADS)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--no_unchunked", action="store_true", help="skip the unchunked baseline (it needs ~11 GB)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = make_file(Path(tmp) / "imagenet-size.safetensors", classes=args.classes)
        for head in args.heads.split(","):
            whole = None if args.no_unchunked else run_head(path, head, 16, ["--chunk_mb", "0"])
            chunked = run_head(path, head, 16, [])
            row = {"chunked_peak_mb": chunked["peak_mb"], "chunked_s": chunked["seconds"], "acc1": chunked["acc1"],
                   "hyperparameters": chunked["hyperparameters"]}
            if whole is not None:
                row.update(unchunked_peak_mb=whole["peak_mb"], unchunked_s=whole["seconds"],
                           memory_ratio=round(whole["peak_mb"] / chunked["peak_mb"], 2),
                           same_result=whole["hyperparameters"] == chunked["hyperparameters"]
                           and abs(whole["acc1"] - chunked["acc1"]) < 1e-9)
            rows[head] = row
            print(head, json.dumps(row), flush=True)
    worst = max(r["chunked_peak_mb"] for r in rows.values())
    out = {"name": f"evaluate.py at ImageNet size ({args.classes} classes, 16 shots, 10k val, 50k test, 512-d)",
           "ratio": round(min(r.get("memory_ratio", 1.0) for r in rows.values()), 2),
           "max_chunked_peak_mb": worst, "rows": rows, "command": "python -m bench.eval_scale"}
    return report(out, args.json)


if __name__ == "__main__":
    main()
