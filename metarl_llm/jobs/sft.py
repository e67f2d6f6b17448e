"""``job=sft`` (old spelling ``algo=sft``): warm-start the base policy as PPO would, then the
verifier-free baseline (SFT on its own rejection-sampled or stitched trials) and its held-out
measurement.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

import envs  # noqa: F401  (registers the environments)
from metarl_llm.config import TrainConfig
from metarl_llm.jobs.common import base_diagnostics, base_policy, job_tracker, start_job
from metarl_llm.runtime.setup import heldout_env_maker
from metarl_llm.sft.vf import run_vf

log = logging.getLogger(__name__)


def train_sft_job(cfg: TrainConfig, run_dir: Path, wandb_group: str | None = None) -> dict:
    """``job=sft``: warm-start the base policy as PPO would, log its diagnostics, then the
    verifier-free baseline of ``cfg.sft`` (metarl_llm.sft.vf.run_vf): SFT on its own
    rejection-sampled or stitched trials and the held-out measurement. Writes the fitted
    policy to ``policy/``, ``vf_summary.json``, metrics.jsonl and summary.json."""

    t_start = time.perf_counter()
    device = start_job(cfg, run_dir)
    policy, tokenizer, codec, make_env, ws_info = base_policy(cfg, device)
    tracker = job_tracker(cfg, run_dir, wandb_group)
    diag = base_diagnostics(cfg, policy, codec, make_env, tracker.log)
    policy, result = run_vf(
        policy,
        tokenizer,
        codec,
        make_env,
        heldout_env_maker(cfg),
        cfg.budget,
        cfg.sft,
        cfg.seed,
        torch.Generator().manual_seed(cfg.seed),
        cfg.model.gradient_checkpointing,
        tracker.log,
    )
    policy.save_pretrained(run_dir / "policy")
    tokenizer.save_pretrained(run_dir / "policy")
    (run_dir / "vf_summary.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    summary = {
        "env": cfg.env.name,
        "algo": "sft",
        "seed": cfg.seed,
        **diag,
        **result,
        "warm_start_cached": bool(ws_info.get("warm_start/cached", False)),
        "policy_dir": str(run_dir / "policy"),
        "wall_time_s": time.perf_counter() - t_start,
    }
    tracker.finish(summary)
    log.info(
        "sft (%s): %d records, held-out success %.3f; maj@N %s",
        cfg.sft.data,
        result["sft/records"],
        result["heldout/success"],
        result["parallel"]["maj_at_n"],
    )
    return summary
