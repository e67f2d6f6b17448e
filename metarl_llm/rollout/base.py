"""Rollout engines: how trials are generated, behind one small interface. The :class:`Engine` interface, the
engine registry (``rollout.engine``) and the episode bookkeeping every engine shares
(:func:`start_trials`, :func:`episode_limit`, :func:`finish_generation`, :func:`finish_episode`,
:func:`finish_round`).

A trial is a token stream (prompt, episodes, inserted observations; see
:mod:`metarl_llm.core.trial`). Engines differ only in how they compute it:

- ``cached`` (default, :class:`CachedEngine`): one batched KV cache per call. Each
  trial's cache is kept across its episodes; the observation tokens the environment
  inserts are appended to it, so the history is never encoded twice. Trials step
  independently: when one ends an episode, the environment is stepped at once and its
  observation is fed one token per forward pass beside the other trials' sampled tokens
  (no trial waits for the slowest episode of the batch, and no pass is padded to the
  longest observation; observations longer than ``queue_tokens`` go in as one block).
  Every pass is then one token per row, the cache grows by one column per pass and is
  appended in place (preallocated, :class:`_GrowingLayer`), prompts of similar length are
  prefilled together (:meth:`DecodeBatch.prefill`), and finished trials leave the batch once a
  quarter of its rows have finished. With ``keep_cache=True`` each finished trial keeps
  its KV cache (:class:`TrialCache`) so that the meta-prover's forced answers continue
  from it (:meth:`CachedEngine.continue_prefixes`) instead of re-encoding every prefix.
- ``reencode`` (:class:`ReencodeEngine`): episode by episode, every trial's whole history
  is prefilled again before each episode (with a KV cache inside the episode). The
  engine of earlier versions, kept as a reference.
- ``hf_generate`` (:class:`HFGenerateEngine`): plain ``model.generate`` once per episode
  on the whole history: the baseline a user of transformers would write.

Sampling is ancestral sampling from softmax(logits) (temperature 1, no top-k/top-p),
so the log-probs are those of the policy the trainer scores. ``cached`` and
``reencode`` draw each token by inverse-CDF from a *counter-based* uniform
u(trial key, stream position) (:func:`stream_uniforms`): a trial's tokens depend only on
its own key and logits, not on which other trials share the batch or how the forward
passes were split. The cached engine therefore reproduces exactly the tokens of a
recomputation from scratch with the same keys (tested), and the two engines agree. The
meta-prover's forced answers (:meth:`Engine.continue_prefixes`) draw the same way, one key per
answer, so J does not depend on the engine, on ``rollout.max_rows`` or on whether the answers
continue kept caches or re-encode their prefixes. Every such decode runs the one decode loop,
:func:`metarl_llm.rollout.decode.decode`.

Values while sampling (``value_head``, a shared critic's head; all three engines
support it, :attr:`Engine.supports_values`): the logits a token is drawn from come from a
forward pass whose last-layer hidden state (the LM head's input, :func:`lm_head_input`; the
tensor ``ActorCritic.score`` reads) at that position also gives the critic's value V(x_<t) of
that token, so the engines return each action token's value beside its log-prob
(``Trial.sample_values``) and the trainer needs no policy forward to score a PPO batch
(``algo.old_logprobs=sampled``). Only the sampled positions' hidden states go through
the head; the tokens and log-probs are those drawn without it.

A new backend (for example vLLM for large models) implements :class:`Engine` and
registers itself with :func:`register_engine`; the trainer only calls
``get_engine(name).run_trials(...)`` (:func:`metarl_llm.rollout.engine.get_engine`, which imports every engine).
"""

from __future__ import annotations

import abc

import torch

from metarl_llm.config import BudgetConfig
from metarl_llm.core.registry import Registry
from metarl_llm.core.trial import StreamCodec, Trial
from metarl_llm.rollout.sampling import check_keys, sample

ENGINES = Registry("rollout engine", "rollout.engine")  # name -> Engine subclass


