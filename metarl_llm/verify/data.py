"""Verifier examples and labels: an end example per trial and one per boundary prefix, each
with the trial's label (outcome >= 1.0). See :mod:`metarl_llm.verify.train` for what the
scores then estimate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from metarl_llm.core.batch import pad_rows
from metarl_llm.core.trial import StreamCodec, Trial
from metarl_llm.rollout.meta_prover import boundary_prefixes

# -------------------------------------------------------------------------- data


@dataclass(frozen=True)
class VerifierExamples:
    """M labelled read positions over S token streams (``len()`` is M).

    streams:  S lists of token ids, the trials' own ``ids`` (shared, not copied).
    stream:   [M] int64, the stream of each example.
    position: [M] int64, the stream position read: the last token of the prefix.
    label:    [M] float32, 1.0 if the trial's outcome >= 1.0 else 0.0.
    at_end:   [M] bool, True for the whole-trial example, False for a boundary prefix.
    pad_id:   id that pads batches (never read).
    group:    [M] int64, the problem of each example's trial (``Trial.group``); None when
              unknown (scoring), which the within-problem ranking loss cannot use.
    """

    streams: list[list[int]]
    stream: np.ndarray
    position: np.ndarray
    label: np.ndarray
    at_end: np.ndarray
    pad_id: int
    group: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.stream)


def trial_label(trial: Trial) -> float:
    """1.0 if the trial succeeded (outcome >= 1.0), else 0.0 (partial credit is a failure)."""
    return float(trial.outcome >= SUCCESS_THRESHOLD)


def verifier_examples(trials: Sequence[Trial], codec: StreamCodec, prefixes: bool) -> VerifierExamples:
    """Examples from trials, token in: the trials' own ids, never re-tokenised.

    Per trial, in this order: with ``prefixes``, one example per boundary of
    ``bonus.boundary_prefixes`` (read at position end-1, the prefix's last token), then
    one end example (read at the stream's last token). All carry :func:`trial_label`.
    A prefix label is one Monte-Carlo sample of the *sampling policy's* eventual success
    from that prefix (module docstring): a verifier trained on it estimates V^pi, a
    J-like value under the sampling policy, not the meta-prover's J.
    ``codec`` is the policy's: its pad id pads batches.
    """
    if len(trials) == 0:
        raise ValueError("verifier_examples: no trials")
    streams, stream, position, label, at_end, group = [], [], [], [], [], []
    for i, t in enumerate(trials):
        if not t.ids:
            raise ValueError(f"verifier_examples: trial {i} (problem {t.problem_id}) has no tokens")
        if t.answer_episode < 0:
            raise ValueError(
                f"verifier_examples: trial {i} (problem {t.problem_id}) has no final answer (answer_episode=-1), so its outcome is no label"
            )
        ends = boundary_prefixes(t) if prefixes else []
        if ends and ends[0] < 1:
            raise ValueError(
                f"verifier_examples: trial {i} (problem {t.problem_id}) has an empty prompt: no token to read J after the prompt at"
            )
        reads = [e - 1 for e in ends] + [len(t.ids) - 1]
        streams.append(t.ids)
        stream += [i] * len(reads)
        position += reads
        label += [trial_label(t)] * len(reads)
        at_end += [False] * len(ends) + [True]
        group += [t.group] * len(reads)
    return VerifierExamples(
        streams,
        np.array(stream, dtype=np.int64),
        np.array(position, dtype=np.int64),
        np.array(label, dtype=np.float32),
        np.array(at_end, dtype=bool),
        int(codec.pad_id),
        np.array(group, dtype=np.int64),
    )


def ranking_pairs(examples: VerifierExamples) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The whole-trial examples of every problem with a success and a failure: (successes,
    failures), one index array [k] each per such problem, problems in order of their id.
    Raises when the examples carry no problems or no problem has both."""
    if examples.group is None:
        raise ValueError("ranking_pairs: the examples carry no problem ids (build them with verifier_examples)")
    pos, neg = [], []
    end = np.flatnonzero(examples.at_end)
    for g in np.unique(examples.group[end]):
        mine = end[examples.group[end] == g]
        p, n = mine[examples.label[mine] == 1.0], mine[examples.label[mine] == 0.0]
        if len(p) and len(n):
            pos.append(p)
            neg.append(n)
    if not pos:
        raise ValueError(
            "ranking_pairs: no training problem has both a successful and a failed trial; "
            "raise verifier.samples_per_problem or set verifier.pair_weight=0"
        )
    return pos, neg


def _batch(streams: Sequence[list[int]], pad_id: int, stream: np.ndarray, position: np.ndarray, device) -> tuple:
    """One right-padded row per distinct stream, cut after its last read position.

    Returns input_ids [R, L], attention_mask [R, L], and the (row, col) [M] of each read.
    """
    uniq, row = np.unique(stream, return_inverse=True)
    lengths = np.zeros(len(uniq), dtype=np.int64)
    np.maximum.at(lengths, row, position + 1)
    width = int(lengths.max())
    ids, mask = pad_rows([streams[s][:n] for s, n in zip(uniq, lengths)], pad_id, width=width)
    return ids.to(device), mask.to(device), torch.as_tensor(row, device=device), torch.as_tensor(position, device=device)


# ----------------------------------------------------------------------- metrics


def _pair(probs, labels, fn: str) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if p.ndim != 1 or p.shape != y.shape:
        raise ValueError(f"{fn}: scores and labels must be 1-D of one length, got shapes {p.shape} and {y.shape}")
    if p.size == 0:
        raise ValueError(f"{fn}: no examples")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"{fn}: labels must be 0 or 1")
    if not np.isfinite(p).all():
        raise ValueError(f"{fn}: scores hold non-finite entries")
    return p, y


SUCCESS_THRESHOLD = 1.0  # label = outcome >= this
