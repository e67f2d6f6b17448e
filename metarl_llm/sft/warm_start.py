"""Warm start: supervised fine-tuning on the environment's expert traces.

A model without the skills (the tiny default starts from random weights) first
learns the task's format and some competence from expert trials, built by playing
each expert trace through the environment (so observations are inserted exactly as
in a rollout). trl's SFTTrainer fits them with the loss on policy tokens only
(``completion_mask`` = action tokens; prompt and observations are masked).

Curriculum (measured: bench/results/main_job.md): with varied traces from the start the loss plateaus, so
the first ``focused_fraction`` of steps use focused traces (the correct episode
alone, variety 0), extended until their loss is below ``focused_until_loss`` (the
plateau ends at a seed- and thread-dependent step; at most ``focused_max_multiple``
times the share), the rest stitched traces (``0..n_failed_max`` failed episodes
first) at the configured variety, mixed with a ``replay_fraction`` share of the
focused traces. An expert that sets its own trace lengths (env=inverse's blind search,
planted_subseq with ``expert_pace=length``) writes its failed episodes in both phases: there
"focused" is variety 0 only. The replay keeps what the first phase taught: on varied traces alone
the second phase unlearned it (the default job, seed 0: held-out success 0.34 after
the focused phase, 0.008 after the varied one; 0.46 with half the traces replayed).

The result is cached under ``cache_dir`` by a hash of everything that determines it
(model, tokenizer, environment, budget, warm-start settings, seed), so the next run
with the same settings starts at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from metarl_llm.config import BudgetConfig, EnvConfig, ModelConfig, WarmStartConfig
from metarl_llm.core.trial import StreamCodec
from metarl_llm.sft.fit import FitResult, fit_records
from metarl_llm.sft.traces import closes_trials, ends_forced, trace_record

log = logging.getLogger(__name__)


CACHE_VERSION = 11  # bump when the trace format or the SFT recipe changes (9: retry traces end with the delimiter; 10: inverse's blind expert counts from y; 11: a loaded math record's canonical trace writes its solution)


@dataclass
class TraceNeeds:
    """The budget a set of traces needs, in tokens as :func:`trace_record` counts them:
    the longest episode (its text and its delimiter, or EOS for the last), the longest
    trace (its policy tokens), the longest prompt (with special tokens, as the rollout
    encodes it).

    Collected over all the traces before any error, so that the error can name one
    budget that fits them all: a user with a new dataset should not have to find the
    limits by raising them one failed run at a time.
    """

    episode: int = 0
    total: int = 0
    prompt: int = 0

    def add(self, codec: StreamCodec, prompt: str, episodes: list[str], close: bool = True, forced: bool = False) -> None:
        """Measure one trace (``close``: as :meth:`StreamCodec.trace_generations` takes it;
        ``forced``: its last episode is a forced answer, which ``budget.answer_max_tokens`` bounds
        and ``max_total_tokens`` does not count, as in :func:`~metarl_llm.sft.traces.trace_record`)."""
        sizes = [len(tokens) for tokens, _ in codec.trace_generations(episodes, close=close)]
        if forced and codec.segmenter is None:
            sizes = sizes[:-1]
        if codec.segmenter is None:  # cut after generation, an episode has no token limit of its own
            self.episode = max(self.episode, *sizes) if sizes else self.episode
        self.total = max(self.total, sum(sizes))
        self.prompt = max(self.prompt, len(codec.prompt_ids(prompt)))  # as the rollout starts it (chat template too)

    def merge(self, other: "TraceNeeds") -> None:
        self.episode, self.total = max(self.episode, other.episode), max(self.total, other.total)
        self.prompt = max(self.prompt, other.prompt)

    def too_small(self, budget: BudgetConfig) -> list[str]:
        """The limits of ``budget`` these traces exceed, as ``budget.<name>=<value>``."""
        limits = (("max_episode_tokens", self.episode), ("max_total_tokens", self.total), ("max_prompt_tokens", self.prompt))
        return [f"budget.{name}={getattr(budget, name)}" for name, need in limits if need > getattr(budget, name)]

    def check(self, budget: BudgetConfig, kind: str) -> None:
        """Raise, naming the smallest budget that fits these traces, unless ``budget`` does."""
        over = self.too_small(budget)
        if not over:
            return
        prompt_over = self.prompt > budget.max_prompt_tokens
        facts = [f"the longest episode has {self.episode} tokens"] if self.episode else []  # 0: not measured (segmented after)
        facts += [f"the longest trace {self.total}" if facts else f"the longest trace has {self.total} tokens"]
        facts += [f"the longest prompt {self.prompt}"] if prompt_over else []
        facts = ", ".join(facts[:-1]) + (" and " if len(facts) > 1 else "") + facts[-1]
        fix = f"budget.max_episode_tokens={self.episode} " if self.episode else ""
        fix += f"budget.max_total_tokens={self.total}"
        fix += f" budget.max_prompt_tokens={self.prompt}" if prompt_over else ""
        raise ValueError(
            f"{' and '.join(over)} {'is' if len(over) == 1 else 'are'} too small for the {kind} traces: "
            f"{facts}; the smallest budget that fits them is {fix}"
        )


def _expert_records(
    make_env, codec: StreamCodec, budget: BudgetConfig, num: int, n_failed_max: int, variety: float, seed: int
) -> tuple[list[dict], TraceNeeds]:
    """:func:`expert_records` without the budget check: the records (complete only when
    the needs fit ``budget``) and what the traces need."""
    env = make_env("train")
    may_fail = env.unwrapped.expert_may_fail  # a blind expert's trials, as they come
    if may_fail and codec.segmenter is not None:
        raise ValueError(
            f"{type(env.unwrapped).__name__}'s expert ends a failed trial with a forced answer, which the warm "
            f"start cannot replay with a rule that segments after generation (segment={codec.segment.name}): "
            "use segment=delimiter, or the environment's expert that always succeeds (env=inverse: env.expert_search=informed)"
        )
    if not may_fail and n_failed_max + 1 > budget.max_episodes:  # an expert that may fail decides n_failed itself
        raise ValueError(f"warm_start.n_failed_max={n_failed_max} needs budget.max_episodes >= {n_failed_max + 1}")
    records, needs = [], TraceNeeds()
    for prompt, info, episodes in _expert_traces(env, num, n_failed_max, variety, seed):
        needs.add(codec, prompt, episodes, close=closes_trials(env), forced=ends_forced(env, episodes))
        if needs.too_small(budget):
            continue  # no record will be used; keep measuring the rest for the error
        record = trace_record(env, codec, budget, prompt, info["problem_id"], episodes, "expert", require_success=not may_fail)
        if record is None:
            failure = "did not end at its last episode" if may_fail else "did not succeed"
            raise RuntimeError(f"expert trace for problem {info['problem_id']} {failure}: {episodes!r}")
        records.append(record)
    return records, needs


def _expert_traces(env, num: int, n_failed_max: int, variety: float, seed: int):
    """The warm start's ``num`` expert traces of seed ``seed``: (prompt, reset info, episode texts)
    each, ``env`` reset to each trace's problem as it is yielded."""
    rng = np.random.default_rng(seed)
    may_fail = env.unwrapped.expert_may_fail  # then n_failed is not used: the expert's search decides it
    for _ in range(num):
        prompt, info = env.reset(seed=int(rng.integers(2**31 - 1)))
        n_failed = int(rng.integers(0, n_failed_max + 1))  # drawn either way: the same generator stream
        if may_fail:
            n_failed = 0
        yield prompt, info, env.unwrapped.expert_trace(rng, n_failed=n_failed, variety=variety)


