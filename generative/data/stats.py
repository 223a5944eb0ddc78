"""Summary statistics and label histograms of a shipped prior file."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from crystaloop.generative.data.prior import LABEL_KEYS
from crystaloop.properties import PROPERTIES


def summarize(doc: dict) -> dict:
    """Counts per class and prototype, rejects by reason, and per-label statistics."""
    records = doc["records"]
    labelled = [r for r in records if not r.get("reject_reason")]
    stats: dict = {
        "count": len(records),
        "labelled": len(labelled),
        "converged": sum(1 for r in labelled if r["converged"]),
        "per_prototype": dict(Counter(r["prototype"] for r in labelled)),
        "rejects": dict(Counter(r["reject_reason"] for r in records if r.get("reject_reason"))),
        "mechanically_unstable": sum(1 for r in labelled if r.get("mechanically_stable") is False),
        "labels": {},
    }
    for key in LABEL_KEYS:
        values = np.array(
            [r["labels"][key] for r in labelled if r["labels"].get(key) is not None], dtype=float
        )
        if values.size:
            q = np.percentile(values, [5, 50, 95])
            stats["labels"][key] = {
                "n": int(values.size),
                "mean": float(values.mean()),
                "std": float(values.std()),
                "min": float(values.min()),
                "p5": float(q[0]),
                "median": float(q[1]),
                "p95": float(q[2]),
                "max": float(values.max()),
            }
    residuals = np.array([r["eos_residual"] for r in labelled if r.get("eos_residual") is not None])
    if residuals.size:
        stats["eos_residual_median"] = float(np.median(residuals))
        stats["eos_residual_p95"] = float(np.percentile(residuals, 95))
    return stats


def plot_histograms(doc: dict, out_dir: Path) -> list[Path]:
    """One PNG per label (``data_<label>.png``), split by material class; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from crystaloop.generative.data.prototypes import MATERIAL_CLASS

    out_dir.mkdir(parents=True, exist_ok=True)
    labelled = [r for r in doc["records"] if not r.get("reject_reason")]
    paths = []
    for key in LABEL_KEYS:
        fig, ax = plt.subplots(figsize=(5, 3.4), dpi=110)
        by_class: dict[str, list[float]] = {}
        for r in labelled:
            value = r["labels"].get(key)
            if value is not None:
                by_class.setdefault(MATERIAL_CLASS[r["prototype"]], []).append(value)
        if not by_class:
            plt.close(fig)
            continue
        all_values = np.concatenate([np.asarray(v) for v in by_class.values()])
        lo, hi = np.percentile(all_values, [0.5, 99.5])
        bins = np.linspace(lo, hi, 60)
        for cls, values in sorted(by_class.items()):
            ax.hist(np.clip(values, lo, hi), bins=bins, histtype="step", label=f"{cls} ({len(values)})")
        ax.set_xlabel(PROPERTIES[key].label)
        ax.set_ylabel("structures")
        ax.set_title(f"{doc['dataset']}: {key}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"data_{key}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
