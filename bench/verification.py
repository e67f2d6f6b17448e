"""Verifier-based (VB) against verifier-free (VF) scaling, at two heterogeneity levels.

    python bench/verification.py --settings planted_subseq:low planted_subseq:high math:mid --seeds 0 1 2

A setting is an environment and a heterogeneity level of its base policy: the warm
start's expert-trace variety (``warm_start.variety``: ``low`` 0.0 = one canonical way to
write each episode, ``mid`` 0.5 = the default, ``high`` 1.0 = random fillers and misses),
or with ``--dial length`` (planted_subseq) the level of its length-paced expert mixture
(``env.expert_heterogeneity`` 0, 0.5, 1 with ``env.expert_pace=length``, the dial that moves
the base's heterogeneity; use another ``--out-root`` and ``--name`` than the variety runs).
One base policy per setting (``warm_start.seed=0``); the seeds vary everything after it
(the sampled data, the verifier's initialisation, the SFT order, the evaluation draws).
Per (setting, seed), two ``train.py`` processes, the commands a user types:

- ``vb``: ``algo=verifier``. The base policy's diagnostics (heterogeneity,
  anti-concentration), a verifier trained on its trials (held-out accuracy, ECE,
  AUROC), and best-of-N on held-out problems with N = 1..16 trials: success against the
  compute H = policy tokens of the N trials per problem.
- ``vf``: ``algo=sft sft.data=stitched``. SFT of the same base policy on search traces
  stitched from its own trials on the same number of training problems; the fitted
  policy then spends H either in parallel (N trials, majority vote: maj@N) or
  sequentially (one trial at 1x..8x the budget).

The VB-VF gap at a compute H is VB's success minus the better of VF's two ways at that
H, each curve read by linear interpolation in log2(H) (a gap only where both curves
cover H). Per seed we read it at the H of each N of the VB curve and fit its slope
against log2(H); the table gives mean ± std across seeds. Runs with a summary.json are
reused (the benchmark resumes); ``--collect`` aggregates without launching.
Results: bench/results/verification.csv (every curve point), verification_table.md,
verification.json and verification.png.
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

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LEVELS = {"low": 0.0, "mid": 0.5, "high": 1.0}
ARMS = {
    "vb": ["algo=verifier"],
    "vf": ["algo=sft", "sft.data=stitched", "diagnostics.enabled=false", "sft.n_values=[1,2,4,8,16,32]"],
}


def run_dir_of(root: Path, env: str, level: str, arm: str, seed: int) -> Path:
    return root / env / level / arm / f"seed{seed}"


def level_overrides(dial: str, env: str, level: str) -> list[str]:
    """What a level sets: the warm start's trace variety (``--dial variety``, the default), or
    planted_subseq's length-paced expert mixture (``--dial length``: env.expert_heterogeneity =
    the level's number, env.expert_pace=length; bench/results/README.md, heterogeneity_dial_length)."""
    if dial == "variety":
        return [f"warm_start.variety={LEVELS[level]}"]
    if env != "planted_subseq":
        raise SystemExit(f"--dial length is planted_subseq's expert mixture; setting {env}:{level} has another env")
    return [f"env.expert_heterogeneity={LEVELS[level]}", "env.expert_pace=length"]