def fitted_budget(make_env, codec: StreamCodec, budget: BudgetConfig, ws: WarmStartConfig, seed: int) -> BudgetConfig:
    """``budget`` with its token limits raised to what the data needs (``budget.fit_traces``): the
    longest episode and trace of the warm start's expert traces (both phases, as
    :func:`warm_start` draws them), the longest prompt of either split, and the longest canonical
    forced answer (with its stop token). A limit already larger is kept; ``max_episodes`` is not
    touched. Only tokenises the traces (no model)."""
    needs, answer = TraceNeeds(), 0
    env = make_env("train")
    phases = [(0, 0.0, seed)] + ([(ws.n_failed_max, ws.variety, seed + 1)] if ws.focused_fraction < 1 else [])
    for n_failed_max, variety, phase_seed in phases:
        for prompt, _, episodes in _expert_traces(env, ws.num_traces, n_failed_max, variety, phase_seed):
            needs.add(codec, prompt, episodes, close=closes_trials(env), forced=ends_forced(env, episodes))
            text, stop = env.unwrapped.answer_target()
            answer = max(answer, len(codec.encode(text)) + int(stop))
    test = make_env("test")
    n_test = test.unwrapped.num_problems
    for i in range(n_test if n_test is not None else 0):
        prompt, _ = test.reset(options={"index": i})
        needs.prompt = max(needs.prompt, len(codec.prompt_ids(prompt)))
        text, stop = test.unwrapped.answer_target()
        answer = max(answer, len(codec.encode(text)) + int(stop))
    return replace(
        budget,
        max_episode_tokens=max(budget.max_episode_tokens, needs.episode),
        max_total_tokens=max(budget.max_total_tokens, needs.total),
        max_prompt_tokens=max(budget.max_prompt_tokens, needs.prompt),
        answer_max_tokens=max(budget.answer_max_tokens, answer),
    )


