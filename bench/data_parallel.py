"""Two processes through accelerate against one process, on the same global batch.

    python bench/data_parallel.py --iterations 5 [hydra overrides ...]

Runs ``train.py`` twice with the same overrides and seed: once as a plain process, once
as ``accelerate launch --multi_gpu --num_processes 2 train.py device=cpu`` (two gloo CPU
processes started by torchrun; each process plays half of
the problems and takes its share of every minibatch; see metarl_llm/distributed.py).
Every process draws the same global random numbers, so both runs see the same trials
and should log the same per-iteration metrics up to float reduction order. Writes
bench/results/data_parallel.json and data_parallel_table.md: per iteration, the
metrics of both runs and their largest absolute difference, plus the wall time of
each run and the run directories (one per launch: the second process writes nothing).
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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from metarl_llm.runtime.distributed import RUN_TIME_ENV

COMPARED = (
    "train/outcome",
    "train/tokens_per_trial",
    "train/loss/policy",
    "train/loss/value",
    "train/loss/kl",
    "train/entropy",
    "train/grad_norm",
    "train/approx_kl",
    "train/clipfrac",
    "train/kl_ref",
)
QUICK = [
    "algo.problems_per_iter=4",
    "algo.group_size=4",
    "algo.minibatch_size=8",
    "warm_start.steps=0",
    "eval.num_problems=2",
    "eval.samples_per_problem=1",
    "eval.every=0",
    "eval.extrapolation=false",
    "eval.adaptation=false",
    "logger.mode=disabled",
    "logger.progress_bar=false",
    "checkpoint_every=0",
    "device=cpu",
    "threads=1",
]


def run(cmd: list[str], out_dir: Path, overrides: list[str], timeout: int) -> tuple[list[dict], float]:
    """Run ``cmd`` (train.py and its launcher) into ``out_dir``; its metrics.jsonl rows with a train/ metric."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    env.pop(RUN_TIME_ENV, None)  # each launch names its own run time
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*cmd, *overrides, f"out_dir={out_dir}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/outcome" in r], seconds


def compare(single: list[dict], multi: list[dict]) -> list[dict]:
    """Per iteration: both runs' compared metrics and their largest absolute difference."""
    if [r["iteration"] for r in single] != [r["iteration"] for r in multi]:
        raise RuntimeError(f"iterations differ: {[r['iteration'] for r in single]} vs {[r['iteration'] for r in multi]}")
    out = []
    for a, b in zip(single, multi):
        keys = [k for k in COMPARED if k in a and k in b and a[k] is not None and b[k] is not None]
        diffs = {k: abs(a[k] - b[k]) for k in keys}
        out.append(
            {
                "iteration": a["iteration"],
                "single": {k: a[k] for k in keys},
                "two_process": {k: b[k] for k in keys},
                "abs_diff": diffs,
                "max_abs_diff": max(diffs.values()) if diffs else float("nan"),
            }
        )
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--out-root", default=str(ROOT / "outputs" / "bench" / "data_parallel"))
    parser.add_argument("--results-dir", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--name", default="data_parallel")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run (a bound on each subprocess)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both runs")
    args = parser.parse_args(argv)
    overrides = [*QUICK, f"algo.iterations={args.iterations}", *args.overrides]
    root = Path(args.out_root) / time.strftime("%Y%m%d-%H%M%S")
    single, t_single = run([sys.executable, "train.py"], root / "single", overrides, args.timeout)
    # accelerate 1.x starts CPU worker processes through torchrun only on its --multi_gpu path
    # (its --cpu path runs one process unless MPI is set up); device=cpu makes them gloo CPU workers.
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    multi, t_multi = run([*launcher, "train.py"], root / "two_process", overrides, args.timeout)
    rows = compare(single, multi)
    result = {
        "command": " ".join(["bench/data_parallel.py", *(argv if argv is not None else sys.argv[1:])]),
        "overrides": overrides,
        "seconds_single": t_single,
        "seconds_two_process": t_multi,
        "run_dirs": sorted(str(p) for p in root.iterdir()),
        "iterations": rows,
        "max_abs_diff": max(r["max_abs_diff"] for r in rows),
    }
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"Single process vs `accelerate launch --multi_gpu --num_processes 2` (device=cpu: 2 gloo CPU processes), same global batch "
        f"({' '.join(overrides)}). Wall time: {t_single:.0f} s vs {t_multi:.0f} s (both including start-up and evaluation; the first run also trains the warm start when it is not cached yet, the second loads it).",
        "",
        "| iteration | metric | 1 process | 2 processes | abs diff |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        for k in r["single"]:
            lines.append(
                f"| {r['iteration']} | {k} | {r['single'][k]:.6g} | {r['two_process'][k]:.6g} | {r['abs_diff'][k]:.2e} |"
            )
    lines.append(f"\nLargest absolute difference over all iterations and metrics: {result['max_abs_diff']:.2e}.")
    (out / f"{args.name}_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
