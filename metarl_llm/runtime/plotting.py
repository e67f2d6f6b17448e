"""matplotlib on the file-only Agg backend, and the common finish of a [0, 1]-valued plot."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

# ----------------------------------------------------------------- plots, report


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib  # deferred: start-up cost (matplotlib loads only to draw a plot)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: start-up cost (matplotlib loads only to draw a plot)

    return plt


def save_plot(plt, fig, ax, path: Path, title: str = "") -> None:
    """The common finish of a [0, 1]-valued plot: y range, title, legend, grid; PNG at ``path``."""
    ax.set_ylim(-0.02, 1.02)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
