"""``--plot kl.png``: a histogram of the per-position KL divergences.

Per-token KL spans many orders of magnitude (most positions near zero, a long tail that carries
the mean), so the bins are logarithmic and the mean and the 99th percentile are marked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlcompress.atomic import atomic_output
from mlcompress.errors import InputError

PLOT_EXTRA_HINT = "pip install 'mlcompress[plot]'"


def plot_kl_histogram(values: np.ndarray, path: str | Path, *, title: str = "", force: bool = False) -> Path:
    """Draw the histogram of ``values`` (nats) to ``path``; the format follows the suffix."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib", hint=PLOT_EXTRA_HINT) from None
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise InputError("nothing was scored, so there is no KL histogram to draw")
    positive = values[values > 0]
    fig, ax = plt.subplots(figsize=(7, 4))
    if positive.size:
        lo, hi = positive.min(), positive.max()
        bins = np.logspace(np.log10(lo), np.log10(hi) + 1e-9, 60) if hi > lo else 10
        ax.hist(positive, bins=bins, color="#4477aa")
        ax.set_xscale("log")
        for value, label, style in (
            (values.mean(), "mean", "-"),
            (np.percentile(values, 99), "99th percentile", "--"),
        ):
            if value > 0:
                ax.axvline(value, color="#cc3311", linestyle=style, label=f"{label} {value:.3g}")
        ax.legend()
    zeros = values.size - positive.size
    ax.set_xlabel("KL(ref ‖ cmp) per position [nats]" + (f"  ({zeros} exact zeros not shown)" if zeros else ""))
    ax.set_ylabel("positions")
    ax.set_title(title or f"per-position KL, {values.size:,} positions")
    fig.tight_layout()
    try:
        with atomic_output(path, force=force) as tmp:
            fig.savefig(tmp, format=fmt)
    except ValueError as exc:
        raise InputError(f"--plot {path}: {exc}", hint="use .png, .pdf or .svg") from None
    finally:
        plt.close(fig)
    return path