def launch(
    root: Path, env: str, level: str, arm: str, seed: int, threads: int, extra: list[str], collect: bool, dial: str = "variety"
) -> dict | None:
    run_dir = run_dir_of(root, env, level, arm, seed)
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        if collect:
            print(f"missing: {env} {level} {arm} seed {seed}")
            return None
        cmd = [
            sys.executable,
            str(ROOT / "train.py"),
            f"env={env}",
            *ARMS[arm],
            *level_overrides(dial, env, level),
            "warm_start.seed=0",
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
            raise RuntimeError(f"{env}/{level}/{arm}/seed {seed} failed (exit {res.returncode}); see {log}")
        print(f"done {env} {level} {arm} seed {seed} in {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads(summary_path.read_text())


def interp_log2(h: np.ndarray, xs, ys) -> np.ndarray:
    """y of the curve (xs, ys) at compute ``h``, linear in log2 of the compute; NaN outside
    its range. Points with equal x keep the last y (a curve that stopped spending)."""
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    order = np.argsort(xs, kind="stable")
    lx, y = np.log2(np.maximum(xs[order], 1e-9)), ys[order]
    out = np.interp(np.log2(np.maximum(h, 1e-9)), lx, y)
    return np.where((h >= xs.min() - 1e-9) & (h <= xs.max() + 1e-9), out, np.nan)


def curves(vb: dict, vf: dict) -> dict[str, tuple[list, list]]:
    """Success-against-H curves of one (setting, seed): name -> (H, success)."""
    b, p, s = vb["best_of_n"], vf["parallel"], vf["sequential"]
    return {
        "VB best-of-N (verifier)": (b["tokens"], b["best_of_n"]),
        "base maj@N": (b["tokens"], b["maj_at_n"]),
        "base pass@N (oracle)": (b["tokens"], b["pass_at_n"]),
        "VF maj@N (SFT stitched)": (p["tokens"], p["maj_at_n"]),
        "VF sequential (SFT stitched)": (s["tokens"], s["success"]),
    }


def gap_points(vb: dict, vf: dict) -> list[dict]:
    """The VB-VF gap at the H of each VB point (VF: the better of parallel and sequential)."""
    c = curves(vb, vf)
    h = np.asarray(c["VB best-of-N (verifier)"][0], float)
    vb_y = np.asarray(c["VB best-of-N (verifier)"][1], float)
    vf_par = interp_log2(h, *c["VF maj@N (SFT stitched)"])
    vf_seq = interp_log2(h, *c["VF sequential (SFT stitched)"])
    best = np.fmax(vf_par, vf_seq)  # NaN only where neither covers h
    rows = []
    for i, n in enumerate(vb["best_of_n"]["n"]):
        rows.append(
            {
                "n": n,
                "H": float(h[i]),
                "vb": float(vb_y[i]),
                "vf_parallel": float(vf_par[i]),
                "vf_sequential": float(vf_seq[i]),
                "vf_best": float(best[i]),
                "gap": float(vb_y[i] - best[i]),
            }
        )
    return rows


def slope(points: list[dict]) -> float:
    """Least-squares slope of the gap against log2(H) over the points where it is defined."""
    pts = [(np.log2(p["H"]), p["gap"]) for p in points if np.isfinite(p["gap"])]
    if len(pts) < 2:
        return float("nan")
    x, y = np.array(pts).T
    return float(np.polyfit(x, y, 1)[0])


def trial_metric(vb: dict, key: str) -> float | None:
    """A held-out verifier figure on whole trials (``heldout/end/...``; ``heldout/...`` when
    the verifier was trained without prefixes): the scores best-of-N ranks by."""
    return vb.get(f"heldout/end/{key}", vb.get(f"heldout/{key}"))


def ms(values) -> str:
    vals = [v for v in values if v is not None and np.isfinite(v)]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["planted_subseq:low", "planted_subseq:high", "math:mid"],
        help="env:level with level in " + ", ".join(LEVELS),
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--dial",
        choices=["variety", "length"],
        default="variety",
        help="what a level sets: warm_start.variety, or planted_subseq's env.expert_heterogeneity with env.expert_pace=length",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--name", default="verification", help="stem of the result files under bench/results/")
    parser.add_argument("--out-root", default=str(ROOT / "outputs" / "bench" / "verification"))
    parser.add_argument("--collect", action="store_true", help="launch nothing: aggregate the finished runs")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args()
    settings = []
    for spec in args.settings:
        env, _, level = spec.partition(":")
        if level not in LEVELS:
            raise SystemExit(f"setting {spec!r}: level must be one of {list(LEVELS)}")
        settings.append((env, level))
    root = Path(args.out_root)

    results: dict[tuple, dict] = {}
    for env, level in settings:
        for seed in args.seeds:
            vb = launch(root, env, level, "vb", seed, args.threads, args.overrides, args.collect, args.dial)
            vf = launch(root, env, level, "vf", seed, args.threads, args.overrides, args.collect, args.dial)
            if vb is not None and vf is not None:
                results[(env, level, seed)] = {"vb": vb, "vf": vf, "gap": gap_points(vb, vf)}
    if not results:
        raise SystemExit("no finished (setting, seed)")

    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for (env, level, seed), r in results.items():
        for name, (xs, ys) in curves(r["vb"], r["vf"]).items():
            for i, (x, y) in enumerate(zip(xs, ys)):
                rows.append(
                    {
                        "env": env,
                        "level": level,
                        "seed": seed,
                        "curve": name,
                        "point": i,
                        "H": round(x, 2),
                        "success": round(y, 4),
                    }
                )
    with (out_dir / f"{args.name}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    ws_seed = next((o.split("=", 1)[1] for o in reversed(args.overrides) if o.startswith("warm_start.seed=")), "0")
    extra = f" Overrides: `{' '.join(args.overrides)}`." if args.overrides else ""
    lines = [f"Seeds {args.seeds} (one base policy per setting, warm_start.seed={ws_seed}); mean ± std across seeds.{extra}", ""]
    lines += [
        "## Base policies and verifiers",
        "",
        "Verifier figures on held-out whole trials (the scores best-of-N ranks by).",
        "",
        f"| env | level ({'variety' if args.dial == 'variety' else 'h, length-paced'}) | heterogeneity | anti-concentration | base success | verifier acc. | ECE | AUROC | AUROC within problems | Brier | SFT records |",
        "|" + " --- |" * 11,
    ]
    agg = {}
    for env, level in settings:
        sel = [r for (e, lv, _), r in results.items() if (e, lv) == (env, level)]
        if not sel:
            continue
        g = lambda k: [r["vb"].get(k) for r in sel]  # noqa: E731, B023  (called in this iteration only)
        t = lambda k: [trial_metric(r["vb"], k) for r in sel]  # noqa: E731, B023  (called in this iteration only)
        lines.append(
            f"| {env} | {level} ({LEVELS[level]}) | {ms(g('diagnostics/heterogeneity'))} | {ms(g('diagnostics/anti_concentration'))} | "
            f"{ms(g('base/heldout_success'))} | {ms(t('accuracy'))} | {ms(t('ece'))} | "
            f"{ms(t('auroc'))} | {ms(g('heldout/end/within_problem_auroc'))} | {ms(t('brier'))} | {ms([r['vf']['sft/records'] for r in sel])} |"
        )
        agg[f"{env}:{level}"] = {
            "seeds": len(sel),
            **{
                k: [r["vb"].get(k) for r in sel]
                for k in (
                    "diagnostics/heterogeneity",
                    "diagnostics/anti_concentration",
                    "diagnostics/success",
                    "base/heldout_success",
                    "heldout/accuracy",
                    "heldout/ece",
                    "heldout/auroc",
                    "heldout/brier",
                    "heldout/end/within_problem_auroc",
                    "wall_time_s",
                )
            },
            **{f"verifier_trials/{k}": t(k) for k in ("accuracy", "ece", "auroc", "brier", "positive_rate")},
            "vf_wall_time_s": [r["vf"]["wall_time_s"] for r in sel],
            "vf_heldout_success": [r["vf"]["heldout/success"] for r in sel],
            "gap_slope_per_doubling": [slope(r["gap"]) for r in sel],
            "gap": [r["gap"] for r in sel],
        }
    lines += [
        "",
        "## VB - VF gap against compute H (policy tokens per problem)",
        "",
        "VB: best-of-N with the trained verifier. VF: SFT on stitched traces, the better of maj@N and one trial at a scaled budget, "
        "read at VB's H (interpolated in log2 H; n/a where neither VF curve reaches that H).",
        "",
        "Random pick: the base's mean outcome over the N trials (what a verifier that ranks at chance would give). "
        "Answer share: the share of the N trials giving the answer of best-of-N's pick (in brackets: of a random pick).",
        "",
        "| env | level | N | H (VB) | VB success | random pick | answer share of the pick (random) | VF maj@N | VF sequential | gap VB - best VF |",
        "|" + " --- |" * 10,
    ]
    for env, level in settings:
        sel = [r for (e, lv, _), r in results.items() if (e, lv) == (env, level)]
        if not sel:
            continue
        for i, n in enumerate(sel[0]["gap"]):
            pts = [r["gap"][i] for r in sel]
            bon = [r["vb"]["best_of_n"] for r in sel]
            share = (
                f"{ms([b['pick_answer_share'][i] for b in bon])} ({ms([b['answer_share'][i] for b in bon])})"
                if all("pick_answer_share" in b for b in bon)
                else "n/a"
            )
            lines.append(
                f"| {env} | {level} | {n['n']} | {ms([p['H'] for p in pts])} | {ms([p['vb'] for p in pts])} | "
                f"{ms([b['mean_outcome'][i] for b in bon])} | {share} | "
                f"{ms([p['vf_parallel'] for p in pts])} | {ms([p['vf_sequential'] for p in pts])} | {ms([p['gap'] for p in pts])} |"
            )
        lines.append(
            f"| {env} | {level} | slope of the gap per doubling of H | | | | | | | {ms([slope(r['gap']) for r in sel])} |"
        )
    table = "\n".join(lines)
    (out_dir / f"{args.name}_table.md").write_text(table + "\n")
    (out_dir / f"{args.name}.json").write_text(json.dumps(agg, indent=2, default=float))
    print(table)
    plot(results, settings, out_dir / f"{args.name}.png")


def plot(results: dict, settings: list[tuple[str, str]], path: Path) -> None:
    """Success against H per setting: each curve's mean over seeds, bars = min..max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(settings), figsize=(4.6 * len(settings), 3.8), squeeze=False)
    for ax, (env, level) in zip(axes[0], settings):
        sel = [r for (e, lv, _), r in results.items() if (e, lv) == (env, level)]
        if not sel:
            continue
        for name in curves(sel[0]["vb"], sel[0]["vf"]):
            cs = [curves(r["vb"], r["vf"])[name] for r in sel]
            x = np.mean([c[0] for c in cs], 0)
            y = np.array([c[1] for c in cs])
            ax.errorbar(
                x,
                y.mean(0),
                yerr=[y.mean(0) - y.min(0), y.max(0) - y.mean(0)],
                marker="o",
                ms=3,
                capsize=2,
                label=name,
                linestyle="--" if "oracle" in name or "base" in name else "-",
            )
        het = statistics.mean(r["vb"]["diagnostics/heterogeneity"] for r in sel)
        ac = statistics.mean(r["vb"]["diagnostics/anti_concentration"] for r in sel)
        ax.set_title(f"{env}, {level} (het {het:.3f}, AC {ac:.2f}), {len(sel)} seeds", fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("H: policy tokens per problem")
        ax.set_ylabel("held-out success")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
