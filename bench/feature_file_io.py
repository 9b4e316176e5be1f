"""Feature-file reads: memory-mapped `FeatureFile` vs loading the whole file, at growing file sizes.

For each size, a synthetic feature file is written once; then, each in a fresh process, (a) the
memory-mapped reader opens it and gathers a 4,096-row random batch, and (b) the whole file is read
into memory (``safetensors.torch.load(path.read_bytes())``) and the same batch gathered. Reported:
open+gather time and the anonymous resident memory the read adds (``RssAnon``: memory the process
owns; the file-backed pages a mapping touches are page cache the kernel can drop, so RSS would
overstate them). With memory mapping the memory must not grow with the file size.

    python -m bench.feature_file_io [--sizes_mb 64 256 1024]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench import report

PROBE = r"""
import resource, sys, time, torch
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) / 1024
path, mode = sys.argv[1], sys.argv[2]
import safetensors.torch
from bench import report
from datamodules.feature_file import FeatureFile
before = rss_mb()
start = time.perf_counter()
if mode == "mmap":
    x = FeatureFile(path).features("train")
else:
    x = safetensors.torch.load(open(path, "rb").read())["train.features"]
idx = torch.randint(0, x.shape[0], (4096,), generator=torch.Generator().manual_seed(0))
batch = x[idx].float()
elapsed = time.perf_counter() - start
print(elapsed, rss_mb() - before, float(batch.sum()))
"""


def measure(path: Path, mode: str) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(path), mode], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    seconds, memory, _ = out.stdout.split()
    return float(seconds), float(memory)


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes_mb", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    from datamodules.feature_file import write_feature_file

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mb in args.sizes_mb:
            n = mb * 2**20 // (512 * 2)  # fp16 rows of 512
            path = Path(tmp) / f"f{mb}.safetensors"
            feats = torch.nn.functional.normalize(torch.randn(n, 512), dim=-1)
            write_feature_file(path, {"train": (feats, torch.zeros(n, dtype=torch.long))})
            del feats
            (t_map, m_map), (t_full, m_full) = measure(path, "mmap"), measure(path, "full")
            rows.append({"size_mb": mb, "mmap_s": round(t_map, 3), "mmap_anon_mb": round(m_map, 1),
                         "full_s": round(t_full, 3), "full_anon_mb": round(m_full, 1)})
            path.unlink()
    largest = rows[-1]
    out = {"name": f"feature-file open + 4,096-row gather, {args.sizes_mb[0]}-{args.sizes_mb[-1]} MB files",
           "rows": rows, "ratio": round(largest["full_anon_mb"] / max(largest["mmap_anon_mb"], 1.0), 1),
           "ratio_meaning": f"memory added by a full read / by a memory-mapped read at {largest['size_mb']} MB",
           "mmap_memory_growth_mb": round(rows[-1]["mmap_anon_mb"] - rows[0]["mmap_anon_mb"], 1),
           "command": "python -m bench.feature_file_io"}
    return report(out, args.json)


if __name__ == "__main__":
    main()
