"""Resident memory over a long run: does anything grow (logging, caches, transcripts)?

    python bench/long_run.py --iterations 200 [hydra overrides ...]

Runs ``train.py`` on the default tiny settings for ``--iterations`` iterations (held-out
evaluation every ``eval.every`` iterations as by default) and reads the per-iteration
resident set size the trainer logs (``perf/rss_mb``, the process's current RSS). Writes
bench/results/long_run.json and long_run_table.md: RSS after the first 10 iterations
(the baseline, once every lazily built structure exists), the peak, the final value and
the growth final / baseline - 1 (the target is under 5%), plus the RSS every 20 iterations.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--baseline-iteration", type=int, default=10)
    parser.add_argument("--out-root", default=str(ROOT / "outputs" / "bench" / "long_run"))
    parser.add_argument("--results-dir", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--name", default="long_run")
    parser.add_argument("--timeout", type=int, default=7200)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    run = Path(args.out_root) / time.strftime("%Y%m%d-%H%M%S")
    overrides = [f"algo.iterations={args.iterations}", "logger.progress_bar=false", "device=cpu", "threads=1", *args.overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "train.py", *overrides, f"out_dir={run}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=args.timeout,
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"train.py failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rss = {r["iteration"]: r["perf/rss_mb"] for r in rows if "perf/rss_mb" in r}
    its = sorted(rss)
    base = rss[args.baseline_iteration]
    result = {
        "command": " ".join(["bench/long_run.py", *(argv if argv is not None else sys.argv[1:])]),
        "overrides": overrides,
        "seconds": seconds,
        "iterations": len(its),
        "rss_mb_baseline": base,
        "baseline_iteration": args.baseline_iteration,
        "rss_mb_peak": max(rss.values()),
        "rss_mb_final": rss[its[-1]],
        "growth_final_vs_baseline": rss[its[-1]] / base - 1,
        "growth_peak_vs_baseline": max(rss.values()) / base - 1,
        "rss_mb_first": rss[its[0]],
        "rss_mb_by_iteration": rss,
    }
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    every = [i for i in its if i % 20 == 0 or i in (its[0], args.baseline_iteration)]
    lines = [
        f"Resident memory of `train.py {' '.join(overrides)}` ({len(its)} iterations, {seconds:.0f} s).",
        "",
        f"Baseline (iteration {args.baseline_iteration}): {base:.1f} MB; peak {result['rss_mb_peak']:.1f} MB; "
        f"final {result['rss_mb_final']:.1f} MB; growth final/baseline {100 * result['growth_final_vs_baseline']:+.2f}%, "
        f"peak/baseline {100 * result['growth_peak_vs_baseline']:+.2f}% (target: under 5%).",
        "",
        "| iteration | RSS (MB) |",
        "| --- | --- |",
    ] + [f"| {i} | {rss[i]:.1f} |" for i in every]
    (out / f"{args.name}_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
