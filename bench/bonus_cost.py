"""Per-iteration wall time of each progress-bonus arm relative to outcome-only.

    python bench/bonus_cost.py --env math --iterations 12 --reps 3

For each repetition, the arms run one after the other (interleaved, so slow phases of
a shared machine hit every arm), each as its own ``train.py`` process with the same
seed, threads and a warm start from the cache (the first repetition fills it). The
figure is the median of ``perf/iteration_s`` (rollout, scoring, bonus, update; the
held-out evaluation is not inside it) over the iterations after the first, then the
ratio arm / none within each repetition; the table gives the median ratio and its range.
A second figure, immune to a neighbour's load changing between runs: within every
iteration, its time over its time less ``perf/bonus_s`` (the J estimation), median.
Results go to ``bench/results/bonus_cost_<env>.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARMS = {
    "none": ["bonus=none"],
    "info_gain/likelihood": ["bonus=info_gain", "bonus.estimator=likelihood"],
    "info_gain/sample": ["bonus=info_gain", "bonus.estimator=sample"],
    "info_gain/verifier": ["bonus=info_gain", "bonus.estimator=verifier"],
}


def iteration_times(run_dir: Path) -> tuple[list[float], list[float]]:
    """``perf/iteration_s`` and ``perf/bonus_s`` of every training iteration in the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "perf/iteration_s" in r]
    return [r["perf/iteration_s"] for r in rows], [r["perf/bonus_s"] for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="math")
    parser.add_argument("--arms", nargs="+", default=["none", "info_gain/likelihood", "info_gain/sample"], choices=sorted(ARMS))
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-root", default=str(ROOT / "outputs" / "bench" / "bonus_cost"))
    parser.add_argument(
        "--reuse", action="store_true", help="read runs that already finished (summary.json) instead of rerunning them"
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every arm")
    args = parser.parse_args()
    if "none" not in args.arms:
        raise SystemExit("--arms must include none (the reference of the ratios)")
    medians: dict[str, list[float]] = {a: [] for a in args.arms}
    within: dict[str, list[float]] = {a: [] for a in args.arms}  # per run: median of iteration_s / (iteration_s - bonus_s)
    for rep in range(args.reps):
        for arm in args.arms:
            run_dir = Path(args.out_root) / args.env / arm.replace("/", "_") / f"rep{rep}"
            cmd = [
                sys.executable,
                str(ROOT / "train.py"),
                f"env={args.env}",
                *ARMS[arm],
                f"seed={args.seed}",
                f"algo.iterations={args.iterations}",
                f"threads={args.threads}",
                f"out_dir={run_dir}",
                "eval.every=0",
                "eval.num_problems=8",
                "eval.samples_per_problem=2",
                "checkpoint_every=0",
                "logger.progress_bar=false",
                "logger.mode=disabled",
                *args.overrides,
            ]
            if not (args.reuse and (run_dir / "summary.json").exists()):
                print("$", " ".join(cmd), flush=True)
                subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times, bonus = (x[1:] for x in iteration_times(run_dir))  # the first iteration warms caches up
            medians[arm].append(statistics.median(times))
            within[arm].append(statistics.median(t / (t - b) for t, b in zip(times, bonus)))
            print(f"rep {rep} {arm}: median {medians[arm][-1]:.3f} s/iteration over {len(times)} iterations", flush=True)
    out = ROOT / "bench" / "results" / f"bonus_cost_{args.env}.csv"
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["env", "arm", "rep", "iteration_s_median", "ratio_to_none", "iteration_over_no_bonus_median"])
        for arm in args.arms:
            for rep, m in enumerate(medians[arm]):
                w.writerow([args.env, arm, rep, round(m, 4), round(m / medians["none"][rep], 3), round(within[arm][rep], 3)])
    print(f"\n{args.env}: per-iteration wall time relative to none (median over {args.reps} repetitions, range)")
    for arm in args.arms:
        ratios = [m / n for m, n in zip(medians[arm], medians["none"])]
        print(
            f"  {arm:22s} {statistics.median(medians[arm]):7.3f} s/it  x{statistics.median(ratios):.2f} "
            f"({min(ratios):.2f}-{max(ratios):.2f}); within an iteration, with / without the bonus: "
            f"x{statistics.median(within[arm]):.2f}"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
