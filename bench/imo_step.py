"""IMO training step: the Lightning module vs a minimal plain-PyTorch loop, same process.

Both run the same forward/backward (adapters in every block of a frozen ViT, linear head,
cross-entropy, AdamW) on the same in-memory random batch, so the ratio measures what the framework
adds per step (Lightning loop, logging, hooks), not data loading. ViT-B-32 with random weights at
batch 16 by default on CPU; on a GPU pass ``--model ViT-B-16 --batch_size 128 --precision bf16-mixed``
and the script also prints images/s and peak GPU memory.

    python -m bench.imo_step [--model ViT-B-32] [--batch_size 16] [--steps 6]
"""
from __future__ import annotations

import argparse
import time
import warnings

import lightning as L
import torch
import torch.nn.functional as F

from adapters.imo import IMOAdapter
from bench import report


class StepTimer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.end = time.perf_counter()


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=6, help="timed steps (after one warm-up step)")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = 224
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, size, size, generator=g)
    labels = torch.randint(0, 100, (args.batch_size,), generator=g)
    batches = [{"image": images, "label": labels}] * (args.steps + 1)

    def build() -> IMOAdapter:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            L.seed_everything(0, verbose=False)
            return IMOAdapter(num_classes=100, backbone=args.model, pretrained=None)

    # plain PyTorch: the same module's forward pieces, a hand-written loop
    model = build().to(device)
    _ = model.encoder  # attach the adapter hooks
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=8e-3)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.precision.startswith("bf16"))
    for i, batch in enumerate(batches):
        if i == 1:
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
        with autocast:
            loss = F.cross_entropy(model.classifier(model.encode(batch["image"].to(device), normalize=False)),
                                   batch["label"].to(device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    plain_ips = args.steps * args.batch_size / (time.perf_counter() - start)
    memory = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None

    # Lightning: the module's own training_step in the Trainer's loop
    timer = StepTimer(warmup=1)
    trainer = L.Trainer(max_steps=len(batches), accelerator=device, devices=1, precision=args.precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer], num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(build(), train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    lightning_ips = args.steps * args.batch_size / (timer.end - timer.start)
    out = {"name": f"IMO training step, {args.model}, batch {args.batch_size}, {args.precision}, {device}",
           "lightning_images_per_s": round(lightning_ips, 2), "plain_pytorch_images_per_s": round(plain_ips, 2),
           "ratio": round(lightning_ips / plain_ips, 3), "command": "python -m bench.imo_step"}
    if memory is not None:
        out["peak_gpu_memory_gib_plain"] = round(memory, 2)
    return report(out, args.json)


if __name__ == "__main__":
    main()
