"""Held-out metrics of a verifier: accuracy, BCE, Brier, ECE over 10 bins, AUROC from midranks,
pooled and within problems (definitions in :mod:`metarl_llm.verify.train`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from metarl_llm.verify.data import VerifierExamples, _batch, _pair
from metarl_llm.verify.model import Verifier

ECE_BINS = 10


def _probs(probs, labels, fn: str) -> tuple[np.ndarray, np.ndarray]:
    p, y = _pair(probs, labels, fn)
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError(f"{fn}: probabilities must lie in [0, 1], got [{p.min()}, {p.max()}]")
    return p, y


def brier(probs, labels) -> float:
    """Mean squared error of probabilities [n] against 0/1 labels [n]."""
    p, y = _probs(probs, labels, "brier")
    return float(np.mean((p - y) ** 2))


def expected_calibration_error(probs, labels, n_bins: int = ECE_BINS) -> float:
    """sum_b (n_b / n) |mean(y in b) - mean(p in b)| over ``n_bins`` equal-width bins of p;
    p goes to bin min(floor(n_bins p), n_bins - 1) (the last bin is closed); empty bins count 0."""
    p, y = _probs(probs, labels, "expected_calibration_error")
    if n_bins < 1:
        raise ValueError(f"expected_calibration_error: n_bins must be >= 1, got {n_bins}")
    b = np.minimum(np.floor(p * n_bins).astype(np.int64), n_bins - 1)
    gap = np.abs(np.bincount(b, weights=y, minlength=n_bins) - np.bincount(b, weights=p, minlength=n_bins))
    return float(gap.sum() / p.size)  # sum_b (n_b/n)|acc_b - conf_b| = sum_b |sum y - sum p|_b / n


def auroc(scores, labels) -> float:
    """Area under the ROC curve: P(s+ > s-) + 1/2 P(s+ = s-) over positive/negative pairs.

    From ranks (Mann-Whitney): with midranks r (tied scores share the mean of their
    ranks, which counts a tied pair as 1/2), AUROC = (sum_{y=1} r - n1(n1+1)/2) / (n1 n0).
    Any real scores (logits or probabilities). nan when one class is absent.
    """
    s, y = _pair(scores, labels, "auroc")
    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        return math.nan
    return float((midranks(s)[y == 1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def midranks(values) -> np.ndarray:
    """1-based ranks [n] of ``values`` [n], tied values sharing the mean of their ranks."""
    s = np.asarray(values, dtype=np.float64)
    order = np.argsort(s, kind="mergesort")
    ordered = s[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # first index of each run of equal values
    stops = np.r_[starts[1:], s.size]
    run = np.repeat(np.arange(starts.size), stops - starts)
    ranks = np.empty(s.size)
    ranks[order] = ((starts + 1 + stops) / 2.0)[run]  # 1-based ranks starts+1..stops, their mean
    return ranks


def within_problem_auroc(scores, labels, groups) -> tuple[float, int]:
    """Mean over problems of the AUROC among one problem's own trials, and the number of
    problems it averages (those with both a success and a failure; nan when none).

    ``scores``, ``labels`` [n] as :func:`auroc`; ``groups`` [n] the problem of each trial.
    Best-of-N ranks the trials of one problem against each other, so this, not the pooled
    :func:`auroc`, is the ranking it uses: a verifier that only tells easy problems from hard
    ones has a pooled AUROC above 0.5 and a within-problem AUROC of 0.5.
    """
    s, y = _pair(scores, labels, "within_problem_auroc")
    g = np.asarray(groups)
    if g.shape != s.shape:
        raise ValueError(f"within_problem_auroc: groups must have the shape of scores {s.shape}, got {g.shape}")
    values = [auroc(s[g == k], y[g == k]) for k in np.unique(g)]
    values = [v for v in values if not math.isnan(v)]
    return (float(np.mean(values)) if values else math.nan), len(values)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)) in float64 without overflow."""
    return np.exp(-np.logaddexp(0.0, -np.asarray(logits, dtype=np.float64)))


def verifier_metrics(logits, labels) -> dict[str, float]:
    """Held-out figures of logits [n] against 0/1 labels [n] (module docstring)."""
    z, y = _pair(logits, labels, "verifier_metrics")
    p = sigmoid(z)
    return {
        "accuracy": float(np.mean((z >= 0) == (y == 1))),
        "bce": float(np.mean(np.logaddexp(0.0, z) - y * z)),
        "brier": brier(p, y),
        "ece": expected_calibration_error(p, y),
        "auroc": auroc(z, y),
        "positive_rate": float(y.mean()),
        "predicted_positive_rate": float(np.mean(z >= 0)),
        "mean_prob": float(p.mean()),
        "count": float(y.size),
    }


@torch.no_grad()
def example_logits(verifier: Verifier, examples: VerifierExamples, rows: int = 32) -> np.ndarray:
    """Logits [M] of every example, ``rows`` streams per forward pass (one pass per stream)."""
    if rows < 1:
        raise ValueError(f"example_logits: rows must be >= 1, got {rows}")
    was_training = verifier.training
    verifier.eval()
    out = np.empty(len(examples), dtype=np.float64)
    order = np.argsort(examples.stream, kind="stable")
    sorted_stream = examples.stream[order]
    uniq = np.unique(sorted_stream)
    for s in range(0, len(uniq), rows):
        lo = np.searchsorted(sorted_stream, uniq[s], "left")
        hi = np.searchsorted(sorted_stream, uniq[min(s + rows, len(uniq)) - 1], "right")
        sel = order[lo:hi]
        ids, mask, r, c = _batch(examples.streams, examples.pad_id, examples.stream[sel], examples.position[sel], verifier.device)
        out[sel] = verifier.logits_at(ids, mask, r, c).cpu().numpy()
    verifier.train(was_training)
    return out


def evaluate_verifier(verifier: Verifier, examples: VerifierExamples, rows: int = 32) -> dict[str, float]:
    """:func:`verifier_metrics` over all examples, and prefixed ``end/`` and ``prefix/`` over
    each kind (a kind with no examples is left out)."""
    z = example_logits(verifier, examples, rows)
    metrics = verifier_metrics(z, examples.label)
    for kind, sel in (("end", examples.at_end), ("prefix", ~examples.at_end)):
        if sel.any() and not sel.all():
            metrics.update({f"{kind}/{k}": v for k, v in verifier_metrics(z[sel], examples.label[sel]).items()})
    return metrics
