"""Real-format data with the tiny model (issue 15, item 11): when a MATH-format file's expert
traces do not fit the budget, the error names the smallest budget that fits all of them.

The expected numbers are counted here by tokenising the traces the warm start draws (the
same draws as ``expert_records``: a reset seed, the number of failed episodes, the trace),
each episode ending in one delimiter token or, the last, in EOS.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pytest

from metarl_llm.core.trial import StreamCodec
from metarl_llm.models import build_char_tokenizer, load_policy
from metarl_llm.runtime.setup import env_factory
from metarl_llm.sft.warm_start import expert_records, warm_start

# MATH format: ``problem`` and a ``solution`` whose last \boxed{} is the answer (no ``answer`` field).
MATH_ROWS = [
    {"problem": "What is $14+15$?", "solution": "Adding, $14+15=29$, so the answer is $\\boxed{29}$."},
    {"problem": "Compute $3\\cdot 10$.", "solution": "We multiply: $3\\cdot 10=30$. The answer is $\\boxed{30}$."},
    {"problem": "Simplify $\\frac{4}{12}$.", "solution": "Cancel $4$: $\\frac{4}{12}=\\boxed{\\frac{1}{3}}$."},
    {"problem": "Solve $x+2=9$ for $x$.", "solution": "Subtract $2$ from both sides: $x=7$. So $x=\\boxed{7}$."},
    {"problem": "What is $6+8$?", "solution": "Adding, $6+8=14$, so the answer is $\\boxed{14}$."},
    {"problem": "Compute $7\\cdot 5$.", "solution": "We multiply: $7\\cdot 5=35$. The answer is $\\boxed{35}$."},
    {"problem": "Simplify $\\frac{3}{6}$.", "solution": "Cancel $3$: $\\frac{3}{6}=\\boxed{\\frac{1}{2}}$."},
    {"problem": "Solve $x+5=11$ for $x$.", "solution": "Subtract $5$ from both sides: $x=6$. So $x=\\boxed{6}$."},
    {"problem": "What is $9+13$?", "solution": "Adding, $9+13=22$, so the answer is $\\boxed{22}$."},
    {"problem": "Compute $4\\cdot 12$.", "solution": "We multiply: $4\\cdot 12=48$. The answer is $\\boxed{48}$."},
]


@pytest.fixture
def math_file(tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in MATH_ROWS))
    return str(path)


def counted_needs(make_env, tokenizer, num: int, n_failed_max: int, variety: float, seed: int) -> tuple[int, int, int]:
    """(longest episode, longest trace, longest prompt) in tokens over the traces
    ``expert_records(make_env, ..., num, n_failed_max, variety, seed)`` draws."""
    env = make_env("train")
    rng = np.random.default_rng(seed)
    episode = total = prompt_len = 0
    for _ in range(num):
        prompt, _ = env.reset(seed=int(rng.integers(2**31 - 1)))
        n_failed = int(rng.integers(0, n_failed_max + 1))
        episodes = env.unwrapped.expert_trace(rng, n_failed=n_failed, variety=variety)
        sizes = [len(tokenizer.encode(e, add_special_tokens=False)) + 1 for e in episodes]  # + delimiter / EOS
        episode, total = max(episode, *sizes), max(total, sum(sizes))
        prompt_len = max(prompt_len, len(tokenizer.encode(prompt, add_special_tokens=True)))
    return episode, total, prompt_len


def smallest(episode: int, total: int) -> str:
    return f"the smallest budget that fits them is budget.max_episode_tokens={episode} budget.max_total_tokens={total}"


def test_the_error_names_the_smallest_budget_for_all_traces(compose_cfg, math_file):
    cfg = compose_cfg("env=math", f"env.dataset={math_file}")
    tok = build_char_tokenizer()
    codec = StreamCodec(tok, "\n", "Answer:")
    make_env = env_factory(cfg)
    num, n_failed_max, variety = 40, 2, 1.0  # variety 1: every final episode writes the solution out
    episode, total, prompt_len = counted_needs(make_env, tok, num, n_failed_max, variety, seed=0)
    budget = cfg.budget
    assert episode > budget.max_episode_tokens and prompt_len <= budget.max_prompt_tokens  # the case of the issue

    with pytest.raises(ValueError) as err:
        expert_records(make_env, codec, budget, num, n_failed_max, variety, seed=0)
    assert str(err.value) == (
        f"budget.max_episode_tokens={budget.max_episode_tokens}{' and budget.max_total_tokens=96 are' if total > 96 else ' is'} "
        f"too small for the expert traces: the longest episode has {episode} tokens and the longest trace {total}; "
        + smallest(episode, total)
    )

    # That budget is enough, and it is the smallest: one token less on either limit fails.
    fits = replace(budget, max_episode_tokens=episode, max_total_tokens=total)
    records = expert_records(make_env, codec, fits, num, n_failed_max, variety, seed=0)
    assert len(records) == num
    assert max(sum(r["completion_mask"]) for r in records) == total
    with pytest.raises(ValueError, match=r"^budget\.max_episode_tokens=%d is too small" % (episode - 1)):
        expert_records(make_env, codec, replace(fits, max_episode_tokens=episode - 1), num, n_failed_max, variety, seed=0)
    with pytest.raises(
        ValueError, match=r"^budget\.max_total_tokens=%d is too small .*" % (total - 1) + re.escape(smallest(episode, total))
    ):
        expert_records(make_env, codec, replace(fits, max_total_tokens=total - 1), num, n_failed_max, variety, seed=0)


def test_a_long_prompt_is_named_with_the_rest(compose_cfg, math_file):
    cfg = compose_cfg("env=math", f"env.dataset={math_file}")
    tok = build_char_tokenizer()
    make_env = env_factory(cfg)
    episode, total, prompt_len = counted_needs(make_env, tok, 20, 0, 0.0, seed=3)
    budget = replace(cfg.budget, max_episode_tokens=episode, max_total_tokens=total, max_prompt_tokens=prompt_len - 1)
    with pytest.raises(ValueError) as err:
        expert_records(make_env, StreamCodec(tok, "\n", "Answer:"), budget, 20, 0, 0.0, seed=3)
    assert str(err.value) == (
        f"budget.max_prompt_tokens={prompt_len - 1} is too small for the expert traces: the longest episode has "
        f"{episode} tokens, the longest trace {total} and the longest prompt {prompt_len}; "
        + smallest(episode, total)
        + f" budget.max_prompt_tokens={prompt_len}"
    )


def test_warm_start_names_one_budget_for_both_phases_before_training(compose_cfg, math_file, tmp_path, monkeypatch):
    """A budget that fits the focused phase's traces (the solved episode alone) but not the
    varied phase's (failed attempts before it): the warm start must say so, with the budget
    for both phases, before it spends any time training."""
    cfg = compose_cfg(
        "env=math",
        f"env.dataset={math_file}",
        "warm_start.steps=4",
        "warm_start.num_traces=24",
        f"warm_start.cache_dir={tmp_path / 'cache'}",
        "model.tiny.hidden_size=32",
        "model.tiny.num_layers=1",
        "model.tiny.num_heads=2",
        "model.tiny.intermediate_size=64",
    )
    ws = cfg.warm_start

    def no_training(*args, **kwargs):
        raise AssertionError("the warm start trained before checking the budget of all its traces")

    policy, tok = load_policy(cfg.model, 0)
    codec = StreamCodec(tok, "\n", "Answer:")
    make_env = env_factory(cfg)
    focused = counted_needs(make_env, tok, ws.num_traces, 0, 0.0, seed=0)
    n_varied = ws.num_traces - round(ws.num_traces * ws.replay_fraction)  # the rest of the varied phase replays focused traces
    varied = counted_needs(make_env, tok, n_varied, ws.n_failed_max, ws.variety, seed=1)
    episode, total = max(focused[0], varied[0]), max(focused[1], varied[1])
    focused_only = replace(cfg.budget, max_episode_tokens=episode, max_total_tokens=focused[1])
    assert focused[1] < varied[1]  # the focused traces fit it, the varied ones do not

    with pytest.raises(ValueError, match=re.escape(smallest(episode, total)) + "$"):
        warm_start(policy, tok, codec, make_env, cfg.model, cfg.env, focused_only, ws, 0, fit=no_training)
    fits = replace(cfg.budget, max_episode_tokens=episode, max_total_tokens=total)
    assert len(expert_records(make_env, codec, fits, ws.num_traces, 0, 0.0, seed=0)) == ws.num_traces
    assert len(expert_records(make_env, codec, fits, n_varied, ws.n_failed_max, ws.variety, seed=1)) == n_varied


def test_budget_fit_traces_derives_the_limits_from_the_data(compose_cfg, math_file):
    """budget=fit: each token limit becomes the larger of its set value and what the data needs,
    counted here independently (the traces of both warm-start phases, the prompts of both splits,
    the longest reference answer with its stop token)."""
    from metarl_llm.sft.warm_start import fitted_budget

    cfg = compose_cfg("env=math", f"env.dataset={math_file}", "budget=fit", "warm_start.num_traces=30")
    assert cfg.budget.fit_traces
    tok = build_char_tokenizer()
    codec = StreamCodec(tok, "\n", "Answer:")
    make_env = env_factory(cfg)
    ws = cfg.warm_start
    focused = counted_needs(make_env, tok, ws.num_traces, 0, 0.0, seed=5)
    varied = counted_needs(make_env, tok, ws.num_traces, ws.n_failed_max, ws.variety, seed=6)
    rows = [dict(r, answer=re.search(r"boxed\{(.*)\}\$", r["solution"]).group(1)) for r in MATH_ROWS]
    answer = max(len(tok.encode(" " + r["answer"], add_special_tokens=False)) + 1 for r in rows)
    prompt = max(len(tok.encode(r["problem"] + "\n", add_special_tokens=True)) for r in MATH_ROWS)
    fitted = fitted_budget(make_env, codec, cfg.budget, ws, 5)
    default = cfg.budget
    assert fitted.max_episode_tokens == max(default.max_episode_tokens, focused[0], varied[0]) > default.max_episode_tokens
    assert fitted.max_total_tokens == max(default.max_total_tokens, focused[1], varied[1]) > default.max_total_tokens
    assert fitted.answer_max_tokens == max(default.answer_max_tokens, answer) == answer  # \frac{1}{3}: 13 characters
    assert fitted.max_prompt_tokens == max(default.max_prompt_tokens, prompt) and fitted.max_episodes == default.max_episodes
    # the warm start's traces now fit, in both phases
    assert len(expert_records(make_env, codec, fitted, ws.num_traces, ws.n_failed_max, ws.variety, seed=6)) == ws.num_traces
