"""What the progress bonus buys: arms x environments x seeds at equal training compute.

    python bench/learning.py --envs math planted_subseq --seeds 0 1 2 --workers 2

Every (env, arm, seed) is one ``train.py`` process (the command a user types) with the
same iterations, problems per iteration and trials per problem, so every arm trains on
the same number of rollout trials; the bonus arms spend extra compute on J, which the
table reports as wall time. Arms (``--arms``, or your own with ``--arm name=override,...``):

- ``none``:                  outcome-only PPO (``bonus=none``);
- ``info_gain/sample``:      MRT bonus, J from sampled meta-prover answers;
- ``info_gain/likelihood``:  MRT bonus, J teacher-forced;
- ``info_gain/likelihood/return``: the same bonus placed in the reward (``bonus.credit=return``)
  instead of on each episode's own advantages: with gamma = lambda = 1 it telescopes to
  alpha * J_last, the control for what per-episode credit buys.

Per run, summary.json gives held-out success, regret at the training budget, tokens to
success, success at 0.5x/1x/2x/4x the training budget and the held-out
success-versus-tokens curve. Token efficiency of an arm is, per seed, the ratio
tokens_none / tokens_arm to reach a common success level on those curves
(:func:`metarl_llm.evaluation.curves.token_efficiency_ratio`); above 1 means the arm needs fewer.
The curve starts at the meta-prover's success right after the prompt, so where a forced
answer straight away already reaches the level, both arms need 0 tokens and the ratio
is 1. A second, plainer figure: ``tokens_per_trial_ratio_vs_none``, the tokens a
held-out trial of ``none`` spends over those of the arm, read beside
``success_minus_none``.

Runs that already have a summary.json are reused (the benchmark resumes). The first
pass runs the ``none`` arm of every (env, seed), so the warm start of each is trained
once and then read from the cache by the other arms. Results: a CSV per run,
an aggregate table (mean, std, min, max across seeds) and a plot, under bench/results/.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from metarl_llm.evaluation.curves import token_efficiency_ratio

ARMS = {
    "none": ["bonus=none"],
    "info_gain/sample": ["bonus=info_gain", "bonus.estimator=sample"],
    "info_gain/likelihood": ["bonus=info_gain", "bonus.estimator=likelihood"],
    "info_gain/likelihood/return": ["bonus=info_gain", "bonus.estimator=likelihood", "bonus.credit=return"],
}
BUDGET_SCALES = ("0.5", "1", "2", "4")


def run_dir_of(root: Path, env: str, arm: str, seed: int) -> Path:
    return root / env / arm.replace("/", "_") / f"seed{seed}"


def launch(root: Path, env: str, arm: str, seed: int, overrides: list[str], threads: int, extra: list[str]) -> dict:
    """Run (or reuse) one training run; return its summary with the run's timing added."""
    run_dir = run_dir_of(root, env, arm, seed)
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        cmd = [
            sys.executable,
            str(ROOT / "train.py"),
            f"env={env}",
            *overrides,
            f"seed={seed}",
            f"out_dir={run_dir}",
            f"threads={threads}",
            "logger.progress_bar=false",
            *extra,
        ]
        print("$", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        log = run_dir.parent / f"seed{seed}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as f:
            res = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        if res.returncode != 0:
            raise RuntimeError(f"{env}/{arm}/seed {seed} failed (exit {res.returncode}); see {log}")
        print(f"done {env} {arm} seed {seed} in {time.perf_counter() - t0:.0f} s", flush=True)
    summary = json.loads(summary_path.read_text())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    its = [r for r in rows if "perf/iteration_s" in r]
    summary["iteration_s_median"] = statistics.median(r["perf/iteration_s"] for r in its) if its else float("nan")
    # the iteration's time over its time without the bonus, within each iteration (same process, same moment)
    summary["iteration_over_no_bonus_median"] = (
        statistics.median(r["perf/iteration_s"] / (r["perf/iteration_s"] - r["perf/bonus_s"]) for r in its)
        if its
        else float("nan")
    )
    summary["run_dir"] = str(run_dir)
    return summary


def stats(values: list[float]) -> str:
    vals = [v for v in values if v is not None and np.isfinite(v)]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f} [{min(vals):.3f}, {max(vals):.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=["math", "planted_subseq"])
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--arm", action="append", default=[], help="extra arm: name=override,override,...")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2, help="runs at once")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: cores // workers)")
    parser.add_argument("--name", default="learning", help="stem of the result files under bench/results/")
    parser.add_argument("--out-root", default=str(ROOT / "outputs" / "bench" / "learning"))
    parser.add_argument(
        "--collect",
        action="store_true",
        help="launch nothing: aggregate the runs that have a summary.json, name the missing ones",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args()
    arms = {a: ARMS[a] for a in args.arms}
    for spec in args.arm:
        name, _, ovr = spec.partition("=")
        arms[name] = [o for o in ovr.split(",") if o]
    if "none" not in arms:
        raise SystemExit("the arms must include none: token efficiency is relative to it")
    root = Path(args.out_root)
    import os

    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    jobs = [(e, "none", s) for e in args.envs for s in args.seeds]
    jobs += [(e, a, s) for e in args.envs for s in args.seeds for a in arms if a != "none"]
    if args.collect:
        missing = [j for j in jobs if not (run_dir_of(root, *j) / "summary.json").exists()]
        for j in missing:
            print(f"missing: {j[0]} {j[1]} seed {j[2]} (not in the table)")
        jobs = [j for j in jobs if j not in missing]
        if any((e, "none", s) not in jobs for e, _, s in jobs):
            raise SystemExit("--collect: every (env, seed) with a bonus arm needs its none run")
        results = {j: launch(root, *j, arms[j[1]], threads, args.overrides) for j in jobs}
    else:
        with ThreadPoolExecutor(args.workers) as pool:
            # none first: each (env, seed) warm start is trained once, then cached for the other arms
            first = list(
                pool.map(
                    lambda j: launch(root, j[0], j[1], j[2], arms[j[1]], threads, args.overrides),
                    jobs[: len(args.envs) * len(args.seeds)],
                )
            )
            rest = list(
                pool.map(lambda j: launch(root, j[0], j[1], j[2], arms[j[1]], threads, args.overrides), jobs[len(first) :])
            )
        results = {(e, a, s): r for (e, a, s), r in zip(jobs, first + rest)}

    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for (env, arm, seed), r in results.items():
        base = results[(env, "none", seed)]
        eff = token_efficiency_ratio(
            np.asarray(r["heldout_success_curve"]), np.asarray(base["heldout_success_curve"])
        )  # tokens_none / tokens_arm
        rows.append(
            {
                "env": env,
                "arm": arm,
                "seed": seed,
                "success_start": r["heldout_success_start"],
                "success_final": r["heldout_success_final"],
                "regret": r["regret"],
                "tokens_to_success": r["tokens_to_success"],
                "token_efficiency_vs_none": eff,
                # tokens a trial of none spends / tokens a trial of this arm spends, and the success difference
                "tokens_per_trial_ratio_vs_none": base["heldout_tokens_per_trial"] / r["heldout_tokens_per_trial"],
                "success_minus_none": r["heldout_success_final"] - base["heldout_success_final"],
                **{f"success_{b}x": r["heldout_success_by_budget"].get(b) for b in BUDGET_SCALES},
                **{f"regret_{b}x": r["regret_by_budget"].get(b) for b in BUDGET_SCALES},
                "tokens_per_trial": r["heldout_tokens_per_trial"],
                "iteration_s_median": r["iteration_s_median"],
                "iteration_over_no_bonus_median": r["iteration_over_no_bonus_median"],
                "wall_time_s": r["wall_time_s"],
                "overrides": " ".join(arms[arm] + args.overrides),
            }
        )
    with (out_dir / f"{args.name}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for row in rows:
            w.writerow({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})

    keys = [
        "success_final",
        "success_minus_none",
        "regret",
        "token_efficiency_vs_none",
        "tokens_per_trial",
        "tokens_per_trial_ratio_vs_none",
        "success_2x",
        "success_4x",
        "iteration_s_median",
        "iteration_over_no_bonus_median",
    ]
    lines = ["| env | arm | seeds | " + " | ".join(keys) + " |", "|" + " --- |" * (len(keys) + 3)]
    for env in args.envs:
        for arm in arms:
            sel = [row for row in rows if row["env"] == env and row["arm"] == arm]
            if sel:
                lines.append(f"| {env} | {arm} | {len(sel)} | " + " | ".join(stats([row[k] for row in sel]) for k in keys) + " |")
    table = "\n".join(lines)
    (out_dir / f"{args.name}_table.md").write_text(f"Seeds {args.seeds}; mean ± std [min, max] across seeds.\n\n{table}\n")
    print(table)
    plot(results, args.envs, list(arms), out_dir / f"{args.name}.png")


def plot(results: dict, envs: list[str], arms: list[str], path: Path) -> None:
    """Held-out success versus tokens (mean curve over seeds) per arm, one panel per env."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(envs), figsize=(5 * len(envs), 3.6), squeeze=False)
    for ax, env in zip(axes[0], envs):
        for arm in arms:
            curves = [np.asarray(r["heldout_success_curve"]) for (e, a, _), r in results.items() if e == env and a == arm]
            if not curves:
                continue
            width = min(len(c) for c in curves)
            mean = np.mean([c[:width] for c in curves], 0)
            ax.plot(np.arange(width), mean, label=f"{arm} ({len(curves)} seeds)")
        ax.set_title(env)
        ax.set_xlabel("policy tokens spent")
        ax.set_ylabel("held-out success (J)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
