"""Compiled decoding (``rollout.compile_decode``): the static KV cache and the compiled one-token
step give the trials, kept caches and meta-prover answers of the eager path.

The suite compiles with torch.compile's ``eager`` backend: dynamo traces the forward over the
static cache exactly as for ``inductor`` (the graph breaks, guards and recompiles are the same),
without inductor's code generation, which takes about a minute on this CPU.
bench/compiled_decode.py times the inductor backend.
"""

import pytest
import torch

from metarl_llm.rollout.cached import CachedEngine
from metarl_llm.rollout.decode import DecodeBatch
from metarl_llm.rollout.engine import engine_from_config, get_engine
from metarl_llm.rollout.kv_cache import _RowsStaticLayer, static_capacity
from metarl_llm.rollout.meta_prover import boundary_prefixes
from tests.rollout.test_engine import BUDGET, assert_same_trials, play
from tests.rollout.test_engine import setup as setup  # noqa: F401  (the tiny model and codec fixture)


def compiled(engine):
    engine.compile_backend = "eager"
    return engine


def test_compiled_rollout_plays_the_eager_trials(setup, one_thread):  # noqa: F811
    """The cached engine's trials (rows leaving the batch, observations queued or fed as blocks)
    and the reencode engine's are the same with the static cache and the compiled step."""
    model, codec = setup
    eager = play(model, codec, "cached", n=12)
    assert_same_trials(eager, play(model, codec, compiled(CachedEngine()), n=12))
    assert_same_trials(eager, play(model, codec, compiled(CachedEngine(queue_tokens=0)), n=12))
    assert_same_trials(eager, play(model, codec, compiled(get_engine("reencode")), n=12))


def test_compiled_meta_prover_continues_kept_static_caches(setup, one_thread):  # noqa: F811
    """Kept caches cut out of a static batch, continued by a compiled decode: the answers the
    eager engine gives from its own kept caches, with the same keys."""
    model, codec = setup
    answers = []
    for engine in (CachedEngine(), compiled(CachedEngine())):
        trials = play(model, codec, engine, n=8, keep_cache=True)
        assert all(t.cache is not None and t.cache.length == len(t.ids) - 1 for t in trials)
        ends = [boundary_prefixes(t) for t in trials]
        suffixes = [[codec.forced_prefix(t.ids[:e]) for e in es] for t, es in zip(trials, ends)]
        keys = torch.arange(3 * sum(len(e) for e in ends), dtype=torch.long) * 7919 + 3
        toks, lengths, owners = engine.continue_prefixes(
            model, trials, ends, suffixes, 3, BUDGET.answer_max_tokens, codec.stop_ids, codec.pad_id, keys=keys
        )
        answers.append([toks[r, : lengths[r]].tolist() for r in range(len(owners))])
    assert answers[0] == answers[1] and len(set(map(tuple, answers[0]))) > 3


@torch.no_grad()
def test_static_batch_grows_and_drops_rows_like_the_growing_one(setup, one_thread):  # noqa: F811
    """Past its capacity the static cache is reallocated (with the mask), and rows leave it, with
    the logits of the growing cache at every step."""
    model, codec = setup
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14]]
    batches = [DecodeBatch(model, "cpu", 3, capacity=4), DecodeBatch(model, "cpu", 3, capacity=4, compile_backend="eager")]
    assert batches[1].static and isinstance(batches[1].cache.layers[0], _RowsStaticLayer)
    assert batches[1].mask.shape == (3, static_capacity(4)) == (3, 64)
    outs = [b.feed(prompts, codec.pad_id) for b in batches]
    for step in range(80):  # 5 + 80 columns: the static cache grows from 64 to 128
        assert torch.allclose(outs[0], outs[1], atol=1e-5), step
        tok = outs[0].argmax(-1)
        if step == 30:
            for b in batches:
                b.keep(torch.tensor([2, 0]))
            tok = tok[[2, 0]]
        outs = [b.feed(tok[:, None], codec.pad_id) for b in batches]
    assert batches[1].mask.shape[1] == batches[1].cache.layers[0].keys.shape[2] == 128
    assert batches[0].width == batches[1].width == 85 and batches[1].rows == [2, 0]
    for r in range(2):
        a, b = batches[0].trial_cache(r), batches[1].trial_cache(r)
        assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(a.keys + a.values, b.keys + b.values))


def test_compile_decode_is_a_rollout_key():
    from metarl_llm.runtime.setup import compose_config

    cfg = compose_config(["rollout.compile_decode=true"])
    assert engine_from_config(cfg.rollout).compile_backend == "inductor"
    assert engine_from_config(compose_config([]).rollout).compile_backend is None


@pytest.mark.parametrize("columns,expected", [(0, 64), (1, 64), (64, 64), (65, 128), (300, 320)])
def test_static_capacity_rounds_up_to_a_multiple_of_64(columns, expected):
    assert static_capacity(columns) == expected
