"""Why the feedback settings of bench/adaptation.py do or do not gain from more episodes (issue 19).

    python bench/adaptation_probe.py WARM_START_DIR TRAINED_POLICY_DIR
    python bench/adaptation_probe.py --hidden-digits 1 --episodes 8 WARM_START_DIR TRAINED_POLICY_DIR   # feedback_hidden

Plays each policy on planted_subseq with digits feedback and retries (the bench's ``feedback``
setting) at 4 episodes, 256 held-out problems x 2 trials, sampling at temperature 1 with a fixed
seed, and counts: trials that went past a failed first attempt, how many of them succeeded
later, and how many second attempts kept every digit the reply had confirmed. Prints four such
trials per policy. Also counts, over every attempt after the first, how many write at some gold
position a digit an earlier reply rejected there (``repeats``: what a policy that adapts never
does), and, with ``--hidden-digits``, the episode at which successful trials found the gold.
WARM_START_DIR: a warm-start cache entry (``<warm_start.cache_dir>/<key>/``);
TRAINED_POLICY_DIR: a checkpoint's ``policy/``.
"""

import argparse
import sys
from collections import Counter

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
from metarl_llm.evaluation.adaptation import episode_budget
from metarl_llm.jobs.common import stream_codec
from metarl_llm.models import load_policy
from metarl_llm.rollout.engine import heldout_resets, run_trials
from metarl_llm.runtime.setup import compose_config, heldout_env_maker

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--hidden-digits", type=int, default=0)
ap.add_argument("--episodes", type=int, default=4)
ap.add_argument("paths", nargs=2, metavar="DIR")
args = ap.parse_args()
cfg = compose_config(
    ["env=planted_subseq", "env.feedback=true", "env.feedback_detail=digits", "env.retry_wrong_answers=true"]
    + [f"env.hidden_digits={args.hidden_digits}"]
)
torch.set_num_threads(1)


def attempt_digits(text: str) -> str:
    return "".join(c for c in text.split("Answer:")[-1] if c.isdigit())[:3]


for name, path in zip(["warm-started", "trained"], args.paths):
    model, tok = load_policy(cfg.model, 0, path=path)
    model.eval()
    codec = stream_codec(cfg, tok)
    b = episode_budget(cfg.budget, args.episodes)
    mk = heldout_env_maker(cfg)
    P, k = 256, 2
    resets, groups = heldout_resets(P, k)
    trials = run_trials(model, codec, [mk(b) for _ in range(P * k)], resets, groups, b, torch.Generator().manual_seed(0))
    n = len(trials)
    first_fail = later_ok = two = kept = attempts = repeats = 0
    found_at = Counter()
    examples = []
    for t in trials:
        gold = t.grader.reference_answer if hasattr(t.grader, "reference_answer") else None
        ep = t.episode_texts
        if gold:
            rejected = [set() for _ in gold]
            for j, e in enumerate(ep):
                g = attempt_digits(e)
                if j:
                    attempts += 1
                    repeats += any(i < len(g) and g[i] in rejected[i] for i in range(len(gold)))
                for i, d in enumerate(g):
                    if d != gold[i]:
                        rejected[i].add(d)
            if t.outcome >= 1:
                found_at[len(ep)] += 1
        if len(ep) > 1 or t.outcome < 1:  # the first attempt failed (a retry follows only a wrong answer)
            first_fail += 1
            later_ok += t.outcome >= 1
            if len(ep) > 1 and gold:
                d0 = [c for c in ep[0].split("Answer:")[-1] if c.isdigit()][:3]
                d1 = [c for c in ep[1].split("Answer:")[-1] if c.isdigit()][:3]
                conf = [i for i, g in enumerate(gold) if i < len(d0) and d0[i] == g]
                two += 1
                kept += all(i < len(d1) and d1[i] == gold[i] for i in conf)
            if len(examples) < 4:
                examples.append((gold, ep, t.outcome))
    succ = sum(t.outcome for t in trials) / n
    eps = sum(len(t.episode_texts) for t in trials) / n
    print(
        f"{name}: success {succ:.3f}, episodes/trial {eps:.2f}; trials past a failed first attempt {first_fail}, "
        f"of them succeeded later {later_ok}; with a 2nd attempt {two}, which kept every confirmed digit {kept}; "
        f"attempts after the first {attempts}, which wrote a digit a reply had rejected at its position {repeats}; "
        f"successes by the episode that found the gold {dict(sorted(found_at.items()))}"
    )
    for e in examples:
        print("   gold", e[0], "episodes", e[1], "outcome", e[2])
