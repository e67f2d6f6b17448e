"""Scoring with a trained verifier: P(success) of whole trials and at every boundary prefix,
and the ``verifier`` estimator of J (``bonus.verifier=/path/to/verifier``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from metarl_llm.core.trial import StreamCodec, Trial
from metarl_llm.rollout.meta_prover import JOptions, boundary_prefixes
from metarl_llm.verify.calibration import example_logits, sigmoid
from metarl_llm.verify.data import VerifierExamples
from metarl_llm.verify.model import HEAD_FILE, VERIFIER_FILE, Verifier, check_same_vocabulary, is_saved_verifier, load_verifier

# ----------------------------------------------------------------------- scoring


@torch.no_grad()
def _score_reads(verifier: Verifier, trials: Sequence[Trial], reads: list[list[int]], rows: int) -> list[np.ndarray]:
    """P(success) at the stream positions ``reads[i]`` of each trial, ``rows`` trials per forward pass."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    stream = np.repeat(np.arange(len(trials)), [len(r) for r in reads])
    position = np.array([p for r in reads for p in r], dtype=np.int64)
    examples = VerifierExamples(
        [t.ids for t in trials], stream, position, np.zeros(len(stream), np.float32), np.zeros(len(stream), bool), verifier.pad_id
    )
    probs = sigmoid(example_logits(verifier, examples, rows))
    return list(np.split(probs, np.cumsum([len(r) for r in reads])[:-1]))


def _check_trials(trials: Sequence[Trial], fn: str) -> None:
    if len(trials) == 0:
        raise ValueError(f"{fn}: no trials")
    for i, t in enumerate(trials):
        if not t.ids:
            raise ValueError(f"{fn}: trial {i} (problem {t.problem_id}) has no tokens")


def score_trials(verifier: Verifier, trials: Sequence[Trial], rows: int = 32) -> np.ndarray:
    """P(success) [N] of each whole trial, read at its last token (the outcome-model score)."""
    _check_trials(trials, "score_trials")
    return np.concatenate(_score_reads(verifier, trials, [[len(t.ids) - 1] for t in trials], rows))


def score_prefixes(verifier: Verifier, trials: Sequence[Trial], rows: int = 32) -> list[np.ndarray]:
    """P(success) at every boundary of every trial (``bonus.boundary_prefixes`` order): one
    array [m_i] per trial. All boundaries of a trial come from one forward pass of its
    stream, read at each boundary's last token (valid because the trunk is causal)."""
    _check_trials(trials, "score_prefixes")
    reads = []
    for i, t in enumerate(trials):
        ends = boundary_prefixes(t)
        if ends[0] < 1:
            raise ValueError(f"score_prefixes: trial {i} (problem {t.problem_id}) has an empty prompt")
        reads.append([e - 1 for e in ends])
    return _score_reads(verifier, trials, reads, rows)


@functools.lru_cache(maxsize=2)
def _cached_verifier(path: str, device: str, mtime: float) -> Verifier:
    return load_verifier(path, device)


def trained_verifier_estimator(model: nn.Module, codec: StreamCodec, trials: list[Trial], opts: JOptions) -> list[np.ndarray]:
    """The ``verifier`` estimator of J with a trained verifier (``Estimator`` signature of
    :mod:`metarl_llm.rl.bonus`): ``opts.verifier`` is the directory of a saved verifier,
    loaded once (cached per path, device and file time) onto the policy's device;
    ``opts.rows`` trials per forward pass. The policy itself is not run.

    The values estimate V^pi of the policy that sampled the verifier's training data
    (module docstring), not the meta-prover's J.
    """
    path = Path(opts.verifier).expanduser()
    if not is_saved_verifier(path):
        raise FileNotFoundError(
            f"bonus.verifier={opts.verifier!r} is not a saved verifier directory ({path / VERIFIER_FILE} not found)"
        )
    device = next(model.parameters()).device
    verifier = _cached_verifier(str(path.resolve()), str(device), (path / HEAD_FILE).stat().st_mtime)
    check_same_vocabulary(verifier.tokenizer, codec.tokenizer)
    return score_prefixes(verifier, trials, rows=opts.rows)
