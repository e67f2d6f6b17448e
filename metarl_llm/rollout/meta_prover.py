"""The meta-prover: J(prefix), the success a trial would have if forced to answer right after
that prefix (docs/design.md section 6). :func:`boundary_prefixes` gives the prefixes (after the
prompt, after each episode before the answer one, after any observation replying to it);
:func:`meta_prover_success` appends the forced-answer text, samples answers and scores them
with ``env.forced_outcome``. Used by the ``sample`` progress estimator, the held-out
success-vs-tokens curves and the verifier's prefix examples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from envs.base import EnvironmentFailure
from metarl_llm.core.trial import StreamCodec, Trial
from metarl_llm.rollout.base import Engine
from metarl_llm.rollout.cached import CachedEngine


@dataclass
class JOptions:
    """Settings shared by the estimators (each reads the ones it needs)."""

    num_samples: int = 4  # sample: meta-prover answers per boundary
    answer_max_tokens: int = 12  # sample: tokens per meta-prover answer
    generator: torch.Generator | None = None  # sample: RNG of the meta-prover answers' keys
    engine: Engine | None = None  # sample: the engine the answers are sampled on (None: a default cached engine)
    greedy: bool = False  # sample: the argmax answer instead of draws
    verifier: str = "episode_score"  # verifier: name in VERIFIERS
    rows: int = 32  # likelihood: trials per forward pass


def boundary_prefixes(trial: Trial) -> list[int]:
    """Stream lengths of the prefixes at which J is measured: after the prompt, then
    after each episode before the final-answer one.

    The boundary of episode j lies *after* the observation the environment inserted in
    reply to it (feedback such as ``[wrong]``), so that J_j already holds the
    information that reply carries and the progress it brings is credited to episode j,
    which earned it, not to episode j+1. The exception is an inserted forced-answer text:
    the meta-prover appends that itself, so the boundary stays before it.
    """
    prompt_len = trial.action.index(1) if 1 in trial.action else len(trial.ids)
    n = trial.answer_episode if trial.answer_episode >= 0 else len(trial.episode_ends)
    starts = episode_starts(trial)
    ends = [prompt_len]
    for j in range(n):
        forced_next = trial.forced and j + 1 == trial.answer_episode  # the observation is the forced-answer text
        ends.append(starts[j + 1] if j + 1 < len(starts) and not forced_next else trial.episode_ends[j] + 1)
    return ends


def episode_starts(trial: Trial) -> list[int]:
    """Stream position of each episode's first token (episodes are contiguous runs of action tokens)."""
    idx = np.flatnonzero(np.asarray(trial.action, dtype=bool))
    ep = np.asarray(trial.episode, dtype=np.int64)[idx]
    return idx[np.r_[True, ep[1:] != ep[:-1]]].tolist() if len(idx) else []


def episodes_before(trial: Trial, end: int) -> list[str]:
    """Texts of the trial's episodes that lie wholly inside the prefix ``trial.ids[:end]``."""
    return [text for text, last in zip(trial.episode_texts, trial.episode_ends) if last < end]


def meta_prover_context(codec: StreamCodec, trial: Trial, end: int) -> list[int]:
    """The stream up to ``end`` followed by the forced-answer tokens: what the meta-prover sees."""
    return trial.ids[:end] + codec.forced_prefix(trial.ids[:end])


def meta_prover_success(
    model: torch.nn.Module,
    codec: StreamCodec,
    trials: list[Trial],
    ends: list[list[int]],
    num_samples: int,
    answer_max_tokens: int,
    generator: torch.Generator | None = None,
    engine: Engine | None = None,
    greedy: bool = False,
) -> list[np.ndarray]:
    """J after the prefixes ``ends[i]`` (stream lengths) of trial i: the mean success of
    ``num_samples`` meta-prover answers of at most ``answer_max_tokens`` tokens, sampled on
    ``engine`` (the run's ``rollout`` engine; default: a ``cached`` engine with default
    settings) by :meth:`Engine.continue_prefixes` over the trials' own token ids. Each
    answer is scored as the trial would be if forced to answer there:
    ``forced_outcome(episodes so far, answer)`` of the trial's problem (where the outcome
    counts earlier episodes, as planted_subseq's does, an episode that already holds the
    gold makes J 1 whatever the answer). Returns one array [len(ends[i])] per trial.

    Each answer draws from its own key (drawn from ``generator``), so J does not depend on
    ``rollout.max_rows``, ``rollout.prefill_bucket_tokens`` or on whether the rollout kept
    each trial's KV cache (``run_trials(..., keep_cache=True)``: continued from it; else
    every prefix is re-encoded). ``greedy``: the argmax answer (every copy the same)."""
    engine = engine if engine is not None else CachedEngine()
    suffixes = [[codec.forced_prefix(t.ids[:end]) for end in prefix_ends] for t, prefix_ends in zip(trials, ends)]
    tokens, lengths, owners = engine.continue_prefixes(
        model, trials, ends, suffixes, num_samples, answer_max_tokens, codec.stop_ids, codec.pad_id, generator, greedy=greedy
    )
    sums = [np.zeros(len(prefix_ends)) for prefix_ends in ends]
    before = [[episodes_before(t, end) for end in prefix_ends] for t, prefix_ends in zip(trials, ends)]
    for row, (i, b) in enumerate(owners):
        text = codec.episode_text(tokens[row, : int(lengths[row])].tolist())
        try:
            sums[i][b] += trials[i].grader.forced_outcome(before[i][b], text)
        except Exception as e:  # noqa: BLE001 - a grader failure is loud, with the problem and the text
            raise EnvironmentFailure(trials[i].problem_id, text, b, e) from e
    return [x / num_samples for x in sums]
