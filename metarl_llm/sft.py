"""Supervised fine-tuning on token streams, and the verifier-free (VF) baselines.

:func:`sft_fit` fits records ``{"input_ids", "completion_mask"}`` with trl's
SFTTrainer, the loss on ``completion_mask == 1`` tokens only (the policy's episodes;
prompt and inserted observations are context). The warm start uses it on expert traces.

The VF baselines of Setlur et al. 2025 ("Scaling test-time compute without
verification or RL is suboptimal", DESIGN.md section 1) learn from the base policy's
own samples without ever training a verifier (``algo=sft``, :func:`run_vf`):

- ``sft.data=star``: rejection sampling (STaR-like). The base policy's successful
  trials on training problems, exactly as sampled (:func:`star_records`).
- ``sft.data=stitched``: search traces. For a training problem, ``n`` failed attempts
  followed by a correct one (:func:`stitched_records`). A failed attempt is an
  intermediate episode (one that committed no answer) that the environment did not
  mark correct (``info["correct"]``), taken from any of that problem's sampled trials;
  the correct one is a successful trial's tail from its first correct episode (usually
  just its answer episode). Every stitched trace is
  replayed through the environment (:func:`metarl_llm.warm_start.trace_record`), so the
  observations are inserted exactly as in a rollout, and kept only if it ends in
  success at its last episode.

After fitting, the policy is measured on held-out problems as the compute H (policy
tokens per problem) grows in both ways a verifier-free policy can spend it: in parallel
(N independent trials, majority vote: maj@N) and sequentially (one trial with the
budget scaled by s: more episodes, more tokens).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from metarl_llm.config import BudgetConfig, SFTConfig
from metarl_llm.rollout import StreamCodec, Trial

log = logging.getLogger(__name__)

SFT_DATA = ("star", "stitched")


def sft_fit(
    model, tokenizer, records: list[dict], steps: int, batch_size: int, lr: float, seed: int,
    schedule: str = "cosine", checkpointing: bool = False,
) -> list[float]:
    """Fine-tune ``model`` in place on ``records`` for ``steps`` optimiser steps of
    ``batch_size`` records (AdamW at ``lr``, warm-up over 5% of the steps then
    ``schedule``), loss on completion tokens only. Returns the logged training losses
    (ten, each the mean over a tenth of the steps)."""
    return fit_records(model, tokenizer, records, steps, batch_size, lr, seed, schedule, checkpointing).losses


@dataclass
class FitResult:
    losses: list[float]  # the logged training losses, each the mean over its logging window
    steps: int  # optimiser steps run


def fit_records(
    model, tokenizer, records: list[dict], steps: int, batch_size: int, lr: float, seed: int,
    schedule: str = "cosine", checkpointing: bool = False, stop_below: float | None = None,
    min_steps: int = 0, warmup_steps: int | None = None,
) -> FitResult:
    """:func:`sft_fit`, with early stopping: ``stop_below`` ends training, after at least
    ``min_steps`` steps, at the first logged loss below this level (losses are then
    logged every min(10, ``min_steps``) steps; ``steps`` is the bound). ``warmup_steps``:
    the warm-up (default 5% of ``steps``)."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import SFTConfig as TrlSFTConfig
    from trl import SFTTrainer

    class StopBelow(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and state.global_step >= min_steps and logs["loss"] < stop_below:
                control.should_training_stop = True

    if not records:
        raise ValueError("sft_fit: no records to fit")
    for i, r in enumerate(records):
        if len(r["input_ids"]) != len(r["completion_mask"]) or not any(r["completion_mask"]):
            raise ValueError(f"sft_fit: record {i} has mismatched lengths or no completion token")
    with tempfile.TemporaryDirectory() as tmp:
        args = TrlSFTConfig(
            output_dir=tmp,
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=lr,
            lr_scheduler_type=schedule,
            warmup_steps=max(1, steps // 20) if warmup_steps is None else warmup_steps,
            weight_decay=0.0,
            logging_steps=max(1, min(10, min_steps)) if stop_below is not None else max(1, steps // 10),
            save_strategy="no",
            report_to=[],
            completion_only_loss=True,
            max_length=None,
            dataloader_num_workers=0,
            seed=seed,
            data_seed=seed,
            use_cpu=not torch.cuda.is_available(),
            # trl 1.x turns bf16 autocast on by default; on a CPU without bf16 matrix units that
            # runs the slow reference GEMM (measured: tens of times slower than float32 here).
            bf16=bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()),
            fp16=False,
            disable_tqdm=True,
            # trl turns checkpointing on by default; on small models it only costs time.
            # transformers 5 renamed the argument (the old name still works, with a warning).
            **{"activation_checkpointing" if "activation_checkpointing" in TrlSFTConfig.__dataclass_fields__
               else "gradient_checkpointing": checkpointing},
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)  # losses go to our log, not stdout
        if stop_below is not None:
            trainer.add_callback(StopBelow())
        trainer.train()
        return FitResult([h["loss"] for h in trainer.state.log_history if "loss" in h], trainer.state.global_step)


def clean_model(model):
    """A fresh copy of a model trained by a transformers Trainer, through save/load.

    The Trainer leaves wrappers on the trained object (accelerate's autocast and fp32
    output conversion bound to ``forward``, trl's fused LM head, gradient-checkpointing
    hooks), which slow generation down several times and would follow the object into
    any deepcopy. Returns the reloaded model in eval mode with the KV cache on, on the
    original device and dtype."""
    param = next(model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        clean = type(model).from_pretrained(tmp, dtype=param.dtype)
    clean.config.use_cache = True
    return clean.to(param.device).eval()


# ------------------------------------------------------------------ VF data


def star_records(trials: list[Trial]) -> list[dict]:
    """The successful trials (outcome >= 1) as records: their own token streams, the
    loss on the tokens the policy sampled (``trial.action``)."""
    return [{"input_ids": list(t.ids), "completion_mask": list(t.action)} for t in trials if t.outcome >= 1.0]


def failed_attempts(trials: list[Trial]) -> list[str]:
    """Intermediate episodes (before the answer episode) not marked correct, in order."""
    return [
        text
        for t in trials
        for j, text in enumerate(t.episode_texts)
        if j != t.answer_episode and not t.episode_correct[j]
    ]


def winning_tail(trial: Trial) -> list[str]:
    """The episodes of a successful trial from its first episode marked correct through
    its answer episode (just the answer episode when no earlier one was correct): the
    correct attempt of a stitched trace."""
    first = next((j for j, c in enumerate(trial.episode_correct) if c), trial.answer_episode)
    return list(trial.episode_texts[min(first, trial.answer_episode) : trial.answer_episode + 1])


def stitched_records(
    trials: list[Trial], make_env: Callable[[str], object], codec: StreamCodec, budget: BudgetConfig,
    resets: dict[int, dict], traces_per_problem: int, n_failed_min: int, n_failed_max: int, rng: np.random.Generator,
) -> tuple[list[dict], dict[str, int]]:
    """Search traces stitched from the base policy's trials on training problems.

    ``trials`` are grouped by ``group``; ``resets[group]`` resets an environment of the
    training split to that group's problem. For each problem with at least one
    successful trial and one failed attempt (:func:`failed_attempts`), build
    ``traces_per_problem`` traces: n ~ U{n_failed_min..n_failed_max} failed attempts
    drawn from the problem's pool (without replacement while it lasts, then with), then
    the :func:`winning_tail` of a successful trial drawn at random (n is lowered where
    the tail would not leave room within ``budget.max_episodes``); replay it
    (:func:`metarl_llm.warm_start.trace_record`) and keep it if it succeeds.

    Attempts (answer episodes) that were cut at ``budget.max_episode_tokens`` no longer
    fit with their delimiter (EOS) and are left out of the pool (the winners).

    Returns (records, counts): ``problems``, ``problems_with_success``,
    ``problems_without_failures`` (skipped for n > 0: nothing to stitch),
    ``traces`` (kept), ``rejected`` (replay did not succeed), ``over_budget`` (more than
    ``budget.max_total_tokens`` policy tokens: not kept), ``attempts_too_long``,
    ``answers_too_long`` (problems whose every winning tail holds a cut episode), and
    ``n_failed_<k>`` per n.
    """
    from metarl_llm.warm_start import trace_record

    if not 0 <= n_failed_min <= n_failed_max:
        raise ValueError(f"sft: need 0 <= n_failed_min <= n_failed_max, got {n_failed_min} and {n_failed_max}")
    if n_failed_max + 1 > budget.max_episodes:
        raise ValueError(f"sft.n_failed_max={n_failed_max} needs budget.max_episodes >= {n_failed_max + 1}")
    by_group: dict[int, list[Trial]] = {}
    for t in trials:
        by_group.setdefault(t.group, []).append(t)
    counts = {"problems": len(by_group), "problems_with_success": 0, "problems_without_failures": 0, "traces": 0,
              "rejected": 0, "over_budget": 0, "attempts_too_long": 0, "answers_too_long": 0}
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


# ------------------------------------------------------------ VF evaluation


def sequential_scaling(
    policy, codec: StreamCodec, make_heldout_env: Callable[[BudgetConfig], object], budget: BudgetConfig,
    scales: list[float], num_problems: int, samples: int, generator: torch.Generator, rows: int,
) -> dict[str, list]:
    """One trial per sample with the budget scaled by each of ``scales``
    (:func:`metarl_llm.evaluate.scale_budget`): ``success`` and ``tokens`` (mean policy
    tokens per trial) against the scale, on held-out problems 0..num_problems-1."""
    from metarl_llm.evaluate import heldout_resets, scale_budget
    from metarl_llm.rollout import run_trials

    out: dict[str, list] = {"scale": [], "success": [], "tokens": []}
    resets, groups = heldout_resets(num_problems, samples)
    for s in scales:
        b = scale_budget(budget, s)
        envs = [make_heldout_env(b) for _ in range(min(rows, len(resets)))]
        trials: list[Trial] = []
        for lo in range(0, len(resets), rows):
            trials += run_trials(policy, codec, envs[: len(resets[lo : lo + rows])], resets[lo : lo + rows], groups[lo : lo + rows], b, generator)
        out["scale"].append(float(s))
        out["success"].append(float(np.mean([t.outcome for t in trials])))
        out["tokens"].append(float(np.mean([t.policy_tokens for t in trials])))
    return out


def run_vf(
    policy, tokenizer, codec: StreamCodec, make_env: Callable[[str], object],
    make_heldout_env: Callable[[BudgetConfig], object], budget: BudgetConfig, cfg: SFTConfig, seed: int,
    generator: torch.Generator, checkpointing: bool = False, log_fn=None,
) -> tuple[object, dict]:
    """``algo=sft``: a verifier-free baseline fitted to ``policy``'s own samples.

    1. Sample ``cfg.samples_per_problem`` trials on each of ``cfg.num_train_problems``
       training problems (seeds from ``generator``).
    2. Build the data (``cfg.data``: :func:`star_records` or :func:`stitched_records`).
    3. :func:`sft_fit` for ``cfg.steps`` steps (trl SFTTrainer, loss on policy tokens).
    4. Held-out measurement of the fitted policy: max(n_values) trials on each of
       ``cfg.num_heldout_problems`` problems (maj@N, pass@N, mean outcome and tokens as
       N grows) and :func:`sequential_scaling` at ``cfg.budget_scales``.

    Returns (fitted policy, JSON-ready summary).
    """
    from metarl_llm.evaluate import heldout_resets
    from metarl_llm.verifier import best_of_n_trials, play_trials

    if cfg.data not in SFT_DATA:
        raise ValueError(f"sft.data={cfg.data!r}; expected one of {SFT_DATA}")
    for name in ("num_train_problems", "samples_per_problem", "num_heldout_problems", "steps", "traces_per_problem"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"sft.{name} must be >= 1, got {getattr(cfg, name)}")
    if not cfg.n_values or min(cfg.n_values) < 1:
        raise ValueError(f"sft.n_values must be a non-empty list of integers >= 1, got {cfg.n_values}")
    t0 = time.perf_counter()
    policy.eval()
    seeds = torch.randint(0, 2**31 - 1, (cfg.num_train_problems,), generator=generator).tolist()
    resets = [{"seed": int(sd)} for sd in seeds for _ in range(cfg.samples_per_problem)]
    groups = [p for p in range(cfg.num_train_problems) for _ in range(cfg.samples_per_problem)]
    trials, _ = play_trials(policy, codec, make_env, "train", resets, groups, budget, generator, cfg.rollout_rows)
    t_sample = time.perf_counter() - t0
    base_success = float(np.mean([t.outcome for t in trials]))
    if cfg.data == "star":
        records = star_records(trials)
        counts = {"problems": cfg.num_train_problems, "traces": len(records),
                  "problems_with_success": len({t.group for t in trials if t.outcome >= 1.0})}
    else:
        records, counts = stitched_records(
            trials, make_env, codec, budget, {p: {"seed": int(sd)} for p, sd in enumerate(seeds)},
            cfg.traces_per_problem, cfg.n_failed_min, cfg.n_failed_max, np.random.default_rng(seed),
        )
    if not records:
        raise RuntimeError(
            f"sft.data={cfg.data}: no training record from {len(trials)} base-policy trials "
            f"(base success {base_success:.3f}; counts {counts}); sample more problems or use another base policy"
        )
    log.info("sft.data=%s: %d records from %d trials (%s)", cfg.data, len(records), len(trials), counts)
    t1 = time.perf_counter()
    losses = sft_fit(policy, tokenizer, records, cfg.steps, cfg.batch_size, cfg.lr, seed, "cosine", checkpointing)
    t_fit = time.perf_counter() - t1
    policy = clean_model(policy)

    n_max = max(cfg.n_values)
    split_size = make_env("test").unwrapped.num_problems
    num_heldout = min(cfg.num_heldout_problems, split_size) if split_size is not None else cfg.num_heldout_problems
    h_resets, h_groups = heldout_resets(num_heldout, n_max)
    heldout, answer_scores = play_trials(policy, codec, make_env, "test", h_resets, h_groups, budget, generator, cfg.rollout_rows)
    parallel = best_of_n_trials(np.zeros(len(heldout)), heldout, cfg.n_values, answer_scores)
    parallel.pop("best_of_n")  # all scores equal: it is the first trial's outcome, no verifier here
    sequential = sequential_scaling(policy, codec, make_heldout_env, budget, list(cfg.budget_scales), num_heldout,
                                    cfg.sequential_samples, generator, cfg.rollout_rows)
    summary = {
        "sft/data": cfg.data,
        "sft/records": len(records),
        "sft/final_loss": losses[-1] if losses else None,
        "sft/losses": losses,
        "sft/record_counts": counts,
        "sft/policy_tokens": int(sum(sum(r["completion_mask"]) for r in records)),
        "base/train_success": base_success,
        "heldout/success": float(np.mean([t.outcome for t in heldout])),
        "heldout/tokens_per_trial": float(np.mean([t.policy_tokens for t in heldout])),
        "heldout/episodes_per_trial": float(np.mean([len(t.episode_texts) for t in heldout])),
        "parallel": parallel,
        "sequential": sequential,
        "heldout_problems": num_heldout,
        "sample_time_s": t_sample,
        "fit_time_s": t_fit,
        "wall_time_s": time.perf_counter() - t0,
    }
    if log_fn is not None:
        scalars = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(v)}
        for i, n in enumerate(parallel["n"]):
            for key in ("maj_at_n", "pass_at_n", "mean_outcome", "tokens"):
                scalars[f"vf_parallel/{key}@{n}"] = parallel[key][i]
        for i, s in enumerate(sequential["scale"]):
            scalars[f"vf_sequential/success@{s:g}x"] = sequential["success"][i]
            scalars[f"vf_sequential/tokens@{s:g}x"] = sequential["tokens"][i]
        log_fn(scalars, cfg.steps)
    return policy, summary
