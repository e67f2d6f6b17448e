"""Why bench/heterogeneity_dial.py reads about p(1 - p) at every level (issue 20): how often the
warm-started base's first episode commits its answer, and J after the first episodes that do not.

    python bench/heterogeneity_dial.py --keep /tmp/dial_keep     # first: the warm starts, kept
    python bench/heterogeneity_probe.py /tmp/dial_keep --levels 0 1 --seed 0

For each level, the seed's warm start is loaded from the kept cache (the same key the dial's run
used) and the default diagnostics are played again (the same trials and J values as the dial's
run): printed are the share of trials whose first episode commits the answer, the share of J
values after the first episode at exactly 0, exactly 1 and between, and the mean J after the
first episodes that are failed chunks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from metarl_llm.evaluation.diagnostics import policy_diagnostics
from metarl_llm.jobs.common import base_policy, start_job
from metarl_llm.rollout.engine import engine_from_config
from metarl_llm.runtime.setup import compose_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cache_dir", type=Path, help="the warm-start cache the dial kept (--keep)")
    ap.add_argument("--levels", nargs="+", type=float, default=[0.0, 1.0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for h in args.levels:
        cfg = compose_config(
            [
                "env=planted_subseq",
                f"env.expert_heterogeneity={h}",
                f"seed={args.seed}",
                f"warm_start.cache_dir={args.cache_dir}",
                "threads=2",
                "logger.mode=disabled",
            ]
        )
        device = start_job(cfg, args.cache_dir / "probe", write=False)
        policy, _, codec, make_env, info = base_policy(cfg, device)
        d = cfg.diagnostics
        pool = [make_env("test") for _ in range(d.num_problems * d.num_continuations)]
        out = policy_diagnostics(
            policy,
            codec,
            pool,
            cfg.budget,
            d.num_problems,
            d.num_continuations,
            d.num_rollouts,
            d.margin,
            torch.Generator().manual_seed(cfg.seed),
            engine_from_config(cfg.rollout),
        )
        v = out.values.flatten()
        failed_first = np.array([t.answer_episode != 0 for t in out.trials])
        print(
            f"h={h}: warm start cached {info.get('warm_start/cached')}; heterogeneity {out.metrics['heterogeneity']:.4f}, "
            f"success {out.metrics['success']:.3f}; first episode commits the answer in {1 - failed_first.mean():.3f} of "
            f"trials; J after it 0 / 1 / between: {np.mean(v == 0):.3f} / {np.mean(v == 1):.3f} / "
            f"{np.mean((v > 0) & (v < 1)):.3f}; first episode a failed chunk: {int(failed_first.sum())} trials, "
            f"mean J after it {v[failed_first].mean():.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
