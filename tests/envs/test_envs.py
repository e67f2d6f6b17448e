"""The environments: registration, the trial protocol, splits, expert traces, bad input."""

from __future__ import annotations

import importlib
import json
import pathlib
import re
import time

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.planted_subseq import _rule

NAMES = ["arc", "inverse", "math", "planted_subseq", "reasoning_gym"]
# Small reasoning-gym pools keep the tests fast; everything else runs at its defaults.
DEFAULTS = {"arc": {}, "inverse": {}, "math": {}, "planted_subseq": {}, "reasoning_gym": {"size": 300}}


def make(name: str, **kwargs):
    return gymnasium.make(envs.ENV_IDS[name], **{**DEFAULTS[name], **kwargs}).unwrapped


def correct_episode(env) -> str:
    """An uncommitted episode that holds the right answer (for feedback)."""
    return env.reference_answer


def wrong_answer(env) -> str:
    if getattr(env, "modulus", None):  # inverse: every integer is some residue; take a wrong one
        return str((int(env.reference_answer) + 1) % env.modulus)
    return "999999" if env.reference_answer != "999999" else "1"


# ------------------------------------------------------------------ registration


def test_registration_is_idempotent():
    importlib.reload(envs)
    importlib.reload(envs)
    for env_id in envs.ENV_IDS.values():
        assert env_id in gymnasium.registry
    assert set(envs.ENV_IDS) == set(NAMES)


def test_envs_never_import_the_framework():
    for path in pathlib.Path(envs.__file__).parent.glob("*.py"):
        assert not re.search(r"^\s*(from|import)\s+metarl_llm", path.read_text(), re.M), path


@pytest.mark.parametrize("name", NAMES)
def test_check_env(name):
    check_env(make(name), skip_render_check=True)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_kwarg_is_named(name):
    with pytest.raises(TypeError, match="bogus_option"):
        make(name, bogus_option=1)


@pytest.mark.parametrize("name", NAMES)
def test_constructor_is_cheap_once_cached(name):
    make(name)
    start = time.monotonic()
    for _ in range(64):
        make(name)
    assert time.monotonic() - start < 1.0


# ------------------------------------------------------------------------ splits


def prompts(env, limit: int) -> list[str]:
    n = env.num_problems if env.num_problems is not None else limit
    return [env.reset(options={"index": i})[0] for i in range(min(n, limit))]


@pytest.mark.parametrize("name", NAMES)
def test_train_and_test_never_overlap(name):
    train, test = make(name, split="train"), make(name, split="test")
    train_prompts, test_prompts = set(prompts(train, 3000)), set(prompts(test, 3000))
    assert len(test_prompts) >= 20 and len(train_prompts) >= 4 * len(test_prompts) // 2
    assert not train_prompts & test_prompts
    if name == "math":  # stronger: no arithmetic is shared, whatever its surface form
        exprs = {s: {r["expr"] for r in make(name, split=s)._records} for s in ("train", "test")}
        assert not exprs["train"] & exprs["test"]


@pytest.mark.parametrize("name", NAMES)
def test_fixed_index_gives_the_same_problem(name):
    a, b = make(name, split="test"), make(name, split="test")
    prompt_a, info_a = a.reset(seed=1, options={"index": 7})
    prompt_b, info_b = b.reset(seed=2, options={"index": 7})
    assert prompt_a == prompt_b and info_a["problem_id"] == info_b["problem_id"]
    assert a.reference_answer == b.reference_answer
    assert info_a["split"] == "test" and info_a["index"] == 7


@pytest.mark.parametrize("name", NAMES)
def test_index_out_of_range_raises(name):
    env = make(name, split="test")
    with pytest.raises(IndexError):
        env.reset(options={"index": env.num_problems})


# ---------------------------------------------------------------- trial protocol


