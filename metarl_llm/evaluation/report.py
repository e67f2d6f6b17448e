"""Plots of held-out evaluations: success-vs-tokens curves, and success against the budget scale."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from metarl_llm.evaluation.curves import (
    cumulative_regret,
)
from metarl_llm.runtime.plotting import pyplot, save_plot

if TYPE_CHECKING:  # annotations only (heldout imports this module)
    from metarl_llm.evaluation.heldout import EvalResult

log = logging.getLogger(__name__)


def plot_success_curves(curves: dict[str, np.ndarray], path: Path, title: str = "") -> None:
    """Step plot of S(t) against policy tokens, one line per label; ``curves`` label ->
    S [C+1] (each on its own grid). Writes a PNG at ``path``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, s in curves.items():
        ax.step(np.arange(len(s)), s, where="post", label=f"{label} (S(C) {s[-1]:.2f}, regret {cumulative_regret(s):.2f})")
    ax.set_xlabel("policy tokens spent t")
    ax.set_ylabel("held-out success S(t)")
    save_plot(plt, fig, ax, path, title)


def plot_budget_extrapolation(results: dict[str, EvalResult], k: int, path: Path, title: str = "") -> None:
    """Success, pass@k, maj@k and regret against the budget scale (log2 axis). PNG at ``path``."""
    plt = pyplot()
    scales = [float(label) for label in results]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for key, name in (("success", "success"), (f"pass@{k}", f"pass@{k}"), (f"maj@{k}", f"maj@{k}"), ("regret", "regret")):
        ax.plot(scales, [r.metrics[key] for r in results.values()], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(scales, [f"{s:g}x" for s in scales])
    ax.set_xlabel("budget (x training budget)")
    save_plot(plt, fig, ax, path, title)


def plot_adaptation(figures: dict[str, dict], path: Path, title: str = "") -> None:
    """Held-out success against k (log2 axis), per label of ``figures`` (label ->
    :func:`metarl_llm.evaluation.adaptation.evaluate_adaptation`'s dict): one trial with k
    episodes (solid, 95% intervals), pass@k (dashed) and maj@k (dotted) of k one-episode trials."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for n, (label, f) in enumerate(figures.items()):
        ks = [int(k) for k in f["sequential_success"]]
        color = f"C{n}"
        ax.errorbar(ks, list(f["sequential_success"].values()), yerr=list(f["sequential_ci95"].values()), color=color,
                    marker="o", capsize=3, label=f"{label}: 1 trial, k episodes")  # fmt: skip
        ax.plot(
            ks, list(f["parallel_pass"].values()), color=color, ls="--", marker="^", label=f"{label}: pass@k, 1-episode trials"
        )
        ax.plot(ks, list(f["parallel_maj"].values()), color=color, ls=":", marker="s", label=f"{label}: maj@k, 1-episode trials")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k (episodes of one trial, or one-episode trials), equal tokens")
    ax.set_ylabel("held-out success")
    save_plot(plt, fig, ax, path, title)
