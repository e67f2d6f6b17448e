"""Training records from episodes: :func:`trace_record` replays a trace through its environment
(observations inserted exactly as in a rollout); STaR records and stitched search traces
(failed attempts of a problem, then a correct answer) for the verifier-free baselines.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from metarl_llm.config import BudgetConfig
from metarl_llm.core.trial import StreamCodec, Trial

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ VF data


def star_records(trials: list[Trial]) -> list[dict]:
    """The successful trials (outcome >= 1) as records: their own token streams, the
    loss on the tokens the policy sampled (``trial.action``)."""
    return [{"input_ids": list(t.ids), "completion_mask": list(t.action)} for t in trials if t.outcome >= 1.0]


def failed_attempts(trials: list[Trial]) -> list[str]:
    """Intermediate episodes (before the answer episode) not marked correct, in order."""
    return [text for t in trials for j, text in enumerate(t.episode_texts) if j != t.answer_episode and not t.episode_correct[j]]


def winning_tail(trial: Trial) -> list[str]:
    """The episodes of a successful trial from its first episode marked correct through
    its answer episode (just the answer episode when no earlier one was correct): the
    correct attempt of a stitched trace."""
    first = next((j for j, c in enumerate(trial.episode_correct) if c), trial.answer_episode)
    return list(trial.episode_texts[min(first, trial.answer_episode) : trial.answer_episode + 1])


def stitched_records(
    trials: list[Trial],
    make_env: Callable[[str], object],
    codec: StreamCodec,
    budget: BudgetConfig,
    resets: dict[int, dict],
    traces_per_problem: int,
    n_failed_min: int,
    n_failed_max: int,
    rng: np.random.Generator,
) -> tuple[list[dict], dict[str, int]]:
    """Search traces stitched from the base policy's trials on training problems.

    ``trials`` are grouped by ``group``; ``resets[group]`` resets an environment of the
    training split to that group's problem. For each problem with at least one
    successful trial and one failed attempt (:func:`failed_attempts`), build
    ``traces_per_problem`` traces: n ~ U{n_failed_min..n_failed_max} failed attempts
    drawn from the problem's pool (without replacement while it lasts, then with), then
    the :func:`winning_tail` of a successful trial drawn at random (n is lowered where
    the tail would not leave room within ``budget.max_episodes``); replay it
    (:func:`metarl_llm.sft.traces.trace_record`) and keep it if it succeeds.

    Attempts (answer episodes) that were cut at ``budget.max_episode_tokens`` no longer
    fit with their delimiter (EOS) and are left out of the pool (the winners).

    Returns (records, counts): ``problems``, ``problems_with_success``,
    ``problems_without_failures`` (skipped for n > 0: nothing to stitch),
    ``traces`` (kept), ``rejected`` (replay did not succeed), ``over_budget`` (more than
    ``budget.max_total_tokens`` policy tokens: not kept), ``attempts_too_long``,
    ``answers_too_long`` (problems whose every winning tail holds a cut episode), and
    ``n_failed_<k>`` per n.
    """

    if not 0 <= n_failed_min <= n_failed_max:
        raise ValueError(f"sft: need 0 <= n_failed_min <= n_failed_max, got {n_failed_min} and {n_failed_max}")
    if n_failed_max + 1 > budget.max_episodes:
        raise ValueError(f"sft.n_failed_max={n_failed_max} needs budget.max_episodes >= {n_failed_max + 1}")
    by_group: dict[int, list[Trial]] = {}
    for t in trials:
        by_group.setdefault(t.group, []).append(t)
    counts = {
        "problems": len(by_group),
        "problems_with_success": 0,
        "problems_without_failures": 0,
        "traces": 0,
        "rejected": 0,
        "over_budget": 0,
        "attempts_too_long": 0,
        "answers_too_long": 0,
    }
    counts.update({f"n_failed_{k}": 0 for k in range(n_failed_min, n_failed_max + 1)})
    env = make_env("train")
    records = []
    for g, group in by_group.items():
        wins = [t for t in group if t.outcome >= 1.0]
        if not wins:
            continue
        counts["problems_with_success"] += 1
        # An episode the rollout cut at max_episode_tokens (no delimiter) cannot be a
        # trace episode: with its delimiter or EOS it no longer fits. Left out, counted.
        fits = lambda text, end: len(codec.encode(text)) + end <= budget.max_episode_tokens  # noqa: E731
        attempts = failed_attempts(group)
        pool = [a for a in attempts if fits(a, len(codec.delimiter_token))]
        counts["attempts_too_long"] += len(attempts) - len(pool)
        tails = [winning_tail(t) for t in wins]
        tails = [tl for tl in tails if all(fits(e, len(codec.delimiter_token)) for e in tl[:-1]) and fits(tl[-1], 1)]
        if not tails:
            counts["answers_too_long"] += 1
            continue
        if not pool and n_failed_max > 0:
            counts["problems_without_failures"] += 1
            if n_failed_min > 0:
                continue
        for _ in range(traces_per_problem):
            tail = tails[int(rng.integers(len(tails)))]
            n = int(rng.integers(n_failed_min, n_failed_max + 1)) if pool else 0
            n = max(0, min(n, budget.max_episodes - len(tail)))  # a long tail leaves room for fewer failures
            order = rng.permutation(len(pool)).tolist() if pool else []
            picks = [pool[order[i]] if i < len(order) else pool[int(rng.integers(len(pool)))] for i in range(n)]
            episodes = picks + tail
            total = sum(len(codec.encode(e)) for e in episodes) + len(codec.delimiter_token) * (len(episodes) - 1) + 1
            if total > budget.max_total_tokens:  # the rollout would have forced an answer before the end
                counts["over_budget"] += 1
                continue
            prompt, info = env.reset(**resets[g])
            record = trace_record(env, codec, budget, prompt, info["problem_id"], episodes, "stitched")
            if record is None:
                counts["rejected"] += 1
                continue
            records.append(record)
            counts["traces"] += 1
            counts[f"n_failed_{n}"] = counts.get(f"n_failed_{n}", 0) + 1
    return records, counts


def closes_trials(env) -> bool:
    """Whether a trace of ``env`` ends with EOS (:meth:`StreamCodec.trace_generations`' ``close``):
    not where a committed answer may be followed by more episodes (``retry_wrong_answers``),
    since there only the environment's grade, which the policy has not seen, ends the trial."""
    return not getattr(env.unwrapped, "retry_wrong_answers", False)


def ends_forced(env, episodes: list[str]) -> bool:
    """Whether a trace's last episode is a forced answer: it has one episode more than ``env``
    allows (an expert that may fail spent the budget; :attr:`envs.base.EpisodicTextEnv.expert_may_fail`)."""
    return len(episodes) > env.unwrapped.max_episodes


def trace_record(
    env,
    codec: StreamCodec,
    budget: BudgetConfig,
    prompt: str,
    problem_id: str,
    episodes: list[str],
    kind: str,
    require_success: bool = True,
) -> dict | None:
    """Play ``episodes`` through ``env`` (just reset to the problem of ``prompt``) and
    tokenise the trial as a rollout would: ``input_ids`` and ``completion_mask`` (1 on
    policy tokens: each episode's text and its delimiter, EOS after the last (the delimiter when
    the environment retries wrong answers: :func:`closes_trials`), or with a rule
    that segments after generation the episodes joined as that rule cuts them,
    :meth:`StreamCodec.trace_generations`; 0 on the prompt and on the observations the
    environment inserts).

    Returns None when the trace does not end at its last episode, or (``require_success``) ends
    there without success (outcome >= 1); raises when an episode or the trace does not fit ``budget`` (training on
    traces the rollout could never produce would be silently wrong). ``kind`` names the
    traces in error messages.
    """
    ids, chat = codec.start(prompt)
    mask = [0] * len(ids)
    policy_tokens = 0
    terminated, reward, forced = False, 0.0, False
    for tokens, texts in codec.trace_generations(episodes, close=closes_trials(env)):
        if terminated:
            return None  # the environment ended the trial before the trace's last episode
        # The forced answer has its own limit, as the rollout samples it (answer_max_tokens, and one
        # more: a rollout's answer cut at the limit has no stop token, its replay here adds one), and
        # max_total_tokens counts what comes before it.
        if forced:
            limit, name = budget.answer_max_tokens + 1, "answer_max_tokens"
        else:
            limit, name = budget.max_episode_tokens, "max_episode_tokens"
        if codec.segmenter is None and len(tokens) > limit:
            raise ValueError(
                f"{kind} {'forced answer' if forced else 'episode'} {texts[0]!r} of problem {problem_id} has {len(tokens)} "
                f"tokens; budget.{name}={getattr(budget, name)} is too small for the {kind} traces"
            )
        policy_tokens += 0 if forced else len(tokens)
        ids += tokens
        mask += [1] * len(tokens)
        for text in texts:  # one episode per generation, or the episodes a segmenter cut from it
            if terminated:
                return None
            obs, reward, terminated, _, info = env.step(text)
            forced = bool(info.get("forcing_answer"))
            if obs and codec.segmenter is not None and text is not texts[-1]:
                return None  # an episode cut after generation can take no reply (feedback, or forced early)
            if obs:  # feedback in chat form is a user turn, as the rollout inserts it
                o = codec.reply_ids(ids, chat, obs) if chat is not None and not info.get("forcing_answer") else codec.encode(obs)
                ids += o
                mask += [0] * len(o)
    if policy_tokens > budget.max_total_tokens:
        raise ValueError(f"{kind} trace of {policy_tokens} tokens exceeds budget.max_total_tokens={budget.max_total_tokens}")
    if not terminated or (require_success and reward < 1.0):
        return None
    return {"input_ids": ids, "completion_mask": mask}
