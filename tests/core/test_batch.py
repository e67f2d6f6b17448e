"""Rollout batch: collation, reward placement (docs/design.md section 5), select; and the
per-episode progress of bonus.py that the episode bonuses come from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metarl_llm.core.batch import RolloutBatch, collate, place_rewards
from metarl_llm.core.trial import Trial
from metarl_llm.rl.bonus import progress
from metarl_llm.rollout.meta_prover import boundary_prefixes

PAD = 0


def _trial(group: int, outcome: float, prompt: list[int], ep0: list[int], obs: list[int], ep1: list[int]) -> Trial:
    t = Trial(problem_id=f"p{group}", group=group)
    t.append(prompt, False, -1)
    t.append(ep0, True, 0)
    t.append(obs, False, -1)
    t.append(ep1, True, 1)
    t.outcome = outcome
    return t


def _two_trials() -> list[Trial]:
    # trial A: prompt pos 0-2 | ep0 pos 3-5 | obs pos 6 | ep1 pos 7-8            (length 9)
    # trial B: prompt pos 0-1 | ep0 pos 2-3 | obs pos 4-5 | ep1 pos 6 | pad 7-8   (length 7)
    a = _trial(3, 1.0, [1, 2, 3], [10, 11, 12], [50], [13, 14])
    b = _trial(4, 0.0, [1, 2], [20, 21], [50, 51], [22])
    return [a, b]


def test_collate_layout():
    batch = collate(_two_trials(), PAD)
    assert batch.input_ids.tolist() == [[1, 2, 3, 10, 11, 12, 50, 13, 14], [1, 2, 20, 21, 50, 51, 22, PAD, PAD]]
    assert batch.attention_mask.tolist() == [[1] * 9, [1] * 7 + [0, 0]]
    assert batch.action_mask.tolist() == [[0, 0, 0, 1, 1, 1, 0, 1, 1], [0, 0, 1, 1, 0, 0, 1, 0, 0]]
    assert batch.episode_index.tolist() == [[-1, -1, -1, 0, 0, 0, -1, 1, 1], [-1, -1, 0, 0, -1, -1, 1, -1, -1]]
    assert batch.outcome.tolist() == [1.0, 0.0]
    assert batch.group.tolist() == [3, 4]
    for f in (batch.logprobs, batch.ref_logprobs, batch.values, batch.token_rewards, batch.advantages, batch.returns):
        assert f.shape == (2, 9) and torch.all(f == 0)


def test_place_rewards_outcome_and_bonuses():
    batch = collate(_two_trials(), PAD)
    rewards = place_rewards(batch, [[0.3, -0.1], [0.2]], kl_coef=0.1, kl_in_reward=False)
    expected = torch.zeros(2, 9)
    expected[0, 5] = 0.3  # A: bonus of episode 0 on its last action token
    expected[0, 8] = 1.0 - 0.1  # A: outcome and episode 1's bonus share the trial's last action token
    expected[1, 3] = 0.2  # B: bonus of episode 0; B's outcome (0.0) on position 6
    torch.testing.assert_close(rewards, expected)
    # prompt, observation and pad tokens get nothing
    assert torch.all(rewards[batch.action_mask == 0] == 0)

    # B's outcome lands on B's last action token (position 6), not on its padding
    rewards = place_rewards(batch._replace(outcome=torch.tensor([1.0, 0.5])), [[0.3, -0.1], [0.2]], 0.1, False)
    expected[1, 6] = 0.5
    torch.testing.assert_close(rewards, expected)


def test_place_rewards_kl_in_reward():
    batch = collate(_two_trials(), PAD)
    gen = torch.Generator().manual_seed(0)
    lp = -torch.rand(2, 9, generator=gen) * 3
    ref = -torch.rand(2, 9, generator=gen) * 3
    batch = batch._replace(logprobs=lp, ref_logprobs=ref)  # non-zero everywhere on purpose
    bonuses = [[0.3, -0.1], [0.2]]
    base = place_rewards(batch, bonuses, kl_coef=0.1, kl_in_reward=False)
    with_kl = place_rewards(batch, bonuses, kl_coef=0.1, kl_in_reward=True)
    mask = batch.action_mask
    torch.testing.assert_close(with_kl - base, -0.1 * (lp - ref) * mask)
    assert torch.all(with_kl[mask == 0] == 0)
    # a zero coefficient adds nothing
    torch.testing.assert_close(place_rewards(batch, bonuses, kl_coef=0.0, kl_in_reward=True), base)


def test_place_rewards_rejects_bad_input():
    batch = collate(_two_trials(), PAD)
    with pytest.raises(ValueError, match="trial 0 .*episode 2"):
        place_rewards(batch, [[0.3, -0.1, 0.5], [0.2]], 0.0, False)
    # trial B has episodes 0 and 1 only
    with pytest.raises(ValueError, match="trial 1 .*episode 2"):
        place_rewards(batch, [[0.3], [0.2, 0.0, 0.4]], 0.0, False)
    no_action = batch._replace(action_mask=batch.action_mask * torch.tensor([[1.0], [0.0]]))
    with pytest.raises(ValueError, match="no action token"):
        place_rewards(no_action, [[], []], 0.0, False)


def test_select_trims_to_longest_selected_stream():
    trials = _two_trials() + [_trial(5, 0.5, [1], [30], [50], [31])]  # length 4
    batch = collate(trials, PAD)
    batch = batch._replace(logprobs=torch.randn(3, 9, generator=torch.Generator().manual_seed(1)))
    for rows, width in (([1, 2], 7), ([2], 4), ([2, 0], 9), ([0, 1, 2], 9)):
        idx = torch.tensor(rows)
        sub = batch.select(idx)
        assert isinstance(sub, RolloutBatch)
        for name, full, part in zip(RolloutBatch._fields, batch, sub):
            if full.dim() == 2:
                assert part.shape == (len(rows), width), name
                assert torch.equal(part, full[idx, :width]), name
            else:
                assert torch.equal(part, full[idx]), name
        # nothing real was cut: every selected trial keeps all its tokens
        assert sub.attention_mask.sum() == batch.attention_mask[idx].sum()


# ----------------------------------------------------------------------------- bonus.progress


@pytest.mark.parametrize("seed", range(5))
def test_progress_telescopes(seed):
    rng = np.random.default_rng(seed)
    j = rng.uniform(0, 1, size=int(rng.integers(2, 10)))
    p = progress(j)
    assert p.shape == (len(j) - 1,)
    np.testing.assert_allclose(p, [j[k + 1] - j[k] for k in range(len(j) - 1)])
    assert abs(p.sum() - (j[-1] - j[0])) < 1e-12


def test_progress_clip_per_value():
    j = [0.0, 1.0, 0.5, 0.6, 0.6]
    # raw diffs: 1.0, -0.5, 0.1, 0.0 -> clipped to [-0.3, 0.3] one by one
    np.testing.assert_allclose(progress(j, clip=0.3), [0.3, -0.3, 0.1, 0.0])
    np.testing.assert_allclose(progress(j), [1.0, -0.5, 0.1, 0.0])


def test_boundary_prefixes():
    a = _two_trials()[0]  # prompt 3 tokens; episode ends at positions 5 and 8
    assert a.episode_ends == [5, 8]
    # no answer episode recorded: after the prompt, then after every episode and the
    # observation inserted in reply to it (position 6, so J after episode 0 is at 7)
    assert boundary_prefixes(a) == [3, 7, 9]
    # episode 1 gave the final answer: J after the prompt and after episode 0 only
    a.answer_episode = 1
    assert boundary_prefixes(a) == [3, 7]
    # a forced answer: the observation is the forced-answer text, which the meta-prover
    # appends itself, so the boundary stays before it
    a.forced = True
    assert boundary_prefixes(a) == [3, 6]


def test_pad_rows_right_and_left_with_masks():
    from metarl_llm.core.batch import pad_rows

    ids, mask = pad_rows([[1, 2, 3], [4]], 0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_rows([[1, 2, 3], [4], []], 9, left=True, width=4)
    assert ids.tolist() == [[9, 1, 2, 3], [9, 9, 9, 4], [9, 9, 9, 9]] and mask.tolist() == [
        [0, 1, 1, 1],
        [0, 0, 0, 1],
        [0, 0, 0, 0],
    ]
    vals, _ = pad_rows([[0.5], [0.25, -1.0]], 0.0, dtype=torch.float32)
    assert vals.dtype == torch.float32 and vals.tolist() == [[0.5, 0.0], [0.25, -1.0]]
    with pytest.raises(ValueError, match="does not fit width 1"):
        pad_rows([[1, 2]], 0, width=1)
