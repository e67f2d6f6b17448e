"""What the policies of bench/adaptation.py's ``no_feedback`` setting do with their episodes (issue 19).

    python bench/inverse_probe.py WARM_START_DIR TRAINED_POLICY_DIR [--episodes 3 6 12] [--overrides ...] [--split train]

Plays each policy on env=inverse (find x with (a*x + b) mod 10 = y; no reply from the
environment) with k episodes for each k of ``--episodes``, at least ``--trials`` trials (256) on every
problem of ``--split`` (``test``, the held-out problems; ``train``, those PPO and the warm start
trained on), the same number of times each, sampling at temperature 1 with a fixed seed, and counts what the
task's search needs, per check episode (``try x: a*x+b=v -> r ...``):

- ``checks``: episodes that propose a candidate; ``right``: of them, those whose written check
  (a*x+b=v and its last digit) is the true one, also split by x < 3 (the only candidates the
  focused expert checked when it counted from 0, before commit d282ca1) and x >= 3;
- ``repeats``: candidates the trial had already checked (a search that adapts never repeats);
- ``false commits``: commits after a check whose written result is not y; ``missed``: a
  candidate that solves (by the true arithmetic) not committed; ``wrong commits``: commits of a
  candidate that does not solve (a false commit, or a check invented to agree with y);
  ``commits on a wrong check``: commits whose written check is not the true arithmetic;
  ``wrong checks that flip the verdict``: wrong checks whose written result agrees with y where the
  true one does not, or the reverse (the other arithmetic errors cannot change a search's outcome);
- with ``env.write_comparison=true`` (``--overrides``; checks end ``-> r vs y``): ``comparisons``
  written, ``y copied`` (the written y is the prompt's), and ``decided as written`` (commits iff the
  two written digits agree);
- success, episodes per trial, and successes by the episode that committed (``forced``: the
  guess after the budget). The blind expert's search reaches (k + 1)/10.

``--overrides``: the run's config overrides beyond ``env=inverse`` (e.g. ``env.write_comparison=true
budget=fit``); with ``budget=fit`` the budget is fitted as the run fitted it (seed ``--seed``).
WARM_START_DIR: a warm-start cache entry (``<warm_start.cache_dir>/<key>/``); TRAINED_POLICY_DIR:
a checkpoint's ``policy/``, or the final ``policy/`` of a run (bench/adaptation.py ``--keep``).
"""

import argparse
import re
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from metarl_llm.evaluation.adaptation import episode_budget  # noqa: E402
from metarl_llm.jobs.common import fitted_budgets, stream_codec  # noqa: E402
from metarl_llm.models import load_policy  # noqa: E402
from metarl_llm.rollout.engine import heldout_resets, run_trials  # noqa: E402
from metarl_llm.runtime.setup import compose_config, env_factory, heldout_env_maker  # noqa: E402

CHECK = re.compile(r"try (\d+): (\d+)\*(\d+)\+(\d+)=(\d+) -> (\d+)(?: vs (\d+))?")
PROBLEM = re.compile(r"inverse:(\d+)x\+(\d+)=(\d+)mod(\d+)")


def probe(trials) -> dict:
    counts = Counter()
    found_at = Counter()
    for t in trials:
        a, b, y, m = (int(v) for v in PROBLEM.match(t.problem_id).groups())
        tried = set()
        for j, text in enumerate(t.episode_texts):
            if t.forced and j == len(t.episode_texts) - 1:
                break  # the forced answer: a guess, no check
            c = CHECK.search(text)
            if c is None:
                counts["malformed"] += 1
                continue
            x = int(c.group(1))
            counts["checks"] += 1
            v = a * x + b
            right = c.groups()[1:6] == (str(a), str(x), str(b), str(v), str(v % m))
            counts["right"] += right
            # counting from 0 (before d282ca1) the focused expert checked only 0, 1, 2: were the others learned?
            counts["checks of x < 3" if x < 3 else "checks of x >= 3"] += 1
            counts["right of x < 3" if x < 3 else "right of x >= 3"] += right
            counts["repeats"] += x in tried
            tried.add(x)
            commits = "Answer:" in text
            solves = v % m == y
            counts["false commits"] += commits and int(c.group(6)) != y
            counts["missed"] += solves and not commits
            counts["wrong commits"] += commits and not solves  # whatever its check says: the trial fails
            counts["commits on a wrong check"] += commits and not right
            # a wrong check whose written result agrees with y where the true one does not, or the reverse:
            # the only arithmetic errors that can change the outcome of a search that follows its checks
            counts["wrong checks that flip the verdict"] += not right and (int(c.group(6)) == y) != solves
            if c.group(7) is not None:  # env.write_comparison: "-> r vs y"
                counts["comparisons"] += 1
                counts["y copied"] += int(c.group(7)) == y
                counts["decided as written"] += commits == (c.group(6) == c.group(7))
        if t.outcome >= 1:
            found_at["forced" if t.forced else len(t.episode_texts)] += 1
    n = len(trials)
    return {
        "success": sum(t.outcome for t in trials) / n,
        "episodes_per_trial": sum(len(t.episode_texts) for t in trials) / n,
        **counts,
        "successes_by_episode": dict(sorted(found_at.items(), key=lambda kv: (isinstance(kv[0], str), kv[0]))),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", nargs="+", type=int, default=[3, 6, 12])
    ap.add_argument("--trials", type=int, default=256)
    ap.add_argument("--overrides", nargs="*", default=[], help="the run's overrides beyond env=inverse")
    ap.add_argument("--seed", type=int, default=0, help="the run's warm-start seed (fits budget=fit as it did)")
    ap.add_argument(
        "--split",
        choices=["test", "train"],
        default="test",
        help="the problems played: held-out (test) or those PPO and the warm start trained on (train)",
    )
    ap.add_argument("paths", nargs=2, metavar="DIR")
    args = ap.parse_args()
    cfg = compose_config(["env=inverse", *args.overrides])
    torch.set_num_threads(1)
    mk = None
    for name, path in zip(["warm-started", "trained"], args.paths):
        model, tok = load_policy(cfg.model, 0, path=path)
        model.eval()
        codec = stream_codec(cfg, tok)
        if mk is None:  # the run's budget, fitted as jobs.common.base_policy fits it (budget=fit)
            cfg.budget = fitted_budgets(cfg, codec, args.seed)[0]
            mk = heldout_env_maker(cfg) if args.split == "test" else lambda b: env_factory(replace(cfg, budget=b))("train")
        for k in args.episodes:
            b = episode_budget(cfg.budget, k)
            problems = mk(b).unwrapped.num_problems  # every problem of the split, samples of each
            resets, groups = heldout_resets(problems, -(-args.trials // problems))
            trials = run_trials(model, codec, [mk(b) for _ in resets], resets, groups, b, torch.Generator().manual_seed(0))
            print(f"{name}, {k} episodes: {probe(trials)}", flush=True)
            if k == args.episodes[0]:
                for t in trials[:: len(trials) // 3][:3]:
                    print(f"   {t.problem_id}: {t.episode_texts} outcome {t.outcome}")


if __name__ == "__main__":
    main()
