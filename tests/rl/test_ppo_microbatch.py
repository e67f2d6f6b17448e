"""Micro-batching of the PPO update by a token budget (algo.micro_batch_tokens), and
mixed precision (model.autocast) of the update's and the scoring passes' forward."""

import copy
import math

import pytest
import torch

from metarl_llm.config import AlgoConfig, TinyModelConfig
from metarl_llm.core.batch import RolloutBatch
from metarl_llm.models import ActorCritic, autocast, autocast_dtype, build_char_tokenizer, build_tiny_model
from metarl_llm.rl.update import micro_batches, ppo_update

LENGTHS = [24, 10, 20, 8, 16, 12]  # real tokens per row (rows are right-padded to 24)
BUDGET = 40  # longest first: [24] (2 x 24 > 40), [20, 16] (3 x 20 > 40), [12, 10, 8] (3 x 12 <= 40)
EXPECTED_SHAPES = [(1, 24), (2, 20), (3, 12)]  # (rows, trimmed width) of each micro-batch


def _actor_critic(seed: int = 0) -> ActorCritic:
    tok = build_char_tokenizer()
    cfg = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    return ActorCritic(build_tiny_model(cfg, len(tok), tok.pad_token_id, seed))


def _batch(ac: ActorCritic, seed: int = 0) -> RolloutBatch:
    """Six trials of LENGTHS tokens: a 4-token prompt, then action tokens with one
    3-token observation inside; old and reference log-probs near the model's own (so
    some ratios clip), random values, returns and advantages."""
    g = torch.Generator().manual_seed(seed)
    b, t = len(LENGTHS), max(LENGTHS)
    lengths = torch.tensor(LENGTHS)
    pos = torch.arange(t).expand(b, t)
    attention = (pos < lengths[:, None]).long()
    action = ((pos >= 4) & (pos < lengths[:, None])).float()
    action[:, 6:9] = 0.0  # an observation the environment inserted
    input_ids = torch.randint(4, 90, (b, t), generator=g) * attention  # pad id 0 after the end
    with torch.no_grad():
        s = ac.score(input_ids, attention, with_values=True)
    noise = lambda scale: scale * torch.randn((b, t), generator=g)  # noqa: E731
    return RolloutBatch(
        input_ids=input_ids,
        attention_mask=attention,
        action_mask=action,
        episode_index=torch.where(action > 0, 0, -1),
        logprobs=(s.logprobs + noise(0.3)) * action,
        ref_logprobs=(s.logprobs + noise(0.2)) * action,
        values=(s.values + noise(0.5)) * action,
        token_rewards=torch.zeros(b, t),
        advantages=noise(1.0) * action,
        returns=noise(1.0) * action,
        outcome=torch.zeros(b),
        group=torch.zeros(b, dtype=torch.long),
    )


def _gradients(ac: ActorCritic, batch: RolloutBatch, micro_batch_tokens: int, shapes: list | None = None):
    """Gradients after one update of the whole batch as one minibatch (lr 0: weights stay put)."""
    cfg = AlgoConfig(
        ppo_epochs=1,
        minibatch_size=len(LENGTHS),
        kl_coef=0.1,
        ent_coef=0.01,
        max_grad_norm=1e9,
        micro_batch_tokens=micro_batch_tokens,
    )
    score = ac.score

    def recording_score(input_ids, attention_mask, **kw):
        if shapes is not None:
            shapes.append(tuple(input_ids.shape))
        return score(input_ids, attention_mask, **kw)

    ac.score = recording_score
    opt = torch.optim.SGD(ac.parameters(), lr=0.0)
    stats = ppo_update(ac, opt, batch, cfg, torch.Generator().manual_seed(0), use_critic=True)
    return {n: p.grad.clone() for n, p in ac.named_parameters() if p.grad is not None}, stats


def test_micro_batches_packs_longest_first_within_the_budget():
    lengths = torch.tensor(LENGTHS)
    parts = micro_batches(lengths, BUDGET)
    assert [p.tolist() for p in parts] == [[0], [2, 4], [5, 1, 3]]
    assert sorted(i for p in parts for i in p.tolist()) == list(range(len(LENGTHS)))  # a partition
    # a single row longer than the budget is a micro-batch of its own
    assert [p.tolist() for p in micro_batches(lengths, 15)] == [[0], [2], [4], [5], [1], [3]]
    assert [p.tolist() for p in micro_batches(torch.tensor([30, 5, 5]), 12)] == [[0], [1, 2]]
    assert [p.tolist() for p in micro_batches(lengths, 0)] == [list(range(len(LENGTHS)))]  # off: one pass, in order
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        micro_batches(lengths, -1)


