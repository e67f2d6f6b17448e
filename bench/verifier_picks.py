"""What best-of-N picks: read the held-out scores a ``job=train_verifier`` run saved.

    python bench/verifier_picks.py math=/tmp/mv/seed0 math=/tmp/mv/seed1 math=/tmp/mv/seed2 --name verifier_picks

Each argument is ``LABEL=RUN_DIR`` of a verifier run (bench/math_verifier.py --keep, or the vb
runs of bench/verification.py); the run's ``heldout_scores.jsonl`` holds every held-out trial
with the verifier's score of the whole trial. Per run, over its problems (N = all their trials):

- the pooled and the within-problem AUROC (metarl_llm.verify.calibration);
- the trial with the highest score (best-of-N's pick) and the one with the lowest: their
  success and the share of the problem's trials that gave their answer ("answer share"),
  against a random trial's;
- the within-problem Spearman correlation of the score's distance from its problem's median
  with the answer share (negative: atypical trials get the extreme scores);
- a verifier-weighted vote at each N of the run (each answer scored by the sum of its trials'
  scores, the first N trials of each problem) beside maj@N.

Results: bench/results/<name>.json and <name>_table.md (per label: mean ± std over its runs).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from metarl_llm.verify.best_of_n import best_of_n  # noqa: E402
from metarl_llm.verify.calibration import auroc, midranks, within_problem_auroc  # noqa: E402


def load(run_dir: Path) -> dict[int, list[dict]]:
    """The run's held-out trials by problem, in best-of-N's order."""
    path = run_dir / "heldout_scores.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} not found: run job=train_verifier (this commit or later) into {run_dir}")
    problems: dict[int, list[dict]] = collections.defaultdict(list)
    for line in path.read_text().splitlines():
        row = json.loads(line)
        problems[row["group"]].append(row)
    return dict(problems)


def key(trial: dict) -> str:
    return (trial["answer"] or "").strip()


def shares(trials: list[dict]) -> np.ndarray:
    """[n] the share of ``trials`` that gave each trial's answer (no answer counts as "")."""
    counts = collections.Counter(key(t) for t in trials)
    return np.array([counts[key(t)] / len(trials) for t in trials])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (nan when either side is constant)."""
    ra, rb = midranks(a), midranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def weighted_vote(trials: list[dict]) -> float:
    """The outcome of the answer with the largest sum of scores (ties: the first seen; no
    answer votes for nothing; 0 when no trial answered)."""
    totals: dict[str, float] = {}
    first: dict[str, dict] = {}
    for t in trials:
        if key(t):
            totals[key(t)] = totals.get(key(t), 0.0) + t["score"]
            first.setdefault(key(t), t)
    if not totals:
        return 0.0
    best = max(totals, key=lambda a: totals[a])  # max keeps the first of equal totals
    return float(first[best]["outcome"] >= 1.0)


def analyse(problems: dict[int, list[dict]]) -> dict:
    grid = list(problems.values())
    n_all = len(grid[0])
    if any(len(ts) != n_all for ts in grid):
        raise SystemExit(f"every problem needs the same number of held-out trials, got {sorted({len(ts) for ts in grid})}")
    scores = np.array([[t["score"] for t in ts] for ts in grid])  # [P, N]
    labels = np.array([[t["outcome"] >= 1.0 for t in ts] for ts in grid], dtype=float)
    answers = np.empty(scores.shape, dtype=object)
    answers[...] = [[t["answer"] for t in ts] for ts in grid]
    groups = np.repeat(np.arange(len(grid)), n_all)
    within, mixed = within_problem_auroc(scores.ravel(), labels.ravel(), groups)
    ns = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= n_all]
    ends = sorted({*ns, n_all})
    high = best_of_n(scores, labels, ends, answers=answers)  # the highest score's pick, maj@N, shares
    low = best_of_n(-scores, labels, [n_all], answers=answers)  # the lowest score's pick
    at = ends.index(n_all)
    dev = [spearman(np.abs(s - np.median(s)), shares(ts)) for s, ts in zip(scores, grid)]
    return {
        "problems": len(grid),
        "trials": int(scores.size),
        "success": float(labels.mean()),
        "auroc": auroc(scores.ravel(), labels.ravel()),
        "within_problem_auroc": within,
        "mixed_problems": mixed,
        "highest_success": high["best_of_n"][at],
        "highest_answer_share": high["pick_answer_share"][at],
        "lowest_success": low["best_of_n"][0],
        "lowest_answer_share": low["pick_answer_share"][0],
        "answer_share": high["answer_share"][at],
        "spearman_distance_share": float(np.nanmean(dev)),
        "n": ns,
        "weighted_vote": [float(np.mean([weighted_vote(ts[:n]) for ts in grid])) for n in ns],
        "maj": [high["maj_at_n"][ends.index(n)] for n in ns],
    }


FIELDS = [
    ("success", "random trial's success"),
    ("highest_success", "highest-scored trial's success (best-of-N)"),
    ("lowest_success", "lowest-scored trial's success"),
    ("answer_share", "random trial's answer share"),
    ("highest_answer_share", "highest-scored trial's answer share"),
    ("lowest_answer_share", "lowest-scored trial's answer share"),
    ("spearman_distance_share", "Spearman(|score - problem median|, answer share)"),
    ("auroc", "AUROC, pooled"),
    ("within_problem_auroc", "AUROC within problems"),
]


def render(out: dict) -> str:
    def ms(values) -> str:
        v = [x for x in values if x is not None and np.isfinite(x)]
        return f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else (f"{v[0]:.3f}" if v else "n/a")

    labels = list(out["runs"])
    lines = [
        "Mean ± std over each label's runs (" + "; ".join(f"{k}: {len(v)}" for k, v in out["runs"].items()) + "). "
        "N = all of a problem's held-out trials.",
        "",
        "| figure | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for field, name in FIELDS:
        lines.append(f"| {name} | " + " | ".join(ms([r[field] for r in out["runs"][k].values()]) for k in labels) + " |")
    lines += ["", "| label | N | maj@N | verifier-weighted vote |", "|---|---|---|---|"]
    for k in labels:
        runs = list(out["runs"][k].values())
        for i, n in enumerate(runs[0]["n"]):
            lines.append(f"| {k} | {n} | {ms([r['maj'][i] for r in runs])} | {ms([r['weighted_vote'][i] for r in runs])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="LABEL=RUN_DIR of a job=train_verifier run")
    ap.add_argument("--name", default="verifier_picks")
    args = ap.parse_args()
    out: dict = {"runs": {}}
    for spec in args.runs:
        label, sep, run_dir = spec.partition("=")
        if not sep:
            raise SystemExit(f"{spec!r}: expected LABEL=RUN_DIR")
        out["runs"].setdefault(label, {})[run_dir] = analyse(load(Path(run_dir)))
    RESULTS = ROOT / "bench" / "results"
    (RESULTS / f"{args.name}.json").write_text(json.dumps(out, indent=1) + "\n")
    table = render(out)
    (RESULTS / f"{args.name}_table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
