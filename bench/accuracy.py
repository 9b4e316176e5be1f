"""Accuracy vs shots on the real feature files: every head and the trained methods, one table and one plot.

For caltech101, oxford_flowers and fgvc (../shared/data/clip-vit-b32-features, OpenAI CLIP ViT-B/32)
at 1, 4 and 16 shots (the files' fixed train_{K}shot subsets): the training-free heads that run on
image-only features (prototype, Tip-Adapter cache, GDA), and the trained methods with their default
configs composed with configs/data/<dataset>.yaml: Tip-Adapter-F (its own head) and DAC (its own head,
and GDA on its adapted features). Hyper-parameters on val, accuracy on test. The heads that need text
(zero-shot, mixing, CODER, CODER-Adapter), pre-projection features (IsoCLIP) or images (IMO) cannot run
on these files and are listed as such. Writes bench/accuracy.png.

    python -m bench.accuracy
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import adapters
from clip_adapters import evaluate, train

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared/data/clip-vit-b32-features"
DATASETS = ("caltech101", "oxford_flowers", "fgvc")
SHOTS = (1, 4, 16)
METHODS = ("prototype", "tip", "gda", "tip_adapter_f (adapter)", "dac (adapter)", "gda+dac")
#: the trained methods: (method config, method name)
TRAINED = (("configs/tip_adapter_f/default.yaml", "tip_adapter_f"), ("configs/dac/default.yaml", "dac"))
NOT_APPLICABLE = {"zeroshot, mixing, coder, coder_adapter": "need text features (the files have none)",
                  "isoclip": "needs pre-projection features", "imo": "trains through the image encoder (needs images)"}


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plot", default=str(ROOT / "bench" / "accuracy.png"))
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    acc: dict[tuple[str, str, int], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in DATASETS:
            path = DATA / f"{name}.safetensors"
            for k in SHOTS:
                exports = []
                for config, method in TRAINED:
                    run = Path(tmp) / f"{name}-{k}-{method}"
                    if train.main(["fit", "--config", str(ROOT / config), "--data", str(ROOT / f"configs/data/{name}.yaml"),
                                   "--run_dir", str(run), "--data.init_args.path", str(path),
                                   "--data.init_args.shots", str(k)]):
                        sys.exit(2)
                    exports.append(str(run / "adapter"))
                loaded = [adapters.load_adapter(e) for e in exports]
                for r in evaluate.evaluate_file(str(path), ["prototype", "tip", "gda"], [k], [1], loaded, exports):
                    if r["head"] in METHODS and "metrics" in r:
                        acc[(name, r["head"], k)] = round(100 * r["metrics"]["acc1"], 2)
    _plot(acc, args.plot)
    table = ["| dataset | method | " + " | ".join(f"{k}-shot" for k in SHOTS) + " |",
             "| --- | --- |" + " --- |" * len(SHOTS)]
    for name in DATASETS:
        for method in METHODS:
            table.append(f"| {name} | {method} | " + " | ".join(f"{acc[(name, method, k)]:.2f}" for k in SHOTS) + " |")
    out = {"name": "test accuracy vs shots (%), OpenAI CLIP ViT-B/32 features, image-only",
           "accuracy": {f"{d}/{m}/{k}": v for (d, m, k), v in acc.items()}, "not_applicable": NOT_APPLICABLE,
           "table": "\n".join(table), "plot": args.plot, "command": "python -m bench.accuracy"}
    print(out["table"])
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


def _plot(acc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DATASETS), figsize=(12, 3.6))
    for ax, name in zip(axes, DATASETS):
        for method in METHODS:
            ax.plot(SHOTS, [acc[(name, method, k)] for k in SHOTS], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xticks(SHOTS, [str(k) for k in SHOTS])
        ax.set_title(name)
        ax.set_xlabel("shots per class")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test top-1 (%)")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
