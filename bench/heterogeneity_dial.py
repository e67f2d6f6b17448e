"""The heterogeneity dial (issue 20): does env.expert_heterogeneity set the warm-started base's heterogeneity?

    python bench/heterogeneity_dial.py                              # levels 0 0.5 1 x seeds 0 1 2
    python bench/heterogeneity_dial.py --levels 0 1 --seeds 0       # two levels, one seed
    python bench/heterogeneity_dial.py --render-only                # rewrite the table from the JSON
    python bench/heterogeneity_dial.py --steps 5 --problems 2 --levels 0 1 --seeds 0 \\
        --name smoke_dial --results /tmp/dial warm_start.num_traces=64   # smoke (seconds)

For each level h of ``--levels`` and seed of ``--seeds``, one after the other in this process:
compose the config as ``python train.py`` would (``env=planted_subseq env.expert_heterogeneity=h
seed=S threads=2 warm_start.cache_dir=<a fresh temporary directory, or --keep DIR>`` plus the extra
Hydra overrides given), start it as a job does (``metarl_llm.jobs.common.start_job``: validation,
threads, seeds; no run directory written), warm start the base policy as every job does
(``jobs.common.base_policy``: the warm-start SFT on the env's expert traces, whose failed chunks
come from the progress-expert mixture of level h; envs/planted_subseq.py) and measure it with
``jobs.common.base_diagnostics`` (``cfg.diagnostics``: 64 held-out problems x 8 first episodes x 8
meta-prover answers by default; metarl_llm/evaluation/diagnostics.py).

Reported per run: heterogeneity (MC-corrected and uncorrected: the variance across first episodes
of J after the first episode), anti-concentration, success, first_episode_J, the warm start's
seconds (trained, or loaded with --keep) and steps and final loss, the diagnostics' seconds. Per
level: the mean over seeds with a 95% t-interval, and the per-seed values; and whether the mean
heterogeneity rises monotonically with the level (computed from the numbers, not assumed).
Results: bench/results/heterogeneity_dial.json and heterogeneity_dial_table.md (``--name``,
``--results`` change where).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from train_process import mean_ci  # noqa: E402  (the benchmarks' shared helpers)

from metarl_llm.jobs.common import base_diagnostics, base_policy, start_job  # noqa: E402
from metarl_llm.runtime.setup import compose_config  # noqa: E402

METRICS = (  # (key in a run's record, column title)
    ("heterogeneity", "heterogeneity"),
    ("heterogeneity_uncorrected", "heterogeneity (uncorrected)"),
    ("anti_concentration", "anti-concentration"),
    ("success", "success"),
    ("first_episode_J", "first-episode J"),
    ("first_episode_commits", "first episode commits"),
    ("warm_start_s", "warm start (s)"),
    ("diagnostics_s", "diagnostics (s)"),
)


def level_key(h: float) -> str:
    return f"{h:g}"


def measure(h: float, seed: int, cache_dir: Path, overrides: list[str]) -> dict:
    """One (level, seed) run: warm start the base policy as a job does, then its diagnostics."""
    cfg = compose_config(
        [
            "env=planted_subseq",
            f"env.expert_heterogeneity={h}",
            f"seed={seed}",
            f"warm_start.cache_dir={cache_dir}",
            "threads=2",
            "logger.mode=disabled",
            "logger.progress_bar=false",
            *overrides,
        ]
    )
    device = start_job(cfg, Path(tempfile.gettempdir()), write=False)  # validation, threads, seeds
    t0 = time.perf_counter()
    policy, _, codec, make_env, ws_info = base_policy(cfg, device)
    base_s = time.perf_counter() - t0
    logged: dict = {}
    base_diagnostics(cfg, policy, codec, make_env, lambda scalars, step: logged.update(scalars))  # as a job logs them
    d = {k.removeprefix("diagnostics/"): v for k, v in logged.items()}
    return {
        "heterogeneity": d["heterogeneity"],
        "heterogeneity_uncorrected": d["heterogeneity_uncorrected"],
        "anti_concentration": d["anti_concentration"],
        "success": d["success"],
        "first_episode_J": d["first_episode_J"],
        "first_episode_commits": d["first_episode_commits"],
        "warm_start_s": ws_info["perf/warm_start_s"],
        "base_policy_s": base_s,  # the warm start plus loading the model and fitting the budget
        "diagnostics_s": d["time_s"],
        "warm_start_cached": bool(ws_info.get("warm_start/cached", False)),
        "warm_start_steps": ws_info.get("warm_start/steps"),
        "warm_start_focused_steps": ws_info.get("warm_start/focused_steps"),
        "warm_start_final_loss": ws_info.get("warm_start/final_loss"),
        "diagnostics": {k: getattr(cfg.diagnostics, k) for k in ("num_problems", "num_continuations", "num_rollouts", "margin")},
    }


def monotone(levels: list[str], values: list[float]) -> bool:
    """True iff ``values`` rise strictly with the (numeric) level."""
    ordered = [v for _, v in sorted(zip((float(x) for x in levels), values))]
    return all(a < b for a, b in zip(ordered, ordered[1:]))


def render(out: dict) -> str:
    runs = out.get("runs", {})
    levels = sorted(runs, key=float)
    if not levels:
        return "no runs\n"
    lines = [
        "Warm-started base policy of env=planted_subseq at each env.expert_heterogeneity level: mean over seeds "
        "± the half-width of a 95% t-interval (bench/heterogeneity_dial.py).",
        "",
    ]
    extra = out.get("overrides", [])
    if extra:
        lines += [f"Extra overrides: `{' '.join(extra)}`", ""]
    head = ["level", "seeds", *(title for _, title in METRICS)]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    means = []
    for level in levels:
        recs = list(runs[level].values())
        row = [level, str(len(recs))]
        for key, _ in METRICS:
            if any(key not in r for r in recs):  # a metric added after the run (first_episode_commits)
                row.append("n/a")
                continue
            m, hw = mean_ci([r[key] for r in recs])
            row.append(f"{m:.4f} ± {hw:.4f}" if key.startswith("heterogeneity") else f"{m:.3f} ± {hw:.3f}")
            if key == "heterogeneity":
                means.append(m)
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Per seed:", ""]
    head = ["level", "seed", *(title for _, title in METRICS), "warm start steps", "warm start loss", "cached"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for level in levels:
        for seed, r in sorted(runs[level].items(), key=lambda kv: int(kv[0])):
            row = [level, seed]
            row += [
                "n/a" if key not in r else f"{r[key]:.4f}" if key.startswith("heterogeneity") else f"{r[key]:.3f}"
                for key, _ in METRICS
            ]
            loss = r.get("warm_start_final_loss")
            row += [str(r.get("warm_start_steps")), "n/a" if loss is None else f"{loss:.3f}", str(r.get("warm_start_cached"))]
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if len(levels) < 2:
        lines.append("Monotone in the level: n/a (one level).")
    else:
        rises = monotone(levels, means)
        seeds = sorted({s for level in levels for s in runs[level]}, key=int)
        per_seed = [
            s
            for s in seeds
            if all(s in runs[level] for level in levels)
            and monotone(levels, [runs[level][s]["heterogeneity"] for level in levels])
        ]
        lines.append(
            f"Mean heterogeneity (corrected) rises monotonically with the level: {'yes' if rises else 'no'} "
            f"({', '.join(f'{level}: {m:.4f}' for level, m in zip(levels, means))}); "
            f"per seed, monotone for {len(per_seed)} of {len(seeds)} seeds."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", nargs="+", type=float, default=[0.0, 0.5, 1.0], help="env.expert_heterogeneity values")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None, help="warm_start.steps (default: the config's)")
    ap.add_argument("--problems", type=int, default=None, help="diagnostics.num_problems (default: the config's)")
    ap.add_argument("--keep", type=Path, default=None, help="warm-start cache directory to keep (default: a temporary one)")
    ap.add_argument("--name", default="heterogeneity_dial")
    ap.add_argument("--results", type=Path, default=RESULTS, help="directory of the JSON and the table")
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = ap.parse_args()
    for h in args.levels:
        if not 0.0 <= h <= 1.0:
            ap.error(f"--levels: each level must be in [0, 1], got {h}")
    path = args.results / f"{args.name}.json"
    out = json.loads(path.read_text()) if path.exists() else {}
    if not args.render_only:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        extra = list(args.overrides)
        extra += [f"warm_start.steps={args.steps}"] if args.steps is not None else []
        extra += [f"diagnostics.num_problems={args.problems}"] if args.problems is not None else []
        if out.get("runs") and out.get("overrides", []) != extra:
            raise SystemExit(f"{path} holds runs with overrides {out.get('overrides')}, not {extra}: use another --name")
        out["overrides"] = extra
        args.results.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            for h in args.levels:
                for seed in args.seeds:
                    cache = args.keep if args.keep is not None else Path(tmp) / f"ws_{level_key(h)}_{seed}"
                    r = measure(h, seed, cache, extra)
                    out.setdefault("runs", {}).setdefault(level_key(h), {})[str(seed)] = r
                    print(
                        f"level {level_key(h)} seed {seed}: heterogeneity {r['heterogeneity']:.4f} "
                        f"(uncorrected {r['heterogeneity_uncorrected']:.4f}), anti-concentration "
                        f"{r['anti_concentration']:.3f}, success {r['success']:.3f}, first-episode J "
                        f"{r['first_episode_J']:.3f}; warm start {r['warm_start_s']:.1f} s, diagnostics "
                        f"{r['diagnostics_s']:.1f} s",
                        flush=True,
                    )
                    path.write_text(json.dumps(out, indent=1) + "\n")
    table = render(out)
    (args.results / f"{args.name}_table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