@pytest.mark.parametrize("name", NAMES)
def test_committed_answer_terminates_with_the_outcome(name):
    env = make(name)
    env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step("let me think")
    assert (obs, reward, terminated, truncated) == ("", 0.0, False, False)
    assert info["episode_index"] == 0 and info["answer"] is None
    obs, reward, terminated, truncated, info = env.step(f"so {env.answer_marker} {env.reference_answer}")
    assert terminated and not truncated and reward == 1.0
    assert info["correct"] and info["answer"] == env.reference_answer and info["episode_index"] == 1
    with pytest.raises(RuntimeError):
        env.step("again")
    with pytest.raises(RuntimeError):
        env.force_answer()

    env.reset(seed=0)
    _, reward, terminated, _, info = env.step(f"{env.answer_marker} {wrong_answer(env)}")
    assert terminated and reward == 0.0 and not info["correct"]


@pytest.mark.parametrize("name", NAMES)
def test_max_episodes_forces_an_answer(name):
    env = make(name, max_episodes=2)
    env.reset(seed=3)
    assert env.step("first try")[0] == ""
    obs, reward, terminated, _, _ = env.step("second try")
    assert obs == env.forced_answer_text and reward == 0.0 and not terminated
    _, reward, terminated, _, info = env.step(f" {env.reference_answer} ")
    assert terminated and info["forced"] and info["answer"] == env.reference_answer and reward == 1.0


@pytest.mark.parametrize("name", NAMES)
def test_force_answer_then_step(name):
    env = make(name)
    env.reset(seed=4)
    env.step("thinking")
    assert env.force_answer() == env.forced_answer_text
    _, reward, terminated, _, info = env.step(env.reference_answer)
    assert terminated and info["forced"] and reward == 1.0


@pytest.mark.parametrize("name", NAMES)
def test_reset_rejects_unknown_options(name):
    env = make(name)
    with pytest.raises(ValueError, match="bogus"):
        env.reset(options={"bogus": 1})


@pytest.mark.parametrize("name", NAMES)
def test_feedback_gives_verdicts(name):
    env = make(name, feedback=True)
    env.reset(seed=5)
    obs, _, _, _, info = env.step(wrong_answer(env))
    assert obs == "[wrong]" + env.episode_delimiter and not info["correct"]
    obs, _, _, _, info = env.step(correct_episode(env))
    assert obs == "[correct]" + env.episode_delimiter and info["correct"]
    assert make(name).reset(seed=5) and make(name, feedback=False).feedback is False


# ----------------------------------------------------------------- expert traces


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("variety", [0.0, 0.5, 1.0])
def test_expert_traces_solve_the_problem(name, variety):
    # inverse's default expert is blind (its trials may fail: tests/envs/test_inverse.py); the
    # n_failed contract is its informed expert's
    env = make(name, max_episodes=3, **({"expert_search": "informed"} if name == "inverse" else {}))
    rng = np.random.default_rng(0)
    for index in range(6):
        for n_failed in range(3):
            env.reset(options={"index": index})
            trace = env.expert_trace(rng, n_failed=n_failed, variety=variety)
            assert len(trace) == n_failed + 1
            assert env.answer_marker in trace[-1]
            for episode in trace[:-1]:
                assert env.answer_marker not in episode
                assert env.score_episode(episode) == 0.0, (trace, env.reference_answer)
            for j, episode in enumerate(trace):
                obs, reward, terminated, _, info = env.step(episode)
                assert terminated == (j == n_failed), trace
            assert reward == 1.0 and info["correct"], trace


@pytest.mark.parametrize("name", NAMES)
def test_trace_variety(name):
    env = make(name)
    for index in range(5):
        env.reset(options={"index": index})
        focused = {tuple(env.expert_trace(np.random.default_rng(s), 2, 0.0)) for s in range(5)}
        assert len(focused) == 1
    varied = set()
    for index in range(5):
        env.reset(options={"index": index})
        varied |= {tuple(env.expert_trace(np.random.default_rng(s), 2, 1.0)) for s in range(8)}
    assert len(varied) > 5 * 2


