"""Accuracy vs shots on the real feature files, both selection protocols: the benchmark runner's table.

For caltech101, oxford_flowers and fgvc (../shared/data/clip-vit-b32-features, OpenAI CLIP ViT-B/32)
at 1, 4 and 16 shots (the files' fixed train_{K}shot subsets, so one cell per shot count): the
training-free heads that run on image-only features (prototype, Tip-Adapter cache, GDA) and the
trained methods on cached features with their recipes (Tip-Adapter-F, DAC, the DAC ensemble), run
by `clip_adapters.benchmark` under the ``full`` protocol (choices on the whole val split) and the
``realistic`` one (min(K, 4) val images per class). Each cell's ``best (selected on val)`` row is
the method with the best accuracy on the selection data. The heads that need text (zero-shot, mixing,
CODER, CODER-Adapter, Tip-X), pre-projection features (IsoCLIP) or images (IMO) cannot run on these
files. Writes bench/accuracy.png (the full protocol) and keeps the runner's output in
bench/benchmark/ (resumable: delete it to rerun from scratch).

    python -m bench.accuracy
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from clip_adapters import benchmark

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared/data/clip-vit-b32-features"
DATASETS = ("caltech101", "oxford_flowers", "fgvc")
METHODS = "prototype,tip,gda,tip_adapter_f,dac,dac-ensemble"
NOT_APPLICABLE = {"zeroshot, mixing, coder, coder_adapter, tipx": "need text features (the files have none)",
                  "isoclip": "needs pre-projection features", "imo": "trains through the image encoder (needs images)"}


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plot", default=str(ROOT / "bench" / "accuracy.png"))
    p.add_argument("--out", default=str(ROOT / "bench" / "benchmark"))
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    argv = ["--features", *(str(DATA / f"{d}.safetensors") for d in DATASETS), "--shots", "1", "4", "16",
            "--seeds", "1", "--methods", METHODS, "--protocol", "full", "realistic", "--out", args.out]
    records = benchmark.run(benchmark.parse_args(argv))
    shutil.copyfile(Path(args.out) / "plots" / "fgvc-full.png", args.plot)
    tables = {protocol: benchmark.summary_table(records, protocol) for protocol in ("full", "realistic")}
    table = "\n\n".join(f"**{p} protocol**\n\n{t}" for p, t in tables.items())
    gains = gains_over_gda(records)
    out = {"name": "test accuracy vs shots (%), OpenAI CLIP ViT-B/32 features, image-only, both protocols",
           "table": table, "gains_over_raw_gda": gains, "not_applicable": NOT_APPLICABLE,
           "command": "python -m bench.accuracy"}
    print(table)
    print(json.dumps(gains, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


def gains_over_gda(records: list[dict]) -> dict:
    """Per protocol and shots: the average over the files of (method - raw GDA), for every method."""
    out = {}
    rows = [r for r in records if r.get("task") == "fewshot_classification" and r.get("metrics")]
    for protocol in ("full", "realistic"):
        for k in (1, 4, 16):
            cell = [r for r in rows if r["protocol"] == protocol and r["shots"] == k]
            gda = {r["dataset"]: r["metrics"]["acc1"] for r in cell if r["head"] == "gda"}
            by_method: dict[str, list[float]] = {}
            for r in cell:
                if r["dataset"] in gda:
                    by_method.setdefault(r["head"], []).append(100 * (r["metrics"]["acc1"] - gda[r["dataset"]]))
            out[f"{protocol}/{k}-shot"] = {m: round(sum(v) / len(v), 2) for m, v in by_method.items()
                                           if len(v) == len(gda)}
    return out


if __name__ == "__main__":
    main()
