"""The first run a new user makes: ``python train.py`` (the defaults), from an empty
warm-start cache, for several seeds and thread counts.

    python bench/main_job.py                       # seeds 0..4 at 1 and 2 threads
    python bench/main_job.py --seeds 0 1 --threads 2

Each run is the command a user types, as its own process, with a fresh
``warm_start.cache_dir`` (so the warm start is trained, never loaded) and
``OMP_NUM_THREADS`` / ``threads`` set to the thread count (thread count changes float
summation order, so results differ with it). Runs go one after the other (two cores:
concurrent jobs would slow each other several times). Results: one row per run in
bench/results/main_job.csv (rows of the same seed and thread count are replaced) and
the table bench/results/main_job.md, with the held-out success of the warm-started
model (start) and after PPO (final), and the pass mark ``--target`` (0.6).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
FIELDS = [
    "seed",
    "threads",
    "heldout_success_start",
    "heldout_success_final",
    "heldout_episodes_per_trial",
    "heldout_tokens_per_trial",
    "wall_time_s",
    "warm_start_cached",
]


def run_one(seed: int, threads: int, out_root: Path, overrides: list[str]) -> dict:
    cache = Path(tempfile.mkdtemp(prefix="metarl-main-job-cache-"))
    run_dir = out_root / f"main_job_s{seed}_t{threads}_{int(time.time())}"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        f"seed={seed}",
        f"threads={threads}",
        f"out_dir={run_dir}",
        f"warm_start.cache_dir={cache}",
        "logger.mode=disabled",
        "logger.progress_bar=false",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    print(f"[main_job] seed {seed}, {threads} thread(s): {' '.join(cmd[1:])}", flush=True)
    try:
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    row = {k: summary[k] for k in FIELDS if k in summary}
    row.update(seed=seed, threads=threads)
    print(
        f"[main_job] seed {seed}, {threads} thread(s): held-out success {row['heldout_success_start']:.3f} -> "
        f"{row['heldout_success_final']:.3f} in {row['wall_time_s']:.0f} s",
        flush=True,
    )
    return row


def write_table(rows: list[dict], target: float) -> str:
    lines = [
        "| threads | seed | held-out success start | final | episodes/trial | tokens/trial | wall time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (int(r["threads"]), int(r["seed"]))):
        lines.append(
            f"| {r['threads']} | {r['seed']} | {float(r['heldout_success_start']):.3f} | "
            f"{float(r['heldout_success_final']):.3f} | {float(r['heldout_episodes_per_trial']):.2f} | "
            f"{float(r['heldout_tokens_per_trial']):.1f} | {float(r['wall_time_s']):.0f} |"
        )
    finals = [float(r["heldout_success_final"]) for r in rows]
    lines.append("")
    lines.append(
        f"{sum(f >= target for f in finals)} of {len(finals)} runs end at {target} or more; final success "
        f"min {min(finals):.3f}, median {statistics.median(finals):.3f}, max {max(finals):.3f}."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--target", type=float, default=0.6, help="the final held-out success every run should reach")
    parser.add_argument("--out-root", default=str(ROOT / "outputs" / "bench"), help="run directories go here")
    parser.add_argument("--name", default="main_job", help="results file stem under bench/results/")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides passed to train.py (none: the defaults)")
    args = parser.parse_args()
    csv_path = RESULTS / f"{args.name}.csv"
    rows = []
    if csv_path.exists():  # keep the other seeds' and thread counts' rows
        with csv_path.open() as f:
            rows = list(csv.DictReader(f))
    for threads in args.threads:
        for seed in args.seeds:
            new = run_one(seed, threads, Path(args.out_root), args.overrides)
            rows = [r for r in rows if (int(r["seed"]), int(r["threads"])) != (seed, threads)] + [new]
            RESULTS.mkdir(parents=True, exist_ok=True)
            with csv_path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=FIELDS)
                writer.writeheader()
                writer.writerows(sorted(rows, key=lambda r: (int(r["threads"]), int(r["seed"]))))
            table = write_table(rows, args.target)
            (RESULTS / f"{args.name}.md").write_text(
                f"`python train.py` (the defaults{', ' + ' '.join(args.overrides) if args.overrides else ''}) from an "
                f"empty warm-start cache; `python bench/main_job.py`.\n\n{table}"
            )
    print(table)


if __name__ == "__main__":
    main()
