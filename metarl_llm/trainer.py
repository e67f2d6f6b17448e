"""The entry point of ``python train.py``: :func:`train` runs the job ``cfg.algo.name`` selects.

- ``ppo`` / ``grpo``: warm start, then PPO over multi-episode trials (:mod:`metarl_llm.jobs.ppo`);
- ``verifier``: train a verifier on the base policy's trials, best-of-N (:mod:`metarl_llm.jobs.verifier`);
- ``sft``: the verifier-free baselines, SFT on the base policy's own trials (:mod:`metarl_llm.jobs.sft`).

The package is layered (README "Layout"): config and core at the bottom, then models and
runtime, rollout and verify, rl and arc, evaluation, sft, jobs, and this module on top;
imports only go down (tests/project/test_layering.py).
"""

from __future__ import annotations

from pathlib import Path

from metarl_llm.config import TrainConfig
from metarl_llm.jobs.ppo import train_ppo_job
from metarl_llm.jobs.sft import train_sft_job
from metarl_llm.jobs.verifier import train_verifier_job

JOBS = {"ppo": train_ppo_job, "grpo": train_ppo_job, "verifier": train_verifier_job, "sft": train_sft_job}


def train(cfg: TrainConfig, run_dir: Path, wandb_group: str | None = None) -> dict:
    """Run the job ``cfg.algo.name`` selects in ``run_dir`` (``wandb_group``: the W&B group of a
    sweep's runs); returns its summary (summary.json)."""
    if cfg.algo.name not in JOBS:
        raise ValueError(f"algo.name={cfg.algo.name!r}; expected one of {sorted(JOBS)}")
    return JOBS[cfg.algo.name](cfg, Path(run_dir), wandb_group)