def test_micro_batched_update_has_the_whole_minibatch_gradient(one_thread):
    torch.manual_seed(0)
    ac = _actor_critic()
    batch = _batch(ac)
    whole_shapes, micro_shapes = [], []
    whole, whole_stats = _gradients(copy.deepcopy(ac), batch, 0, whole_shapes)
    micro, micro_stats = _gradients(copy.deepcopy(ac), batch, BUDGET, micro_shapes)

    assert whole_shapes == [(6, 24)]
    assert micro_shapes == EXPECTED_SHAPES  # >= 3 micro-batches, each trimmed to its own longest row
    assert all(r * w <= BUDGET for r, w in micro_shapes[1:]) and micro_shapes[0][0] == 1
    assert set(whole) == set(micro) and "value_head.weight" in whole
    flat_whole = torch.cat([whole[n].flatten() for n in sorted(whole)])
    flat_micro = torch.cat([micro[n].flatten() for n in sorted(whole)])
    assert flat_whole.norm() > 1e-3
    assert float((flat_micro - flat_whole).norm() / flat_whole.norm()) < 1e-6
    for n in whole:  # and parameter by parameter
        scale = float(whole[n].abs().max())
        assert float((micro[n] - whole[n]).abs().max()) <= 1e-6 * max(scale, 1e-3), n
    # the statistics are the whole minibatch's token means too, under the same keys
    assert set(micro_stats) == set(whole_stats)
    for k, v in whole_stats.items():
        assert math.isclose(micro_stats[k], v, rel_tol=1e-5, abs_tol=1e-6), (k, micro_stats[k], v)
    assert 0.0 < whole_stats["clipfrac"] < 1.0  # the clipped branch is exercised
    assert whole_stats["update_tokens"] == micro_stats["update_tokens"] == sum(LENGTHS)


def test_micro_batching_counts_only_the_minibatch_tokens(one_thread):
    """Two minibatches per epoch: each is split on its own, and each step's gradient
    matches the unsplit one (checked on the last step through the same seed)."""
    torch.manual_seed(1)
    ac = _actor_critic(1)
    batch = _batch(ac, seed=1)
    cfg = dict(ppo_epochs=1, minibatch_size=3, max_grad_norm=1e9)
    grads = []
    for budget in (0, 30):
        model = copy.deepcopy(ac)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        ppo_update(model, opt, batch, AlgoConfig(**cfg, micro_batch_tokens=budget), torch.Generator().manual_seed(0), True)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert float((grads[1] - grads[0]).norm() / grads[0].norm()) < 1e-6


# ------------------------------------------------------------------ precision


def test_autocast_dtype_resolves_the_setting():
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None  # auto: bf16 on capable CUDA devices only
    assert autocast_dtype("off", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="model.autocast"):
        autocast_dtype("fp8", cpu)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        assert autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16


def test_bf16_autocast_scores_and_updates_in_float32(one_thread):
    torch.manual_seed(0)
    ac = _actor_critic()
    batch = _batch(ac)
    with torch.no_grad():
        full = ac.score(batch.input_ids, batch.attention_mask, with_entropy=True)
        with autocast(torch.device("cpu"), torch.bfloat16):
            half = ac.score(batch.input_ids, batch.attention_mask, with_entropy=True)
    mask = batch.action_mask
    for x in half:
        assert x.dtype == torch.float32
    diff = float(((half.logprobs - full.logprobs) * mask).abs().max())
    assert 0.0 < diff < 0.2  # the forward ran in bf16 (rounded logits), the log-probs are float32
    stats = ppo_update(
        ac,
        torch.optim.AdamW(ac.parameters(), lr=1e-3),
        batch,
        AlgoConfig(ppo_epochs=1, minibatch_size=6),
        torch.Generator().manual_seed(0),
        True,
        amp_dtype=torch.bfloat16,
    )
    assert all(math.isfinite(v) for v in stats.values())
    assert all(p.dtype == torch.float32 for p in ac.parameters())
