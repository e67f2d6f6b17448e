"""``job=train_verifier`` (old spelling ``algo=verifier``): warm-start the base policy as PPO
would, then train a verifier on its trials and measure best-of-N.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

import envs  # noqa: F401  (registers the environments)
from metarl_llm.config import TrainConfig
from metarl_llm.jobs.common import base_diagnostics, base_policy, job_tracker, start_job
from metarl_llm.verify.model import build_verifier
from metarl_llm.verify.train import run_verifier_training

log = logging.getLogger(__name__)


def train_verifier_job(cfg: TrainConfig, run_dir: Path, wandb_group: str | None = None) -> dict:
    """``job=train_verifier``: warm-start the base policy as PPO would, then train a verifier on
    its trials and measure best-of-N (metarl_llm.verify.train.run_verifier_training). Writes
    ``verifier/`` (usable as ``bonus.estimator=verifier bonus.verifier=RUN/verifier``),
    ``best_of_n.png``, ``verifier_summary.json``, metrics.jsonl and summary.json."""

    t_start = time.perf_counter()
    device = start_job(cfg, run_dir)
    policy, tokenizer, codec, make_env, ws_info = base_policy(cfg, device)
    v = cfg.verifier
    verifier = build_verifier(
        tokenizer,
        v.name_or_path,
        policy=policy,
        tiny=v.tiny,
        seed=cfg.seed,
        dtype=v.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
    ).to(device)
    tracker = job_tracker(cfg, run_dir, wandb_group)
    diag = base_diagnostics(cfg, policy, codec, make_env, tracker.log)
    result = run_verifier_training(
        policy,
        codec,
        make_env,
        verifier,
        cfg.budget,
        v,
        torch.Generator().manual_seed(cfg.seed),
        run_dir,
        tracker.log,
        cfg.logger.progress_bar,
    )
    tracker.image("verifier/best_of_n", Path(result["best_of_n_plot"]), step=v.steps)
    summary = {
        "env": cfg.env.name,
        "algo": "verifier",
        "seed": cfg.seed,
        **diag,
        **result,
        "warm_start_cached": bool(ws_info.get("warm_start/cached", False)),
        "wall_time_s": time.perf_counter() - t_start,
    }
    tracker.finish(summary)
    log.info(
        "verifier: held-out accuracy %.3f, ECE %.3f; best-of-N %s",
        summary.get("heldout/accuracy", float("nan")),
        summary.get("heldout/ece", float("nan")),
        result["best_of_n"].get("best_of_n"),
    )
    return summary
