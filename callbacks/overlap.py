"""Intra-modal overlap during validation, with a plot of the similarity histograms.

The overlap (IMO) is the intersection area of the same-class and different-class cosine-similarity
histograms of labelled image embeddings (`adapters.metrics.intra_modal_overlap`; defaults as in
../shared/data/README.md: 200 bins on [-1, 1], all pairs). `OverlapMonitor` collects the original and
adapted embeddings that every `AdapterModule` returns from ``validation_step``, logs
``val/overlap_original`` and ``val/overlap_adapted`` at the end of each validation, and saves
``overlap.png`` (latest) and ``overlap-epoch{NNN}.png`` in the run directory. Under DDP each rank
measures its own share of the validation set and the logged value is their mean.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from adapters.atomic import atomic_path
from adapters.metrics import intra_modal_overlap


def save_overlap_plot(curves: dict[str, tuple[torch.Tensor, torch.Tensor, float]], path: str | Path,
                      value_range: tuple[float, float] = (-1.0, 1.0), title: str = "") -> Path:
    """Plot same-class (solid) and different-class (dashed) similarity histograms of each curve
    (``name -> (same, different, overlap)``) into a PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, (same, diff, overlap)), colour in zip(curves.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        bins = len(same)
        centres = torch.linspace(value_range[0], value_range[1], bins + 1)[:-1] + (value_range[1] - value_range[0]) / (2 * bins)
        shown = "undefined" if overlap is None else f"{overlap:.3f}"
        ax.plot(centres, same, color=colour, label=f"{name}: same class (overlap {shown})")
        ax.plot(centres, diff, color=colour, linestyle="--", label=f"{name}: different class")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("fraction of pairs")
    ax.set_title(title or "intra-modal overlap")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


class OverlapMonitor(L.Callback):
    """Log the intra-modal overlap of original and adapted validation embeddings and plot it.

    Args:
        bins: histogram bins.
        value_range: histogram range of cosine similarities.
        max_pairs: sample this many random pairs instead of all (None: all pairs).
        plot: save the PNGs.
        dirpath: where the PNGs go (default: the trainer's run directory).
    """

    def __init__(self, bins: int = 200, value_range: tuple[float, float] = (-1.0, 1.0), max_pairs: int | None = None,
                 plot: bool = True, dirpath: str | None = None):
        self.bins, self.value_range, self.max_pairs, self.plot, self.dirpath = bins, tuple(value_range), max_pairs, plot, dirpath
        self._outputs: dict[str, list[torch.Tensor]] = {}

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._outputs = {"original": [], "adapted": [], "label": []}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if isinstance(outputs, dict) and {"original", "adapted", "label"} <= set(outputs):
            for key in self._outputs:
                self._outputs[key].append(outputs[key].detach().float().cpu())

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not self._outputs.get("label"):
            return
        labels = torch.cat(self._outputs["label"])
        curves = {}
        for name in ("original", "adapted"):
            overlap, same, diff = intra_modal_overlap(torch.cat(self._outputs[name]), labels, self.bins,
                                                      self.value_range, self.max_pairs)
            curves[name] = (same, diff, overlap)
            # undefined overlap (no same-class pair in this rank's share) is logged as NaN, never as 0
            pl_module.log(f"val/overlap_{name}", float("nan") if overlap is None else overlap, sync_dist=True)
        if self.plot and trainer.is_global_zero:
            directory = Path(self.dirpath or trainer.default_root_dir)
            title = f"{getattr(pl_module, 'method', '')} epoch {trainer.current_epoch}"
            save_overlap_plot(curves, directory / f"overlap-epoch{trainer.current_epoch:03d}.png", self.value_range, title)
            save_overlap_plot(curves, directory / "overlap.png", self.value_range, title)
        self._outputs = {}