@pytest.mark.parametrize("name", NAMES)
def test_expert_trace_must_fit_the_budget(name):
    env = make(name, max_episodes=2)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="n_failed"):
        env.expert_trace(np.random.default_rng(0), n_failed=2, variety=0.0)
    with pytest.raises(ValueError, match="variety"):
        env.expert_trace(np.random.default_rng(0), n_failed=0, variety=1.5)


# -------------------------------------------------------------- hostile answers


@pytest.mark.parametrize("name", NAMES)
def test_empty_garbage_and_huge_answers_score_zero_fast(name):
    env = make(name)
    env.reset(seed=0)
    for answer in ["", "   ", "\x00", "qwerty!?", "7" * 200_000, "x" * 200_000, "Answer:" * 30_000]:
        start = time.monotonic()
        assert env.score(answer) == 0.0
        assert env.score_episode(answer) == 0.0
        assert time.monotonic() - start < 5.0


HOSTILE = [
    "__import__('os').system('touch {marker}')",
    "open('{marker}', 'w')",
    "9**9**9**9",
    "10**10**10",
    "(" * 10_000 + ")" * 10_000,
]


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("math", {}),
        ("planted_subseq", {}),
        ("reasoning_gym", {}),
        # These scorers eval() the answer or hand it to sympy's parse_expr.
        ("reasoning_gym", {"task": "n_queens", "size": 20, "grading_timeout_s": 1.0}),
        ("reasoning_gym", {"task": "spiral_matrix", "size": 20, "grading_timeout_s": 1.0}),
        ("reasoning_gym", {"task": "countdown", "size": 10, "grading_timeout_s": 1.0}),
    ],
)
def test_hostile_answers_score_zero_in_bounded_time(name, kwargs, tmp_path):
    env = make(name, **kwargs)
    env.reset(seed=0)
    marker = tmp_path / "pwned"
    # A call may pay the grading timeout plus the start of a fresh worker (the previous
    # hostile answer got its worker killed): imports take 1-3 s, more on a loaded machine.
    bound = kwargs.get("grading_timeout_s", 2.0) + 15.0
    for answer in HOSTILE:
        answer = answer.replace("{marker}", str(marker))
        start = time.monotonic()
        score = env.score(answer)
        assert time.monotonic() - start < bound, answer[:40]
        if name == "reasoning_gym":
            # reasoning-gym's own partial credit: "10**10**10" holds a reference "1" (0.1).
            assert score < 1.0
        else:
            assert score == 0.0
    assert not marker.exists()


# --------------------------------------------------------------- planted subseq


def test_planted_prompt_is_just_the_digits_and_score_is_substring():
    env = make("planted_subseq")
    positions, shifts = _rule(0, 6, 3)
    for index in range(20):
        prompt, info = env.reset(options={"index": index})
        digits, gold = prompt[:-1], env.reference_answer
        assert prompt == digits + "\n" and digits.isdigit() and len(digits) == 6
        assert info["problem_id"] == f"planted:{digits}" and gold not in str(info)
        assert gold == "".join(str((int(digits[p]) + s) % 10) for p, s in zip(positions, shifts))
        assert env.score(f"12{gold}34") == 1.0
        assert env.score(gold[:-1]) == 0.0 and env.score(" ".join(gold)) == 0.0
    # The stream holds the gold: an earlier episode counts even if the final answer misses.
    env.reset(options={"index": 0})
    gold = env.reference_answer
    env.step(f"5{gold}")
    _, reward, terminated, _, _ = env.step(f"{env.answer_marker} {'0' * 4 if '000' not in gold else '1111'}")
    assert terminated and reward == 1.0


def test_planted_families_have_different_rules():
    a, b = make("planted_subseq", family_seed=0), make("planted_subseq", family_seed=1)
    assert _rule(0, 6, 3) != _rule(1, 6, 3)
    golds = []
    for env in (a, b):
        env.reset(options={"index": 0})
        golds.append(env.reference_answer)
    assert make("planted_subseq", split="test", num_test_problems=10).num_problems == 10
    assert make("planted_subseq").num_problems is None