def register_engine(name: str):
    """Class decorator: register an :class:`Engine` subclass as ``name`` (and set its ``name``)."""

    def wrap(cls):
        ENGINES.register(name)(cls)
        cls.name = name
        return cls

    return wrap


# ------------------------------------------------------------------ interface


class Engine(abc.ABC):
    """A rollout backend (abstract). Subclasses implement :meth:`run_trials`.

    ``supports_values``: True when :meth:`run_trials` takes ``value_head`` and fills
    ``Trial.sample_values``; callers pass ``value_head`` only to such engines (the trainer
    otherwise scores the values with a forward pass)."""

    name = "engine"
    supports_values = False

    def __init__(self, max_rows: int = 512, bucket_tokens: int = 128, compile_decode: bool = False):
        if max_rows < 1:
            raise ValueError(f"rollout.max_rows must be >= 1, got {max_rows}")
        if bucket_tokens < 0:
            raise ValueError(f"rollout.prefill_bucket_tokens must be >= 0, got {bucket_tokens}")
        self.max_rows = max_rows  # rows per batched forward pass (trials, or meta-prover answers); larger calls run in chunks
        # Rows of similar length share a pass, cut where the padded positions saved outweigh one more
        # pass costed as this many (metarl_llm.core.batch.length_buckets; 0: one pass). Engines that
        # prefill whole histories in one pass ignore it.
        self.bucket_tokens = bucket_tokens
        # Compiled decoding (rollout.compile_decode): every one-token decode step is torch.compile'd
        # over a static KV cache (metarl_llm.rollout.decode.DecodeBatch); None: eager. Engines
        # that do not decode with DecodeBatch (hf_generate) ignore it.
        self.compile_backend: str | None = "inductor" if compile_decode else None

    @abc.abstractmethod
    def run_trials(
        self,
        model: torch.nn.Module,
        codec: StreamCodec,
        envs: list,
        resets: list[dict],
        groups: list[int],
        budget: BudgetConfig,
        generator: torch.Generator | None = None,
        keep_cache: bool = False,
        greedy: bool = False,
        keys: torch.Tensor | None = None,
        value_head: torch.nn.Module | None = None,
    ) -> list[Trial]:
        """Play one trial in each environment (see :func:`metarl_llm.rollout.engine.run_trials`).

        ``keys`` [N] int64: the trials' sampling keys (default: drawn from ``generator``),
        for callers that shard a batch whose keys were drawn globally. ``value_head``
        (engines with ``supports_values``): also store each action token's value, the head
        on the last hidden state of the pass its logits came from, on ``Trial.sample_values``."""

    @torch.no_grad()
    def continue_prefixes(
        self,
        model: torch.nn.Module,
        trials: list[Trial],
        ends: list[list[int]],
        suffixes: list[list[list[int]]],
        copies: int,
        max_new_tokens: int,
        stop_ids: torch.Tensor,
        pad_id: int,
        generator: torch.Generator | None = None,
        greedy: bool = False,
        keys: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        """Sample ``copies`` continuations of each prefix ``trials[i].ids[:ends[i][b]]`` followed by
        ``suffixes[i][b]`` (the meta-prover's forced-answer tokens), at most ``max_new_tokens``
        each, stopping at ``stop_ids``.

        Returns (tokens [M, L], lengths [M], owners) with one row per (trial i, boundary b,
        copy), ``owners[row] = (i, b)`` (:func:`prefix_owners`). Row r draws counter-based at
        its key ``keys[r]`` (default: M keys drawn from ``generator``) and stream positions, so
        its answer does not depend on the batching (``max_rows``) or on the engine; ``greedy``:
        the argmax. This base method re-encodes every prefix (:func:`sample`); engines that keep
        caches continue from them."""
        owners = prefix_owners(ends, copies)
        keys = check_keys(keys, len(owners), generator)
        if not owners:
            return torch.zeros((0, 0), dtype=torch.long), torch.zeros(0, dtype=torch.long), owners
        contexts = [trials[i].ids[: ends[i][b]] + suffixes[i][b] for i, b in owners]
        out = sample(
            model,
            contexts,
            max_new_tokens,
            stop_ids,
            pad_id,
            max_rows=self.max_rows,
            greedy=greedy,
            keys=keys,
            compile_backend=self.compile_backend,
        )
        return out.tokens, out.lengths, owners


def prefix_owners(ends: list[list[int]], copies: int) -> list[tuple[int, int]]:
    """(trial i, boundary b) of each row of :meth:`Engine.continue_prefixes`: trial-major, then
    boundary, then ``copies`` rows per boundary."""
    return [(i, b) for i, e in enumerate(ends) for b in range(len(e)) for _ in range(copies)]


def start_trials(codec: StreamCodec, envs: list, resets: list[dict], groups: list[int], budget: BudgetConfig) -> list[Trial]:
    """Reset every environment and start its trial with the tokenised prompt."""
    if not (len(envs) == len(resets) == len(groups)):
        raise ValueError(f"run_trials: {len(envs)} envs, {len(resets)} resets and {len(groups)} groups must match")
    trials = []
    for env, kw, g in zip(envs, resets, groups):
        prompt, info = env.reset(**kw)
        t = Trial(problem_id=info["problem_id"], group=g, grader=env.unwrapped.grader())
        ids, t.chat = codec.start(prompt)
        if len(ids) > budget.max_prompt_tokens:
            raise ValueError(
                f"problem {t.problem_id}: prompt of {len(ids)} tokens exceeds budget.max_prompt_tokens={budget.max_prompt_tokens}"
            )
        if not ids:
            raise ValueError(f"problem {t.problem_id}: the prompt encodes to no tokens")
        t.append(ids, False, -1)
        trials.append(t)
    return trials


def episode_limit(t: Trial, forced: bool, budget: BudgetConfig, codec: StreamCodec) -> int:
    """Tokens the next generation of ``t`` may sample: an episode, the forced answer, or (a rule
    that segments after generation, ``codec.segmenter``) the rest of the trial's token budget."""
    if forced:
        return budget.answer_max_tokens
    if codec.segmenter is not None:
        return max(1, budget.max_total_tokens - t.policy_tokens)
    return max(1, min(budget.max_episode_tokens, budget.max_total_tokens - t.policy_tokens))


def finish_generation(
    t: Trial,
    env,
    codec: StreamCodec,
    toks: list[int],
    logps: list[float],
    forced: bool,
    budget: BudgetConfig,
    values: list[float] | None = None,
) -> tuple[bool, bool, list[int], int]:
    """Record what one generation of ``t`` sampled and step its environment: one episode
    (:func:`finish_episode`), or, with a rule that segments after generation
    (``codec.segmenter``), every episode the rule cuts from ``toks``, in order.

    Returns (ended, forced_next, observation ids to insert, kept): ``kept`` tokens of ``toks``
    stay in the stream. When the environment ends the trial (a committed answer) or forces the
    answer at an episode before the last, the tokens after that episode are dropped, exactly as
    if generation had stopped there (the policy is causal: the kept tokens, their log-probs and
    values are the same). Episodes cut after generation cannot take the environment's feedback:
    a reply between two of them is an error."""
    if codec.segmenter is None or forced:
        done, forced_next, obs = finish_episode(t, env, codec, toks, logps, forced, budget, values)
        return done, forced_next, obs, len(toks)
    ends = codec.segmenter(toks)
    start = 0
    for k, end in enumerate(ends):
        last = k == len(ends) - 1
        piece = slice(start, end)
        done, forced_next, obs = finish_episode(
            t, env, codec, toks[piece], logps[piece], False, budget, None if values is None else values[piece], inner=not last
        )
        if done or forced_next or last:
            return done, forced_next, obs, end
        start = end
    raise RuntimeError(f"problem {t.problem_id}: the segmenter cut {len(toks)} tokens into no episode")


def finish_episode(
    t: Trial,
    env,
    codec: StreamCodec,
    toks: list[int],
    logps: list[float],
    forced: bool,
    budget: BudgetConfig,
    values: list[float] | None = None,
    inner: bool = False,
) -> tuple[bool, bool, list[int]]:
    """Record an episode of ``t`` (its tokens, log-probs and, when computed, values) and step its environment.
    ``inner``: an episode cut after generation with more episodes after it (:func:`finish_generation`):
    nothing is inserted after it, and an environment reply there is an error.

    Returns (ended, forced_next, observation ids to insert). The trial ends when the
    environment terminates or truncates it; after EOS without a committed answer, at
    ``max_total_tokens`` or when the environment itself forces the answer, the
    forced-answer text is inserted and the next episode is the final answer. In chat form
    (``t.chat``) the environment's feedback is a user turn (:meth:`StreamCodec.reply_ids`), and an
    EOS before it only closes the assistant turn; after a wrong answer the environment lets the
    policy retry (``info["attempt"]``), an EOS ends that attempt and the reply follows.
    """
    j = len(t.episode_texts)
    t.append(toks, True, j, logps, values)
    text = codec.episode_text(toks)
    t.episode_texts.append(text)
    obs, reward, terminated, truncated, info = env.step(text)
    t.episode_correct.append(bool(info.get("correct", False)))
    if terminated or truncated:
        t.outcome, t.answer, t.answer_episode, t.forced = float(reward), info.get("answer"), j, forced
        return True, forced, []
    if forced:
        raise RuntimeError(f"problem {t.problem_id}: environment did not end the trial after a forced answer")
    n = len(toks)
    if info.get("forcing_answer"):
        return False, True, codec.forced_prefix(t.ids)
    if inner or (codec.segmenter is not None and obs):
        if obs:
            raise ValueError(
                f"problem {t.problem_id}: the environment replied {obs[:80]!r} after episode {j}, but "
                f"segment={codec.segment.name} cuts episodes after the trial is generated, where no reply can be "
                "inserted; use segment=delimiter (generation stops at each episode end) or env.feedback=false"
            )
        return False, False, []
    chat_turn = t.chat is not None and bool(obs)  # feedback as a user turn: EOS then ends the assistant turn, no more
    # A wrong committed answer the environment lets the policy retry (env.retry_wrong_answers): the EOS
    # after it ends the attempt, not the trial; the reply follows and the next episode is the next attempt.
    attempt = info.get("attempt") is not None
    if (n > 0 and toks[-1] == codec.eos_id and not (chat_turn or attempt)) or t.policy_tokens >= budget.max_total_tokens:
        env.unwrapped.force_answer()
        return False, True, codec.forced_prefix(t.ids)
    if chat_turn:
        return False, False, codec.reply_ids(t.ids, t.chat, obs)
    cut = n > 0 and toks[-1] not in codec.delimiter_ids
    return False, False, (codec.delimiter_token if cut else []) + codec.encode(obs)


def finish_round(
    trials: list[Trial], envs: list, codec: StreamCodec, results: dict, live: list[int], forced: list[bool], budget: BudgetConfig
) -> list[int]:
    """One episode of every live trial of an episode-by-episode engine: ``results[i]`` =
    (tokens, log-probs) or (tokens, log-probs, values) of trial i's episode; records it,
    steps the environment, inserts the observation. Updates ``forced`` in place; returns
    the trials still running."""
    still = []
    for i in live:
        toks, logps, *values = results[i]
        done, forced[i], obs_ids, _kept = finish_generation(
            trials[i], envs[i], codec, toks, logps, forced[i], budget, values[0] if values else None
        )  # the next round re-encodes the stream, so dropped tokens need no undoing
        if not done:
            if obs_ids:
                trials[i].append(obs_ids, False, -1)
            still.append(i)
    return still