def expert_records(
    make_env, codec: StreamCodec, budget: BudgetConfig, num: int, n_failed_max: int, variety: float, seed: int
) -> list[dict]:
    """Tokenised expert trials: ``input_ids`` and ``completion_mask`` (1 on policy tokens).

    Intermediate episodes end with the delimiter token, the final one with EOS (with the
    delimiter where the environment retries wrong answers:
    :func:`~metarl_llm.sft.traces.closes_trials`). Raises if a trace does not succeed (where the environment's
    ``expert_may_fail``: does not end at its last episode) or does not fit the budget (training on traces the
    rollout could never produce would be silently wrong); the budget error comes after
    all ``num`` traces are measured and names the smallest budget that fits them all
    (:class:`TraceNeeds`).
    """
    records, needs = _expert_records(make_env, codec, budget, num, n_failed_max, variety, seed)
    needs.check(budget, "expert")
    return records


LATER_ENV_OPTIONS = {
    "retry_wrong_answers": False,
    "feedback_detail": "verdict",
    "expert_heterogeneity": None,
    "expert_pace": "progress",
    "hidden_digits": 0,
    "write_comparison": False,
}  # env option -> its default


def cache_key(
    model: ModelConfig,
    env: EnvConfig,
    budget: BudgetConfig,
    ws: WarmStartConfig,
    seed: int,
    vocab: dict,
    chat: dict | None = None,
    segment: dict | None = None,
) -> str:
    """The warm start's cache entry: a hash of everything that determines its result. ``chat``: the
    chat rendering of the prompts (template and system prompt) when prompts go through a template;
    ``segment``: the episode rule (``segment.*``) when it is not one episode per line."""
    spec = {
        "version": CACHE_VERSION,
        # LoRA, autocast, the attention backend and the sampling temperature concern PPO only: leaving
        # them out keeps one entry for all (and the entries written before those options existed).
        # The chat settings enter as what they do (`chat`, only when prompts are rendered through a template).
        "model": {
            k: v
            for k, v in asdict(model).items()
            if k not in ("lora", "autocast", "cudnn_attention", "temperature", "chat_template", "system_prompt")
            and not (k in ("answer_marker", "forced_answer_text") and v is None)  # set: they change the traces
        },
        # Env options added after entries were written enter only when set (the old entries stay valid).
        "env": {k: v for k, v in asdict(env).items() if not (k in LATER_ENV_OPTIONS and v == LATER_ENV_OPTIONS[k])},
        "budget": {k: v for k, v in asdict(budget).items() if k != "fit_traces"},  # the limits used are what count
        # the seed used is `seed`; the traces' episodes are the budget's (warm_start.max_episodes is applied there)
        "warm_start": {k: v for k, v in asdict(ws).items() if k not in ("cache_dir", "seed", "max_episodes")},
        "seed": seed,
        "vocab": hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest(),
    }
    if chat is not None:
        spec["chat"] = chat
    if segment is not None:
        spec["segment"] = segment
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def warm_start(
    model,
    tokenizer,
    codec: StreamCodec,
    make_env,
    model_cfg: ModelConfig,
    env_cfg: EnvConfig,
    budget: BudgetConfig,
    ws: WarmStartConfig,
    seed: int,
    fit: Callable[..., FitResult] = fit_records,
) -> tuple[object, dict]:
    """Fine-tune ``model`` on expert traces (or load the cached result). Returns (model, info).

    ``fit``: the SFT fit of each phase (:func:`metarl_llm.sft.fit.fit_records`'s signature), a seam
    for tests and for other fitters."""
    if ws.steps <= 0:
        return model, {"warm_start/cached": False, "warm_start/steps": 0}
    chat = (
        None
        if codec.chat is None
        else {
            "template": hashlib.sha256(str(tokenizer.chat_template).encode()).hexdigest(),
            "system_prompt": codec.chat.system_prompt,
        }
    )
    segment = asdict(codec.segment) if codec.segment.after or codec.segment.delimiter != "\n" else None
    key = cache_key(model_cfg, env_cfg, budget, ws, seed, tokenizer.get_vocab(), chat, segment)
    root = Path(os.path.expanduser(ws.cache_dir))
    path = root / key
    if (path / "done.json").exists():
        info = json.loads((path / "done.json").read_text())
        loaded = type(model).from_pretrained(path, dtype=next(model.parameters()).dtype)
        log.info("warm start: loaded cached model %s", path)
        return loaded, {**info, "warm_start/cached": True}
    focused_steps = int(round(ws.steps * ws.focused_fraction))
    # Both phases' traces are built (and their budget checked, as one) before any training:
    # a budget that fits the focused traces (the correct episode alone) but not the varied ones
    # (failed attempts before it) would otherwise fail only after the first phase.
    phases, needs = [], TraceNeeds()
    varied_steps = ws.steps - focused_steps
    n_replay = int(round(ws.num_traces * ws.replay_fraction)) if varied_steps else 0
    focused = []
    if focused_steps or n_replay:
        focused, phase_needs = _expert_records(make_env, codec, budget, ws.num_traces, 0, 0.0, seed)
        needs.merge(phase_needs)
    if focused_steps:
        phases.append((focused, focused_steps, "constant_with_warmup"))
    if varied_steps:
        recs, phase_needs = _expert_records(
            make_env, codec, budget, ws.num_traces - n_replay, ws.n_failed_max, ws.variety, seed + 1
        )
        phases.append((recs + focused[:n_replay], varied_steps, "cosine"))
        needs.merge(phase_needs)
    needs.check(budget, "expert")
    losses, steps_run = [], 0
    for recs, steps, schedule in phases:
        max_steps = int(round(steps * ws.focused_max_multiple))
        extend = schedule == "constant_with_warmup" and ws.focused_until_loss > 0 and max_steps > steps
        until = dict(stop_below=ws.focused_until_loss, min_steps=steps, warmup_steps=max(1, steps // 20)) if extend else {}
        phase = "warm start, focused phase" if schedule == "constant_with_warmup" else "warm start, varied phase"
        result = fit(
            model,
            tokenizer,
            recs,
            max_steps if extend else steps,
            ws.batch_size,
            ws.lr,
            seed,
            schedule,
            model_cfg.gradient_checkpointing,
            desc=phase,
            **until,
        )
        phase_losses = result.losses
        losses += phase_losses
        if extend:
            focused_steps = result.steps
            if phase_losses[-1] >= ws.focused_until_loss:
                log.warning(
                    "warm start: the focused phase's loss is %.3f after %d steps (warm_start.focused_max_multiple="
                    "%g), above warm_start.focused_until_loss=%g: the policy may not have learned the task's rule "
                    "(raise focused_max_multiple or lr)",
                    phase_losses[-1],
                    max_steps,
                    ws.focused_max_multiple,
                    ws.focused_until_loss,
                )
            else:
                log.info("warm start: focused phase ended at step %d, loss %.3f", focused_steps, phase_losses[-1])
            steps = focused_steps
        steps_run += steps
    model.config.use_cache = True
    log.info("warm start: %d steps (%d focused), loss %s", steps_run, focused_steps, " ".join(f"{x:.3f}" for x in losses))
    info = {
        "warm_start/steps": steps_run,
        "warm_start/focused_steps": focused_steps,
        "warm_start/final_loss": losses[-1] if losses else float("nan"),
        "warm_start/key": key,
    }
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "done.json").write_text(json.dumps(info))
    if path.exists():  # a concurrent run finished first; keep theirs
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, path)
    # Hand back a clean model loaded from the cache entry, never the trained object:
    # the Trainer leaves wrappers on it (an instance-level ``forward`` bound to it, input
    # hooks, gradient checkpointing) and a deepcopy of that object, e.g. the frozen
    # reference, would still run the live policy. Fresh and cached runs now start alike.
    clean = type(model).from_pretrained(path, dtype=next(model.parameters()).dtype)
    return clean, {**info, "warm_start/cached": False}
