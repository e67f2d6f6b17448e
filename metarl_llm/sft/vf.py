"""Supervised fine-tuning on token streams, and the verifier-free (VF) baselines.

:func:`sft_fit` fits records ``{"input_ids", "completion_mask"}`` with trl's
SFTTrainer, the loss on ``completion_mask == 1`` tokens only (the policy's episodes;
prompt and inserted observations are context). The warm start uses it on expert traces.

The VF baselines of Setlur et al. 2025 ("Scaling test-time compute without
verification or RL is suboptimal", docs/design.md section 1) learn from the base policy's
own samples without ever training a verifier (``job=sft``, :func:`run_vf`):

- ``sft.data=star``: rejection sampling (STaR-like). The base policy's successful
  trials on training problems, exactly as sampled (:func:`star_records`).
- ``sft.data=stitched``: search traces. For a training problem, ``n`` failed attempts
  followed by a correct one (:func:`stitched_records`). A failed attempt is an
  intermediate episode (one that committed no answer) that the environment did not
  mark correct (``info["correct"]``), taken from any of that problem's sampled trials;
  the correct one is a successful trial's tail from its first correct episode (usually
  just its answer episode). Every stitched trace is
  replayed through the environment (:func:`metarl_llm.sft.traces.trace_record`), so the
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
import time
from typing import Callable

import numpy as np
import torch

from metarl_llm.config import BudgetConfig, SFTConfig
from metarl_llm.core.trial import StreamCodec, Trial
from metarl_llm.evaluation.curves import scale_budget
from metarl_llm.rollout.engine import heldout_resets, run_trials
from metarl_llm.sft.fit import clean_model, sft_fit
from metarl_llm.sft.traces import star_records, stitched_records
from metarl_llm.verify.best_of_n import best_of_n_trials, play_trials

log = logging.getLogger(__name__)

# ------------------------------------------------------------ VF evaluation


def sequential_scaling(
    policy,
    codec: StreamCodec,
    make_heldout_env: Callable[[BudgetConfig], object],
    budget: BudgetConfig,
    scales: list[float],
    num_problems: int,
    samples: int,
    generator: torch.Generator,
    rows: int,
) -> dict[str, list]:
    """One trial per sample with the budget scaled by each of ``scales``
    (:func:`metarl_llm.evaluation.curves.scale_budget`): ``success`` and ``tokens`` (mean policy
    tokens per trial) against the scale, on held-out problems 0..num_problems-1."""

    out: dict[str, list] = {"scale": [], "success": [], "tokens": []}
    resets, groups = heldout_resets(num_problems, samples)
    for s in scales:
        b = scale_budget(budget, s)
        envs = [make_heldout_env(b) for _ in range(min(rows, len(resets)))]
        trials: list[Trial] = []
        for lo in range(0, len(resets), rows):
            trials += run_trials(
                policy, codec, envs[: len(resets[lo : lo + rows])], resets[lo : lo + rows], groups[lo : lo + rows], b, generator
            )
        out["scale"].append(float(s))
        out["success"].append(float(np.mean([t.outcome for t in trials])))
        out["tokens"].append(float(np.mean([t.policy_tokens for t in trials])))
    return out


def run_vf(
    policy,
    tokenizer,
    codec: StreamCodec,
    make_env: Callable[[str], object],
    make_heldout_env: Callable[[BudgetConfig], object],
    budget: BudgetConfig,
    cfg: SFTConfig,
    seed: int,
    generator: torch.Generator,
    checkpointing: bool = False,
    log_fn=None,
) -> tuple[object, dict]:
    """``job=sft``: a verifier-free baseline fitted to ``policy``'s own samples.

    1. Sample ``cfg.samples_per_problem`` trials on each of ``cfg.num_train_problems``
       training problems (seeds from ``generator``).
    2. Build the data (``cfg.data``: :func:`star_records` or :func:`stitched_records`).
    3. :func:`sft_fit` for ``cfg.steps`` steps (trl SFTTrainer, loss on policy tokens).
    4. Held-out measurement of the fitted policy: max(n_values) trials on each of
       ``cfg.num_heldout_problems`` problems (maj@N, pass@N, mean outcome and tokens as
       N grows) and :func:`sequential_scaling` at ``cfg.budget_scales``.

    Returns (fitted policy, JSON-ready summary).
    """

    cfg.validate()
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
        counts = {
            "problems": cfg.num_train_problems,
            "traces": len(records),
            "problems_with_success": len({t.group for t in trials if t.outcome >= 1.0}),
        }
    else:
        records, counts = stitched_records(
            trials,
            make_env,
            codec,
            budget,
            {p: {"seed": int(sd)} for p, sd in enumerate(seeds)},
            cfg.traces_per_problem,
            cfg.n_failed_min,
            cfg.n_failed_max,
            np.random.default_rng(seed),
        )
    if not records:
        raise RuntimeError(
            f"sft.data={cfg.data}: no training record from {len(trials)} base-policy trials "
            f"(base success {base_success:.3f}; counts {counts}); sample more problems or use another base policy"
        )
    log.info("sft.data=%s: %d records from %d trials (%s)", cfg.data, len(records), len(trials), counts)
    t1 = time.perf_counter()
    losses = sft_fit(
        policy,
        tokenizer,
        records,
        cfg.steps,
        cfg.batch_size,
        cfg.lr,
        seed,
        "cosine",
        checkpointing,
        desc=f"SFT baseline ({cfg.data})",
    )
    t_fit = time.perf_counter() - t1
    policy = clean_model(policy)

    n_max = max(cfg.n_values)
    split_size = make_env("test").unwrapped.num_problems
    num_heldout = min(cfg.num_heldout_problems, split_size) if split_size is not None else cfg.num_heldout_problems
    h_resets, h_groups = heldout_resets(num_heldout, n_max)
    heldout, answer_scores = play_trials(policy, codec, make_env, "test", h_resets, h_groups, budget, generator, cfg.rollout_rows)
    parallel = best_of_n_trials(None, heldout, cfg.n_values, answer_scores)  # no verifier: no pick
    sequential = sequential_scaling(
        policy,
        codec,
        make_heldout_env,
        budget,
        list(cfg.budget_scales),
        num_heldout,
        cfg.sequential_samples,
        generator,
        cfg.rollout_rows,
    )
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
        scalars = {
            k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
        for i, n in enumerate(parallel["n"]):
            for key in ("maj_at_n", "pass_at_n", "mean_outcome", "tokens"):
                scalars[f"vf_parallel/{key}@{n}"] = parallel[key][i]
        for i, s in enumerate(sequential["scale"]):
            scalars[f"vf_sequential/success@{s:g}x"] = sequential["success"][i]
            scalars[f"vf_sequential/tokens@{s:g}x"] = sequential["tokens"][i]
        log_fn(scalars, cfg.steps)
    return policy, summary