def test_planted_focused_trace_form():
    env = make("planted_subseq")
    env.reset(options={"index": 3})
    gold = env.reference_answer
    trace = env.expert_trace(np.random.default_rng(0), 2, 0.0)
    assert trace[-1] == f"Answer: {gold}0"
    assert all(len(t) == 4 and t.isdigit() and gold not in t for t in trace[:-1])


def test_planted_bad_config():
    with pytest.raises(ValueError, match="chunk_length"):
        make("planted_subseq", chunk_length=2)
    with pytest.raises(ValueError, match="test_fraction"):
        make("planted_subseq", test_fraction=0.0)


# ------------------------------------------------------------------------- math


def test_math_default_problems_are_short_one_digit_chains():
    env = make("math")
    stories = 0
    for index in range(env.num_problems):
        prompt, _ = env.reset(options={"index": index})
        assert len(prompt) <= 80 and prompt.endswith("\n")
        assert -10 <= int(env.reference_answer) <= 15  # three terms in 0..5 with + and -
        if re.fullmatch(r"\d[+-]\d[+-]\d=\?\n", prompt) is None:
            stories += 1
            assert prompt.endswith("?\n") and re.search(r"\d", prompt)
    assert 0.05 < stories / env.num_problems < 0.5


def test_math_canonical_trace_text():
    env = make("math")
    for index in range(env.num_problems):
        prompt, _ = env.reset(options={"index": index})
        if prompt.endswith("=?\n"):
            break
    expr, v = prompt[: -len("=?\n")], int(env.reference_answer)
    # Focused traces work left to right; the failed ones slip by -1, then +1, in the last step.
    a, o1, b, o2, c = expr
    s1 = int(a) + int(b) if o1 == "+" else int(a) - int(b)
    first = f"{a}{o1}{b}={s1} {s1}{o2}{c}="
    assert env.expert_trace(np.random.default_rng(0), 2, 0.0) == [f"{first}{v - 1}", f"{first}{v + 1}", f"{first}{v} Answer: {v}"]
    env.reset(options={"index": index})
    traces = {tuple(env.expert_trace(np.random.default_rng(s), 2, 1.0)) for s in range(20)}
    assert len(traces) > 5 and all(t[-1].endswith(f"Answer: {v}") for t in traces)


@pytest.mark.parametrize("name", ["math", "planted_subseq"])
def test_default_expert_episodes_are_short(name):
    """The tiny model is character-level: the default traces fit the default 32 tokens per episode (EOS included)."""
    env = make(name, split="test")
    rng = np.random.default_rng(0)
    for index in range(min(env.num_problems, 60)):
        env.reset(options={"index": index})
        for _ in range(5):
            assert max(len(e) for e in env.expert_trace(rng, 2, 1.0)) <= 31


def test_math_generator_options():
    env = make("math", ops="*/", min_value=1, max_value=12, num_terms=3, word_fraction=0.0, size=300)
    for index in range(20):
        prompt, _ = env.reset(options={"index": index})
        assert re.fullmatch(r"\d+[*/]\d+[*/]\d+=\?\n", prompt)
        assert env.score(env.reference_answer) == 1.0
    with pytest.raises(ValueError, match="ops"):
        make("math", ops="+^")


def write_jsonl(path: pathlib.Path, rows: list) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


