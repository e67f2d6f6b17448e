"""SIGKILL a training run at random moments, resume it, and compare with an uninterrupted run.

    python bench/kill_resume.py --kills 6 --save-kills 2 [hydra overrides ...]

1. A reference run of ``train.py`` (the overrides below, to completion).
2. The same run in another directory, killed with SIGKILL ``--kills`` times: at random
   moments (seeded), and ``--save-kills`` of them while a checkpoint is being written
   (the kill fires as soon as a ``checkpoints/.tmp_iter_*`` directory appears). After
   each kill the run is relaunched with ``resume=auto`` into the same directory, until it
   finishes.
3. The per-iteration metrics (metrics.jsonl without the ``perf/`` timings) and the
   summary figures of both runs are compared for exact equality, and the W&B run ids
   of all launches of the killed run are checked to be one id.

Writes bench/results/kill_resume.json and kill_resume_table.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = [
    "algo.iterations=12",
    "checkpoint_every=2",
    "checkpoint_keep=2",
    "eval.num_problems=8",
    "eval.samples_per_problem=2",
    "eval.every=4",
    "eval.extrapolation=false",
    "logger.progress_bar=false",
    "device=cpu",
    "threads=1",
    "warm_start.seed=0",
]
TIMING_KEYS = ("wall_time_s", "final_eval_s", "rollout_tokens_per_s", "update_tokens_per_s", "warm_start_cached")


def launch(out_dir: Path, overrides: list[str], log) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "train.py", *overrides, f"out_dir={out_dir}"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def rows_of(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "warm_start/cached"} for r in rows]


def last_iteration(run: Path) -> int:
    try:
        its = [json.loads(x).get("iteration", 0) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return max(its, default=0)


def wandb_ids(run: Path) -> list[str]:
    return sorted({p.name.rsplit("-", 1)[-1] for p in (run / "wandb").glob("offline-run-*")})


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=6, help="SIGKILLs in all (including --save-kills)")
    parser.add_argument("--save-kills", type=int, default=2, help="kills fired while a checkpoint is being written")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill times")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds any single launch may run (a bound)")
    parser.add_argument("--out-root", default=str(ROOT / "outputs" / "bench" / "kill_resume"))
    parser.add_argument("--results-dir", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--name", default="kill_resume")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    overrides = [*DEFAULTS, *args.overrides]
    root = Path(args.out_root) / time.strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True)
    rng = random.Random(args.seed)

    # 1. reference
    with open(root / "reference.log", "w") as log:
        t0 = time.perf_counter()
        proc = launch(root / "reference", overrides, log)
        if proc.wait(timeout=args.timeout) != 0:
            raise RuntimeError(f"the reference run failed; see {root / 'reference.log'}")
        t_ref = time.perf_counter() - t0
    iterations = json.loads((root / "reference" / "summary.json").read_text())["iterations"]

    # 2. killed and resumed
    run = root / "killed"
    plan = ["save"] * args.save_kills + ["random"] * (args.kills - args.save_kills)
    rng.shuffle(plan)
    kills, launches = [], 0
    with open(root / "killed.log", "w") as log:
        while True:
            launches += 1
            if launches > args.kills + 5:
                raise RuntimeError("the killed run did not finish within kills + 5 launches")
            proc = launch(run, overrides + (["resume=auto"] if launches > 1 else []), log)
            started, wall_start = time.perf_counter(), time.time()
            kind = plan[len(kills)] if len(kills) < len(plan) else None
            # A random moment within the run's remaining expected time (at least 5 s in: past start-up).
            remaining = max(t_ref * (1 - last_iteration(run) / iterations), 10.0)
            at = started + 5.0 + rng.random() * max(remaining - 5.0, 1.0)
            killed = None
            while proc.poll() is None:
                if time.perf_counter() - started > args.timeout:
                    proc.kill()
                    raise RuntimeError("a launch exceeded --timeout")
                # A save of this launch (a killed launch's leftover is removed when the next one resumes).
                saving = (
                    [p for p in (run / "checkpoints").glob(".tmp_iter_*") if p.stat().st_mtime >= wall_start]
                    if (run / "checkpoints").exists()
                    else []
                )
                if kind == "save" and saving:
                    killed = {"kind": "during checkpoint save", "writing": saving[0].name}
                elif kind == "random" and time.perf_counter() >= at:
                    killed = {"kind": "random moment", "writing": saving[0].name if saving else None}
                if killed:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    pointer = run / "checkpoints" / "latest"
                    killed.update(
                        seconds_into_launch=round(time.perf_counter() - started, 2),
                        last_logged_iteration=last_iteration(run),
                        latest_checkpoint=pointer.read_text() if pointer.exists() else None,
                    )
                    kills.append(killed)
                    print(f"kill {len(kills)}: {killed}", flush=True)
                    break
                time.sleep(0.005 if kind == "save" else 0.05)
            if killed is None:
                if proc.returncode != 0:
                    raise RuntimeError(f"launch {launches} failed ({proc.returncode}); see {root / 'killed.log'}")
                if kind is not None:  # the run finished before this kill could fire: next launch starts over
                    print(f"launch {launches} finished before its {kind} kill fired", flush=True)
                break

    # 3. compare
    ref_rows, run_rows = rows_of(root / "reference"), rows_of(run)
    ref_sum = {k: v for k, v in json.loads((root / "reference" / "summary.json").read_text()).items() if k not in TIMING_KEYS}
    run_sum = {k: v for k, v in json.loads((run / "summary.json").read_text()).items() if k not in TIMING_KEYS}
    differing = [r["iteration"] for r, s in zip(ref_rows, run_rows) if r != s]
    result = {
        "command": " ".join(["bench/kill_resume.py", *(argv if argv is not None else sys.argv[1:])]),
        "overrides": overrides,
        "reference_seconds": t_ref,
        "launches": launches,
        "kills": kills,
        "metrics_rows": [len(ref_rows), len(run_rows)],
        "identical_metrics": ref_rows == run_rows,
        "differing_iterations": differing,
        "identical_summary": ref_sum == run_sum,
        "summary_differences": sorted(k for k in ref_sum if ref_sum.get(k) != run_sum.get(k)),
        "wandb_run_ids": wandb_ids(run),
        "one_wandb_run": len(wandb_ids(run)) == 1,
        "compared": "every metrics.jsonl row (train/*, heldout/*, warm_start/*; not perf/* timings), and summary.json without timings",
    }
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"SIGKILL and `resume=auto` against an uninterrupted run ({' '.join(overrides)}).",
        "",
        f"{len(kills)} kills over {launches} launches; reference run {t_ref:.0f} s.",
        "",
        "| kill | kind | seconds into launch | last logged iteration | `latest` at kill | checkpoint being written |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for k, x in enumerate(kills, 1):
        lines.append(
            f"| {k} | {x['kind']} | {x['seconds_into_launch']} | {x['last_logged_iteration']} | "
            f"{x['latest_checkpoint']} | {x['writing']} |"
        )
    lines += [
        "",
        f"Metrics rows: {len(ref_rows)} vs {len(run_rows)}; identical: **{result['identical_metrics']}** "
        f"(differing iterations: {differing or 'none'}). Summary identical (timings aside): "
        f"**{result['identical_summary']}** {result['summary_differences'] or ''}. W&B run ids of the killed run's "
        f"launches: {result['wandb_run_ids']}.",
    ]
    (out / f"{args.name}_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
