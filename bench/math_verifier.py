"""A verifier initialised from the policy's trunk, on math (issue 20, item 2).

    python bench/math_verifier.py                    # seeds 0 1 2
    python bench/math_verifier.py --render-only      # rewrite the table from the JSON

Per seed, one ``python train.py env=math job=train_verifier verifier.name_or_path=policy`` (the
command a user types): the warm-started base policy (``warm_start.seed=0``: one base policy, its
warm start cached and shared by the seeds) samples 256 training problems x 8 trials, a verifier
whose trunk is a copy of the policy's (``verifier.name_or_path=policy``) is trained on the
labelled whole trials and every episode-boundary prefix (``verifier.prefixes=true``, the
default), and best-of-N with it is measured on 64 held-out problems x 16 trials against the
base's maj@N and pass@N on the same trials. The seeds vary the sampled data, the verifier's
training order and the evaluation draws. Everything else is the trainer's default.

Reported per seed and as mean with a 95% t-interval over seeds: the verifier's held-out
accuracy, ECE, AUROC and Brier score on whole trials (the scores best-of-N ranks by) and on all
examples (prefixes too), the AUROC within problems (the ranking best-of-N uses), and
best-of-N, a random pick, maj@N and pass@N at each N, with how typical best-of-N's pick is
(the share of the N trials giving its answer). Results:
bench/results/math_verifier.json and math_verifier_table.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "bench"))
from train_process import mean_ci, train_process  # noqa: E402  (the benchmarks' shared runner)

CALIBRATION = ("accuracy", "ece", "auroc", "brier", "positive_rate")


def record(run_dir: Path, s: dict, wall_s: float) -> dict:
    """What the table needs of one run: calibration (whole trials and all examples) and the curves."""
    v = json.loads((run_dir / "verifier_summary.json").read_text())
    out = {"wall_s": wall_s, "best_of_n": v["best_of_n"], "base_heldout_success": v["base/heldout_success"]}
    for k in CALIBRATION:
        out[f"end/{k}"] = v.get(f"heldout/end/{k}")
        out[f"all/{k}"] = v.get(f"heldout/{k}")
    out["end/within_problem_auroc"] = v.get("heldout/end/within_problem_auroc")
    out["end/mixed_problems"] = v.get("heldout/end/mixed_problems")
    out["heterogeneity"] = s.get("diagnostics/heterogeneity")
    out["anti_concentration"] = s.get("diagnostics/anti_concentration")
    return out


def render(out: dict) -> str:
    runs = list(out["seeds"].values())
    fmt = lambda m, c: f"{m:.3f} ± {c:.3f}"  # noqa: E731
    lines = [
        f"Seeds {sorted(out['seeds'])}; mean ± 95% t-interval over seeds. Command: `{out['command']}`.",
        "",
        "## The verifier (trunk copied from the policy)",
        "",
        "| examples | accuracy | ECE | AUROC | Brier | positive rate |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for which, label in (("end", "whole trials"), ("all", "whole trials and prefixes")):
        cells = [fmt(*mean_ci([r[f"{which}/{k}"] for r in runs])) for k in CALIBRATION]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Per seed (whole trials): "
        + "; ".join(f"seed {s}: AUROC {r['end/auroc']:.3f}, ECE {r['end/ece']:.3f}" for s, r in sorted(out["seeds"].items())),
        "",
        "Within problems (the ranking best-of-N uses: the AUROC among one problem's own whole trials, averaged over "
        "the held-out problems with a success and a failure): "
        + fmt(*mean_ci([r["end/within_problem_auroc"] for r in runs]))
        + "; per seed "
        + ", ".join(
            f"{r['end/within_problem_auroc']:.3f} over {r['end/mixed_problems']:.0f} problems"
            for _, r in sorted(out["seeds"].items())
        )
        + ".",
        "",
        "## Best-of-N with the verifier against maj@N (same held-out trials)",
        "",
        "Random pick: the mean outcome of the N trials. Answer share: the share of the N trials that gave the picked "
        "trial's answer, for best-of-N's pick and (in brackets) for a random pick.",
        "",
        "| N | best-of-N | random pick | maj@N | pass@N | best-of-N - maj@N | answer share of the pick (random) | tokens per problem |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    ns = runs[0]["best_of_n"]["n"]
    for i, n in enumerate(ns):
        bon = [r["best_of_n"]["best_of_n"][i] for r in runs]
        maj = [r["best_of_n"]["maj_at_n"][i] for r in runs]
        pas = [r["best_of_n"]["pass_at_n"][i] for r in runs]
        tok = [r["best_of_n"]["tokens"][i] for r in runs]
        rnd = [r["best_of_n"]["mean_outcome"][i] for r in runs]
        pick = [r["best_of_n"]["pick_answer_share"][i] for r in runs]
        share = [r["best_of_n"]["answer_share"][i] for r in runs]
        diff = [a - b for a, b in zip(bon, maj)]
        lines.append(
            f"| {n} | {fmt(*mean_ci(bon))} | {fmt(*mean_ci(rnd))} | {fmt(*mean_ci(maj))} | {fmt(*mean_ci(pas))} | "
            f"{fmt(*mean_ci(diff))} | {mean_ci(pick)[0]:.3f} ({mean_ci(share)[0]:.3f}) | {mean_ci(tok)[0]:.0f} |"
        )
    het = mean_ci([r["heterogeneity"] for r in runs])
    ac = mean_ci([r["anti_concentration"] for r in runs])
    lines += [
        "",
        f"Base policy: held-out success {fmt(*mean_ci([r['base_heldout_success'] for r in runs]))}, "
        f"heterogeneity {fmt(*het)}, anti-concentration {fmt(*ac)}. "
        f"Wall time per run {min(r['wall_s'] for r in runs):.0f}-{max(r['wall_s'] for r in runs):.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--name", default="math_verifier")
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--keep", type=Path, help="keep the runs and the warm-start cache here")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = ap.parse_args()
    path = RESULTS / f"{args.name}.json"
    base = [
        "env=math",
        "job=train_verifier",
        "verifier.name_or_path=policy",
        "warm_start.seed=0",
        "logger.mode=disabled",
        "logger.progress_bar=false",
        "threads=2",
        *args.overrides,
    ]
    out = json.loads(path.read_text()) if path.exists() else {"seeds": {}}
    out["command"] = "python train.py " + " ".join(base) + " seed=S"
    if not args.render_only:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = args.keep or Path(tmp)
            for seed in args.seeds:
                run_dir = tmp / f"seed{seed}"
                res = train_process([*base, f"seed={seed}", f"warm_start.cache_dir={tmp / 'ws'}"], run_dir)
                out["seeds"][str(seed)] = record(run_dir, res["summary"], res["wall_s"])
                r = out["seeds"][str(seed)]
                print(f"seed {seed}: AUROC {r['end/auroc']}, ECE {r['end/ece']}; {r['wall_s']:.0f} s", flush=True)
                path.write_text(json.dumps(out, indent=1) + "\n")
    table = render(out)
    (RESULTS / f"{args.name}_table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
