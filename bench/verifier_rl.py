"""RL with a trained verifier's reward: the second verifier-based arm (issue 20, item 3), on math.

    python bench/math_verifier.py --keep /tmp/mv       # first: a verifier per seed and the warm start
    python bench/verifier_rl.py --verifiers /tmp/mv     # then PPO with each seed's verifier

Per seed S, two ``train.py`` runs (the commands a user types) from the base policy of
bench/math_verifier.py (``warm_start.seed=0``, its kept warm-start cache), ``bonus=none``,
the trainer's defaults otherwise:

- ``rl_verifier``: ``reward=verifier reward.verifier=VERIFIERS/seedS/verifier``: PPO's reward is
  the verifier's P(success) of each whole trial (verifier-based RL);
- ``rl_env``: ``reward=env``: the environment's 0/1 outcome, an oracle verifier (the ceiling
  the first arm would reach with a perfect verifier);

and the verifier-free arm of bench/verification.py on the same base: ``job=sft
sft.data=stitched`` (SFT on search traces stitched from the base's own trials), whose maj@N
it measures on the same held-out problems.

Each trained policy then plays the 64 held-out problems x 16 trials of math_verifier's
best-of-N (``heldout_resets``, the same problems) under the run's budget, and the table
gives success (a random pick of one trial) and maj@N against the tokens per problem H,
beside the base policy's maj@N and best-of-N with the same seed's verifier, read from
math_verifier's run. From each run's metrics: train/outcome and train/reward over the first
and last 10 iterations, how often the verifier's verdict agreed with the outcome, episodes
per trial and the forced-answer rate.
Finished runs (a summary.json) are reused. Results: bench/results/verifier_rl.json and
verifier_rl_table.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from train_process import mean_ci, train_process  # noqa: E402  (the benchmarks' shared runner)

ARMS = {"rl_verifier": "RL, verifier reward", "rl_env": "RL, environment reward (oracle)"}
BLOCK = 10  # iterations averaged at the start and the end of training
VF = [
    "job=sft",
    "sft.data=stitched",
    "diagnostics.enabled=false",
]  # verifier-free: SFT on stitched traces (bench/verification.py)


def arm_overrides(arm: str, verifiers: Path, seed: int) -> list[str]:
    if arm == "rl_verifier":
        return ["reward=verifier", f"reward.verifier={verifiers / f'seed{seed}' / 'verifier'}"]
    return ["reward=env"]


def training_curve(run_dir: Path) -> dict:
    """Means of train/outcome, train/reward (and the verifier's agreement with the outcome)
    over the first and the last BLOCK iterations, and the held-out success of the run's own
    evaluation before and after training (environment-graded)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out = {}
    for key in (
        "train/outcome",
        "train/reward",
        "train/reward_verifier_accuracy",
        "train/episodes_per_trial",
        "train/forced_answer_rate",
    ):
        series = [r[key] for r in rows if key in r]
        if series:
            out[key] = [statistics.fmean(series[:BLOCK]), statistics.fmean(series[-BLOCK:])]
    summary = json.loads((run_dir / "summary.json").read_text())
    out["heldout_success"] = [summary["heldout_success_start"], summary["heldout_success_final"]]
    return out


def heldout_curve(run_dir: Path, seed: int, num_problems: int, n_values: list[int]) -> dict:
    """The trained policy's trials on the held-out problems of math_verifier's best-of-N:
    maj@N, pass@N, mean outcome and tokens at each N (best_of_n_trials with equal scores)."""
    import envs  # noqa: F401  (registers the environments)
    from metarl_llm.jobs.common import stream_codec
    from metarl_llm.jobs.evaluate_run import checkpoint_name, checkpoint_policy_dir, load_run_config
    from metarl_llm.models import load_policy, set_temperature
    from metarl_llm.rollout.engine import heldout_resets
    from metarl_llm.runtime.setup import env_factory
    from metarl_llm.verify.best_of_n import best_of_n_trials, play_trials

    cfg = load_run_config(run_dir)
    policy, tokenizer = load_policy(cfg.model, cfg.seed, str(checkpoint_policy_dir(run_dir, checkpoint_name(run_dir))))
    set_temperature(policy, cfg.model.temperature)
    policy.eval()
    codec = stream_codec(cfg, tokenizer)
    resets, groups = heldout_resets(num_problems, max(n_values))
    with torch.no_grad():
        trials, answer_scores = play_trials(
            policy, codec, env_factory(cfg), "test", resets, groups, cfg.budget, torch.Generator().manual_seed(seed), 256
        )
    return best_of_n_trials(None, trials, n_values, answer_scores)  # no verifier: maj@N, pass@N, tokens


def render(out: dict) -> str:
    fmt = lambda m, c: f"{m:.3f} ± {c:.3f}"  # noqa: E731
    seeds = sorted(out["seeds"])
    runs = [out["seeds"][s] for s in seeds]
    ns = runs[0]["base"]["n"]
    lines = [
        f"Seeds {seeds}; mean ± 95% t-interval over seeds. Command per arm: `{out['command']}`; "
        "the base and its verifier: bench/results/math_verifier.json's runs.",
        "",
        "## Training (means over the first and the last 10 iterations)",
        "",
        "| arm | train/reward | train/outcome | verifier agrees with the outcome | episodes per trial | forced-answer rate | "
        "held-out success (the run's evaluation) | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def pair(t: list[dict], key: str) -> str:
        if any(key not in x for x in t):
            return "n/a"
        a, b = mean_ci([x[key][0] for x in t]), mean_ci([x[key][1] for x in t])
        return f"{fmt(*a)} -> {fmt(*b)}"

    for arm, label in ARMS.items():
        t = [r[arm]["training"] for r in runs]
        lines.append(
            f"| {label} | {pair(t, 'train/reward')} | {pair(t, 'train/outcome')} | {pair(t, 'train/reward_verifier_accuracy')} | "
            f"{pair(t, 'train/episodes_per_trial')} | {pair(t, 'train/forced_answer_rate')} | "
            f"{pair(t, 'heldout_success')} | "
            f"{min(r[arm]['wall_s'] for r in runs):.0f}-{max(r[arm]['wall_s'] for r in runs):.0f} |"
        )
    lines += [
        "",
        "## Held-out success against compute H (64 problems x 16 trials, the same problems for every column)",
        "",
        "maj@N of N trials per problem; H is the policy tokens they cost (base's H; the RL arms' in brackets).",
        "",
        "| N | H (base) | base maj@N | VB best-of-N (verifier) | RL verifier reward: maj@N (H) | RL env reward: maj@N (H) | "
        "VF, SFT stitched: maj@N (H) | RL verifier - base, maj@N |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    has_vf = all("vf" in r for r in runs)
    for i, n in enumerate(ns):
        base = [r["base"]["maj_at_n"][i] for r in runs]
        bon = [r["base"]["best_of_n"][i] for r in runs]
        rv = [r["rl_verifier"]["curve"]["maj_at_n"][i] for r in runs]
        re_ = [r["rl_env"]["curve"]["maj_at_n"][i] for r in runs]
        h = {arm: mean_ci([r[arm]["curve"]["tokens"][i] for r in runs])[0] for arm in [*ARMS, *(["vf"] if has_vf else [])]}
        vf = f"{fmt(*mean_ci([r['vf']['curve']['maj_at_n'][i] for r in runs]))} ({h['vf']:.0f})" if has_vf else "n/a"
        lines.append(
            f"| {n} | {mean_ci([r['base']['tokens'][i] for r in runs])[0]:.0f} | {fmt(*mean_ci(base))} | {fmt(*mean_ci(bon))} | "
            f"{fmt(*mean_ci(rv))} ({h['rl_verifier']:.0f}) | {fmt(*mean_ci(re_))} ({h['rl_env']:.0f}) | {vf} | "
            f"{fmt(*mean_ci([a - b for a, b in zip(rv, base)]))} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--verifiers", type=Path, required=True, help="math_verifier.py --keep directory (seedS/verifier, ws/)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--keep", type=Path, help="where the PPO runs go (default: VERIFIERS/rl)")
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = ap.parse_args()
    path = RESULTS / "verifier_rl.json"
    base = [
        "env=math",
        "bonus=none",
        "warm_start.seed=0",
        f"warm_start.cache_dir={args.verifiers / 'ws'}",
        "logger.mode=disabled",
        "logger.progress_bar=false",
        "threads=2",
        *args.overrides,
    ]
    out = json.loads(path.read_text()) if path.exists() else {"seeds": {}}
    out["command"] = "python train.py " + " ".join(base[:3]) + " reward=verifier reward.verifier=RUN/verifier | reward=env seed=S"
    if not args.render_only:
        runs_root = args.keep or args.verifiers / "rl"
        for seed in args.seeds:
            vb = json.loads((args.verifiers / f"seed{seed}" / "verifier_summary.json").read_text())
            bon = vb["best_of_n"]
            rec = {"base": bon}
            for arm in ARMS:
                run_dir = runs_root / arm / f"seed{seed}"
                if not (run_dir / "summary.json").is_file():  # a finished run is reused (the bench resumes)
                    train_process([*base, *arm_overrides(arm, args.verifiers, seed), f"seed={seed}"], run_dir)
                rec[arm] = {
                    "wall_s": json.loads((run_dir / "summary.json").read_text())["wall_time_s"],
                    "training": training_curve(run_dir),
                    "curve": heldout_curve(run_dir, seed, vb["heldout_trials"] // max(bon["n"]), bon["n"]),
                }
                print(f"seed {seed} {arm}: {rec[arm]['training']}; maj@N {rec[arm]['curve']['maj_at_n']}", flush=True)
            run_dir = runs_root / "vf" / f"seed{seed}"
            if not (run_dir / "summary.json").is_file():
                train_process([*base, *VF, f"seed={seed}"], run_dir)
            vf = json.loads((run_dir / "summary.json").read_text())
            if vf["parallel"]["n"] != bon["n"] or vf["heldout_problems"] != vb["heldout_trials"] // max(bon["n"]):
                raise SystemExit(f"seed {seed}: the VF run measured other N or problems than the verifier's best-of-N")
            rec["vf"] = {"wall_s": vf["wall_time_s"], "curve": vf["parallel"]}
            print(f"seed {seed} vf: maj@N {vf['parallel']['maj_at_n']}", flush=True)
            out["seeds"][str(seed)] = rec
            path.write_text(json.dumps(out, indent=1) + "\n")
    table = render(out)
    (RESULTS / "verifier_rl_table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