MATH_ROWS = [{"problem": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(60)] + [
    {"problem": f"Simplify {i}/{2 * i}.", "solution": f"Divide: $\\boxed{{\\frac{{1}}{{2}}}}$ (case {i})."} for i in range(1, 41)
]


def test_math_loads_jsonl_and_splits_by_problem_hash(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", MATH_ROWS[:50] + [""] + MATH_ROWS[50:])  # a blank line is fine
    train, test = make("math", dataset=path), make("math", dataset=path, split="test")
    assert train.num_problems + test.num_problems == len(MATH_ROWS)
    assert not set(prompts(train, 1000)) & set(prompts(test, 1000))
    whole = make("math", dataset=path, dataset_split="test", split="test")
    assert whole.num_problems == len(MATH_ROWS)  # the file is the split: no hashing
    refs = {whole.reset(options={"index": i})[0]: whole.reference_answer for i in range(whole.num_problems)}
    assert refs["Simplify 3/6.\n"] == "\\frac{1}{2}" and refs["What is 4 plus 4?\n"] == "8"


def test_math_reads_gsm8k_answers(tmp_path):
    """GSM8K's answer field is the worked solution and a last line "#### <answer>": the
    final answer (thousands separators dropped) is graded, the working is the solution."""
    rows = [
        {"question": "Ann has 1200 pens and buys 34 more. How many?", "answer": "1200 + 34 = <<1200+34=1234>>1234\n#### 1,234"},
        {"question": "What is 2 times 3?", "answer": "6"},  # a plain answer is kept as it is
        {"question": "Hash #### inside a line", "answer": "x #### 5"},
    ]
    env = make("math", dataset=write_jsonl(tmp_path / "g.jsonl", rows), dataset_split="train", problem_key="question")
    env.reset(options={"index": 0})
    assert env.reference_answer == "1234" and env.score("1234") == 1.0
    trace = env.expert_trace(np.random.default_rng(0), 0, 1.0)
    assert trace[-1].startswith("1200 + 34 = <<1200+34=1234>>1234") and trace[-1].endswith("1234"), trace
    env.reset(options={"index": 1})
    assert env.reference_answer == "6"
    env.reset(options={"index": 2})
    assert env.reference_answer == "x #### 5"  # not the marker: left alone
    bad = write_jsonl(tmp_path / "b.jsonl", [{"question": "q", "answer": "work\n####  "}])
    with pytest.raises(ValueError, match="no final answer after it"):
        make("math", dataset=bad, dataset_split="train", problem_key="question")


def test_math_num_test_problems_caps_the_test_split(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", MATH_ROWS)
    assert make("math", dataset=path, dataset_split="test", split="test", num_test_problems=10).num_problems == 10
    assert make("math", dataset=path, dataset_split="test", split="test", num_test_problems=None).num_problems == 100
    assert make("math", dataset=path, dataset_split="train", num_test_problems=10).num_problems == 100  # train uncapped


def test_math_loaded_traces_and_grading(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", MATH_ROWS)
    env = make("math", dataset=path, dataset_split="train")
    for index in (3, 70):  # a numeric and a LaTeX reference
        env.reset(options={"index": index})
        for variety in (0.0, 1.0):
            trace = env.expert_trace(np.random.default_rng(index), 2, variety)
            assert [env.score_episode(t) for t in trace[:-1]] == [0.0, 0.0]
            rewards = [env.step(t)[1] for t in trace]
            assert rewards == [0.0, 0.0, 1.0], trace
            env.reset(options={"index": index})
    env.reset(options={"index": 70})
    assert env.score("0.5") == 1.0 and env.score("$\\dfrac{2}{4}$") == 1.0 and env.score("1/3") == 0.0


def test_math_loaded_traces_write_the_solution(tmp_path):
    """A record's solution is its working: the canonical solved episode writes it out before
    the answer (as a generated sum's "7+5=12 Answer: 12"); a varied one skips to the answer in
    one form of four; a record without a solution can only commit its answer."""
    env = make("math", dataset=write_jsonl(tmp_path / "m.jsonl", MATH_ROWS), dataset_split="train")
    prompt, _ = env.reset(options={"index": 70})  # "Simplify i/2i.", solution "Divide: $\\boxed{\\frac{1}{2}}$ (case i)."
    case = re.match(r"Simplify (\d+)/", prompt).group(1)
    written = f"Divide: $\\boxed{{\\frac{{1}}{{2}}}}$ (case {case}). Answer: \\frac{{1}}{{2}}"
    assert {env.expert_trace(np.random.default_rng(s), 1, 0.0)[-1] for s in range(20)} == {written}
    last = [env.expert_trace(np.random.default_rng(s), 0, 1.0)[-1] for s in range(400)]
    assert set(last) == {written, "Answer: \\frac{1}{2}"}
    assert 0.19 < last.count("Answer: \\frac{1}{2}") / len(last) < 0.31  # 1/4: binomial sd 0.022
    env.reset(options={"index": 3})  # "What is 3 plus 3?", an answer and no solution
    assert {env.expert_trace(np.random.default_rng(s), 0, v)[-1] for s in range(10) for v in (0.0, 1.0)} == {"Answer: 6"}


def test_math_loads_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist([{"q": "1+1?", "a": "2"}, {"q": "2+2?", "a": "4"}]), path)
    env = make("math", dataset=str(path), dataset_split="train", problem_key="q", answer_key="a")
    assert env.num_problems == 2 and env.reset(options={"index": 1})[0] == "2+2?\n"
    pq.write_table(pa.Table.from_pylist([{"q": "1+1?", "a": "2"}, {"q": "2+2?", "a": None}]), path)
    with pytest.raises(ValueError, match="row 2"):
        make("math", dataset=str(path), problem_key="q", answer_key="a")


def test_math_missing_file(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        make("math", dataset=str(missing))


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"problem": "1+1", "answer": "2"}, {"problem": "2+2", "answer": "4"}, '{"problem": "3+3", '], r":3: invalid JSON"),
        ([{"problem": "1+1", "answer": "2"}, "[1, 2]"], r":2: expected an object"),
        ([{"problem": "1+1", "answer": "2"}, {"problem": "2+2", "solution": "it is 4"}], r":2: no 'answer'"),
        ([{"question": "1+1", "answer": "2"}], r":1: missing or empty 'problem'"),
        ([{"problem": "1+1", "answer": "9" * 600}], r":1: answer of 600 characters"),
    ],
)
def test_math_malformed_records_name_the_line(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=re.escape(path) + message):
        make("math", dataset=path)


