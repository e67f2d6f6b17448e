"""Verifier-based selection at test time: best-of-N (the trial with the highest verifier score
among N sampled trials) beside maj@N and pass@N.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from metarl_llm.config import BudgetConfig
from metarl_llm.core.trial import StreamCodec, Trial
from metarl_llm.core.voting import majority_index
from metarl_llm.rollout.engine import run_trials
from metarl_llm.runtime.plotting import pyplot

# -------------------------------------------------------------------- best-of-N


def best_of_n(
    scores,
    outcomes,
    n_values: Sequence[int],
    answers=None,
    answer_scores=None,
    tokens=None,
) -> dict[str, list]:
    """Best-of-N, maj@N and pass@N over the first N trials of each problem.

    ``scores``, ``outcomes`` [P, N_max]: the verifier score and the outcome of trial n of
    problem p (trials in sampling order); ``scores`` None: no verifier, so no
    ``best_of_n`` and no ``pick_answer_share`` (the verifier-free curves). For each N in ``n_values`` (1 <= N <= N_max),
    over trials 0..N-1 of every problem, averaged over problems:

    - ``best_of_n``: outcome of the trial with the highest score (ties: the first);
    - ``pass_at_n``: the best outcome (the share of problems solved for 0/1 outcomes,
      as evaluate's pass@k); an oracle verifier reaches it, so pass_at_n >= best_of_n;
    - ``mean_outcome``: mean outcome (the success of one trial picked at random);
    - ``maj_at_n`` (with ``answers`` [P, N_max] of str/None): the most frequent
      answer (whitespace-stripped; ties: the first seen; None and "" do not vote) scores
      ``answer_scores`` of the first trial that gave it (default: its outcome; pass
      env.score(answer) to match evaluate's maj@k); no vote scores 0;
    - ``pick_answer_share`` (with ``answers``): the share of the N trials that gave the
      answer of the trial best-of-N picked (whitespace-stripped; no answer counts as ""),
      and ``answer_share``: the same for a trial picked at random (the mean share). A pick
      well below the random share means the verifier's highest scores go to atypical
      answers (metarl_llm.verify.train, "within problems");
    - ``tokens`` (with ``tokens`` [P, N_max]): total policy tokens of the N trials.

    Returns JSON-ready lists aligned with ``n``.
    """
    o = np.asarray(outcomes, dtype=np.float64)
    picks = scores is not None  # a verifier picks one trial per problem
    s = np.asarray(scores, dtype=np.float64) if picks else np.zeros_like(o)
    if s.ndim != 2 or s.shape != o.shape or s.size == 0:
        raise ValueError(
            f"best_of_n: scores and outcomes must be non-empty [P, N] arrays of one shape, got {s.shape} and {o.shape}"
        )
    if not (np.isfinite(s).all() and np.isfinite(o).all()):
        raise ValueError("best_of_n: scores and outcomes must be finite")
    n_max = s.shape[1]
    ns = list(n_values)
    if not ns or any(isinstance(n, bool) or int(n) != n or not 1 <= n <= n_max for n in ns):
        raise ValueError(f"best_of_n: n_values must be integers in [1, {n_max}], got {ns}")
    extra = {}
    for name, a in (("answers", answers), ("answer_scores", answer_scores), ("tokens", tokens)):
        if a is not None:
            extra[name] = np.asarray(a, dtype=object if name == "answers" else np.float64)
            if extra[name].shape != s.shape:
                raise ValueError(f"best_of_n: {name} must have the shape of scores {s.shape}, got {extra[name].shape}")
    rows = np.arange(s.shape[0])
    out: dict[str, list] = {
        "n": [int(n) for n in ns],
        **({"best_of_n": []} if picks else {}),
        "pass_at_n": [],
        "mean_outcome": [],
    }
    if answers is not None:
        out["maj_at_n"] = []
        out |= {"pick_answer_share": [], "answer_share": []} if picks else {"answer_share": []}
        keys = np.vectorize(lambda a: (a or "").strip(), otypes=[object])(extra["answers"])
    if tokens is not None:
        out["tokens"] = []
    vote_scores = extra.get("answer_scores", o)
    for n in out["n"]:
        pick = np.argmax(s[:, :n], axis=1)  # argmax keeps the first of ties
        if picks:
            out["best_of_n"].append(float(o[rows, pick].mean()))
        out["pass_at_n"].append(float(o[:, :n].max(1).mean()))
        out["mean_outcome"].append(float(o[:, :n].mean()))
        if answers is not None:
            out["maj_at_n"].append(float(np.mean([_majority_score(extra["answers"][p, :n], vote_scores[p, :n]) for p in rows])))
            same = keys[:, :n, None] == keys[:, None, :n]  # [P, n, n]: trials i and j gave one answer
            share = same.mean(axis=2)  # [P, n]
            if picks:
                out["pick_answer_share"].append(float(share[rows, pick].mean()))
            out["answer_share"].append(float(share.mean()))
        if tokens is not None:
            out["tokens"].append(float(extra["tokens"][:, :n].sum(1).mean()))
    return out


def _majority_score(answers: np.ndarray, scores: np.ndarray) -> float:
    """The score of the majority answer among ``answers`` (0 when none was given)."""
    i = majority_index(list(answers))
    return 0.0 if i is None else float(scores[i])


def answer_scores_of(trials: Sequence[Trial]) -> np.ndarray:
    """score(answer) [N] of each trial's stripped answer (0 without one) by the trial's
    problem grader (once per distinct answer of a problem)."""
    cache: dict[tuple[int, str], float] = {}
    out = np.zeros(len(trials))
    for i, t in enumerate(trials):
        answer = (t.answer or "").strip()
        if not answer:
            continue
        if t.grader is None:
            raise ValueError(f"answer_scores_of: trial {i} (problem {t.problem_id}) has no grader to score its answer")
        key = (t.group, answer)
        if key not in cache:
            cache[key] = float(t.grader.score(answer))
        out[i] = cache[key]
    return out


def best_of_n_trials(scores, trials: Sequence[Trial], n_values: Sequence[int], answer_scores=None) -> dict[str, list]:
    """:func:`best_of_n` over trials: ``scores`` [len(trials)] (e.g. :func:`score_trials`; None:
    no verifier, the verifier-free curves), trials grouped by ``group`` (first-seen order), each group the same size N_max, its
    trials in list order. maj@N votes with ``answer_scores`` [len(trials)] (default
    :func:`answer_scores_of`, env.score of each answer, as evaluate's maj@k)."""
    if len(trials) == 0:
        raise ValueError("best_of_n_trials: no trials")
    s = None if scores is None else np.asarray(scores, dtype=np.float64)
    if s is not None and s.shape != (len(trials),):
        raise ValueError(f"best_of_n_trials: scores must have shape ({len(trials)},), got {s.shape}")
    a = answer_scores_of(trials) if answer_scores is None else np.asarray(answer_scores, dtype=np.float64)
    if a.shape != (len(trials),):
        raise ValueError(f"best_of_n_trials: answer_scores must have shape ({len(trials)},), got {a.shape}")
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(trials):
        groups.setdefault(t.group, []).append(i)
    sizes = {len(g) for g in groups.values()}
    if len(sizes) != 1:
        raise ValueError(f"best_of_n_trials: every problem needs the same number of trials, got sizes {sorted(sizes)}")
    idx = np.array(list(groups.values()))  # [P, N_max]
    answers = np.empty(idx.shape, dtype=object)
    answers[...] = [[trials[i].answer for i in g] for g in idx]
    outcomes = np.array([[trials[i].outcome for i in g] for g in idx])
    tokens = np.array([[trials[i].policy_tokens for i in g] for g in idx])
    return best_of_n(None if s is None else s[idx], outcomes, n_values, answers=answers, answer_scores=a[idx], tokens=tokens)


def plot_best_of_n(result: dict[str, list], path: str | Path, title: str = "") -> None:
    """Best-of-N, maj@N, pass@N and mean outcome against N (log2) and against total tokens. PNG at ``path``."""

    plt = pyplot()
    fig, axes = plt.subplots(1, 2 if "tokens" in result else 1, figsize=(10 if "tokens" in result else 5.5, 3.8), squeeze=False)
    curves = [
        ("best_of_n", "best-of-N (verifier)"),
        ("maj_at_n", "maj@N"),
        ("pass_at_n", "pass@N"),
        ("mean_outcome", "mean outcome"),
    ]
    for ax, xkey, xlabel in zip(axes[0], ("n", "tokens"), ("N (trials per problem)", "policy tokens per problem")):
        for key, label in curves:
            if key in result:
                ax.plot(result[xkey], result[key], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------- entry point


def play_trials(
    policy: nn.Module,
    codec: StreamCodec,
    make_env: Callable[[str], object],
    split: str,
    resets: list[dict],
    groups: list[int],
    budget: BudgetConfig,
    generator: torch.Generator,
    rows: int,
) -> tuple[list[Trial], np.ndarray]:
    """:func:`rollout.run_trials` in rounds of ``rows`` trials over a pool of ``rows``
    environments of ``split`` (reset to the next round's problems; each trial keeps its own
    problem's grader). Returns the trials and :func:`answer_scores_of` them."""
    envs = [make_env(split) for _ in range(min(rows, len(resets)))]
    trials, scores = [], []
    for s in range(0, len(resets), rows):
        batch = run_trials(
            policy, codec, envs[: len(resets[s : s + rows])], resets[s : s + rows], groups[s : s + rows], budget, generator
        )
        scores.append(answer_scores_of(batch))
        trials += batch
    return trials, np.concatenate(scores)
