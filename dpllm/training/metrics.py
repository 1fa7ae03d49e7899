"""Run logs: one JSON object per line in metrics.jsonl, and PNG plots a person can look at."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
    def __init__(self, output_dir: str | Path, enabled: bool = True) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.rows: list[dict] = []
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def log(self, row: dict) -> None:
        self.rows.append(row)
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def series(self, key: str) -> tuple[list, list]:
        pts = [(r["step"], r[key]) for r in self.rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return [p[0] for p in pts], [p[1] for p in pts]

    def plot(self, path: str | Path) -> None:
        """Training and eval loss, and epsilon spent, against steps."""
        plt = _pyplot()
        series = self.series

        fig, (ax_loss, ax_eps) = plt.subplots(1, 2, figsize=(10, 3.8))
        for key, style in (("loss", "-"), ("eval_loss", "o-")):
            xs, ys = series(key)
            if xs:
                ax_loss.plot(xs, ys, style, label=key, markersize=4)
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("loss")
        ax_loss.legend()
        xs, ys = series("epsilon")
        ax_eps.plot(xs, ys, color="tab:red")
        ax_eps.set_xlabel("step")
        ax_eps.set_ylabel("epsilon spent")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    def plot_denoising(self, path: str | Path) -> bool:
        """Fraction of matrices denoised, mean kept rank and (diagnostics only) cosine gain; False if none logged."""
        panels = [(k, label) for k, label in (
            ("denoised_fraction", "fraction of matrices denoised"),
            ("mean_kept_rank", "mean kept rank"),
            ("cos_gain", "cos gain vs clipped gradient (not private)"),
        ) if self.series(k)[0]]
        if not panels:
            return False
        plt = _pyplot()
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
        for ax, (key, label) in zip(axes[0], panels):
            xs, ys = self.series(key)
            ax.plot(xs, ys, ".-", markersize=3)
            if key == "cos_gain":
                ax.axhline(0, color="grey", linewidth=0.8)
            ax.set_xlabel("step")
            ax.set_ylabel(label)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return True


    def plot_scores(self, path: str | Path) -> bool:
        """Each generation metric (BLEU, ROUGE-L, ...) against steps; False if none was logged."""
        rows = [r for r in self.rows if isinstance(r.get("scores"), dict)]
        if not rows:
            return False
        names = sorted({k for r in rows for k in r["scores"]})
        plt = _pyplot()
        fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False)
        for ax, name in zip(axes[0], names):
            pts = [(r["step"], r["scores"][name]) for r in rows if r["scores"].get(name) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", markersize=4)
            ax.set_xlabel("step")
            ax.set_title(name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
