"""Run train.py for several seeds of one configuration and tabulate summary.json.

    python bench/seeds.py --name ppo_learns --seeds 0 1 2 -- env=planted_subseq bonus=none

Each seed runs as its own process (the same command a user types), one after the
other; results go to bench/results/<name>.csv and the console shows the table with
the mean and spread across seeds of the start and final held-out success.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIELDS = [
    "seed",
    "env",
    "bonus",
    "advantage",
    "iterations",
    "heldout_success_start",
    "heldout_success_final",
    "heldout_tokens_per_trial_start",
    "heldout_tokens_per_trial",
    "heldout_episodes_per_trial",
    "wall_time_s",
    "rollout_tokens_per_s",
    "update_tokens_per_s",
    "warm_start_cached",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="results file stem under bench/results/")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out-root", default=str(ROOT / "outputs" / "bench"), help="run directories go here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides passed to train.py")
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        run_dir = Path(args.out_root) / f"{args.name}_s{seed}_{int(time.time())}"
        cmd = [
            sys.executable,
            str(ROOT / "train.py"),
            f"seed={seed}",
            f"out_dir={run_dir}",
            "logger.progress_bar=false",
            *args.overrides,
        ]
        print("$", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        summary = json.loads((run_dir / "summary.json").read_text())
        summary["process_wall_s"] = time.perf_counter() - t0
        rows.append(summary)
        print(
            f"seed {seed}: start {summary['heldout_success_start']:.3f} -> final {summary['heldout_success_final']:.3f} "
            f"({summary['process_wall_s']:.0f} s)",
            flush=True,
        )
    out = ROOT / "bench" / "results" / f"{args.name}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS + ["process_wall_s", "overrides"])
        w.writeheader()
        for r in rows:
            w.writerow(
                {
                    **{k: r.get(k) for k in FIELDS},
                    "process_wall_s": round(r["process_wall_s"], 1),
                    "overrides": " ".join(args.overrides),
                }
            )
    for key in ("heldout_success_start", "heldout_success_final"):
        vals = [r[key] for r in rows]
        spread = max(vals) - min(vals)
        print(f"{key}: mean {statistics.mean(vals):.3f}, range {min(vals):.3f}-{max(vals):.3f} (spread {spread:.3f})")
    gains = [r["heldout_success_final"] - r["heldout_success_start"] for r in rows]
    print(f"gain: {' '.join(f'{g:+.3f}' for g in gains)}; wrote {out}")


if __name__ == "__main__":
    main()
