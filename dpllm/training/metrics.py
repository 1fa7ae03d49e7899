"""Run logs, split by what they may reveal: one JSON object per line, and PNG plots.

``metrics.jsonl`` holds only what is safe to publish with the model: epsilon spent, the plan's
privacy parameters, statistics of the noised gradient (denoising), and evaluations on the eval
data. Everything else measured on the training data (training loss, realised batch sizes,
clipping and drop statistics, truncation counts, timings) is not differentially private and
goes to ``diagnostics/metrics.jsonl`` (or nowhere, with ``privacy.diagnostics_log: false``).
A key is publishable only if it is listed here: a new statistic is private until shown otherwise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

PUBLISHABLE = frozenset(
    {"step", "epsilon", "scores", "stopped", "denoised_fraction", "mean_kept_rank",
     "sample_rate", "planned_steps", "noise_multiplier", "delta", "planned_epsilon"}
)
PUBLIC_NOTE = (
    "Publishable: epsilon spent, the privacy plan, statistics of the noised gradient and evaluations on the eval data "
    "(assumed disjoint from the training data). Non-private training statistics are in diagnostics/metrics.jsonl."
)
DIAGNOSTICS_NOTE = (
    "NOT differentially private: statistics of the training data (loss, batch sizes, clipping, drops, truncations, "
    "timings). Keep this folder with the training data; never publish it or tune a private run on it."
)


def publishable(row: dict) -> dict:
    return {k: v for k, v in row.items() if k in PUBLISHABLE or k.startswith("eval_")}


def diagnostic(row: dict) -> dict:
    return {k: v for k, v in row.items() if k == "step" or k not in PUBLISHABLE and not k.startswith("eval_")}


def read_logs(output_dir: str | Path) -> list[dict]:
    """The rows of a run's publishable log, then those of its diagnostics log (if written)."""
    out, rows = Path(output_dir), []
    for path in (out / "metrics.jsonl", out / "diagnostics" / "metrics.jsonl"):
        if path.is_file():
            rows += [r for r in map(json.loads, path.read_text().splitlines()) if "about" not in r]
    return rows


class MetricsLog:
    """Rows in memory (for checkpoints) and on disk in the publishable and the diagnostics log."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, diagnostics: bool = True) -> None:
        out = Path(output_dir)
        self.path = out / "metrics.jsonl"
        self.diagnostics_path = out / "diagnostics" / "metrics.jsonl" if diagnostics else None
        self.enabled = enabled
        self.rows: list[dict] = []
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"about": PUBLIC_NOTE}) + "\n")
            if self.diagnostics_path is not None:
                self.diagnostics_path.parent.mkdir(parents=True, exist_ok=True)
                self.diagnostics_path.write_text(json.dumps({"about": DIAGNOSTICS_NOTE}) + "\n")

    def log(self, row: dict) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        for path, part in ((self.path, publishable(row)), (self.diagnostics_path, diagnostic(row))):
            if path is not None and set(part) - {"step"}:
                with open(path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(part) + "\n")

    def series(self, key: str, rows: list[dict] | None = None) -> tuple[list, list]:
        rows = self.rows if rows is None else rows
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return [p[0] for p in pts], [p[1] for p in pts]

    def public_rows(self) -> list[dict]:
        return [publishable(r) for r in self.rows]

    def plot(self, path: str | Path, public: bool = True) -> None:
        """Eval loss (and, for the diagnostics plot, training loss) and epsilon spent against steps."""
        plt = _pyplot()
        rows = self.public_rows() if public else self.rows
        fig, (ax_loss, ax_eps) = plt.subplots(1, 2, figsize=(10, 3.8))
        for key, style in (("loss", "-"), ("eval_loss", "o-")):
            xs, ys = self.series(key, rows)
            if xs:
                ax_loss.plot(xs, ys, style, label=key, markersize=4)
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("loss")
        ax_loss.legend()
        xs, ys = self.series("epsilon", rows)
        ax_eps.plot(xs, ys, color="tab:red")
        ax_eps.set_xlabel("step")
        ax_eps.set_ylabel("epsilon spent")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    def plot_denoising(self, path: str | Path, public: bool = True) -> bool:
        """Fraction of matrices denoised, mean kept rank and (diagnostics only) cosine gain; False if none logged."""
        rows = self.public_rows() if public else self.rows
        panels = [(k, label) for k, label in (
            ("denoised_fraction", "fraction of matrices denoised"),
            ("mean_kept_rank", "mean kept rank"),
            ("cos_gain", "cos gain vs clipped gradient (not private)"),
        ) if self.series(k, rows)[0]]
        if not panels:
            return False
        plt = _pyplot()
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
        for ax, (key, label) in zip(axes[0], panels):
            xs, ys = self.series(key, rows)
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