# ---------------------------------------------------------------- reasoning gym


def test_reasoning_gym_unknown_task_and_option():
    with pytest.raises(ValueError, match="chain_sum"):
        make("reasoning_gym", task="chainsum")
    with pytest.raises(ValueError, match="bogus"):
        make("reasoning_gym", task_config={"bogus": 1})


def test_reasoning_gym_task_config_is_used():
    env = make("reasoning_gym", task_config={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}, size=100)
    for index in range(10):
        prompt, _ = env.reset(options={"index": index})
        assert re.search(r"\d [+-] \d =\n$", prompt), prompt


def test_reasoning_gym_scorer_errors_are_counted(monkeypatch):
    env = make("reasoning_gym", task="prime_factorization", size=50)
    env.reset(seed=0)
    assert env.score("abc") == 0.0  # this task's scorer raises on non-numbers
    assert env.scorer_errors == 1
    _, reward, terminated, _, info = env.step(f"{env.answer_marker} {env.reference_answer}")
    assert terminated and reward == 1.0 and info["scorer_errors"] == 1

    from envs.reasoning_gym_env import ReasoningGymEnv

    def broken_scorer(*args, **kwargs):
        raise RuntimeError("scorer exploded")

    monkeypatch.setattr(ReasoningGymEnv, "scorer", staticmethod(broken_scorer))
    env.reset(seed=1)
    _, reward, terminated, _, info = env.step(f"{env.answer_marker} {env.reference_answer}")
    assert terminated and reward == 0.0 and info["scorer_errors"] == 2


def test_reasoning_gym_code_is_rejected_and_counted(tmp_path):
    env = make("reasoning_gym", task="n_queens", size=20)
    env.reset(seed=0)
    marker = tmp_path / "pwned"
    _, reward, terminated, _, info = env.step(f"{env.answer_marker} open('{marker}', 'w')")
    assert terminated and reward == 0.0 and info["rejected_answers"] == 1 and not marker.exists()
