"""Chat-form feedback through the rollout and the warm start's traces, on Qwen3's real tokenizer and
template: the environment's verdict is a user turn, the stream stays the conversation the template
renders, and the policy's sampled tokens are kept as sampled (token in, token out)."""

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs  # noqa: F401
from metarl_llm.config import BudgetConfig
from metarl_llm.core.chat import ChatFormat
from metarl_llm.core.trial import StreamCodec
from metarl_llm.models import load_policy
from metarl_llm.rollout.engine import run_trials
from metarl_llm.sft.traces import trace_record

BUDGET = BudgetConfig(max_episodes=3, max_episode_tokens=4, max_total_tokens=12, answer_max_tokens=4, max_prompt_tokens=256)


@pytest.fixture(scope="module")
def hub(qwen_dir):
    from metarl_llm.config import ModelConfig

    model, tok = load_policy(ModelConfig(name_or_path=str(qwen_dir)), 0)
    return model.eval(), tok, StreamCodec(tok, "\n", "Answer:", ChatFormat(tok, name="toy-qwen"))


def check_conversation(tok, codec, t):
    """The stream is the rendered conversation followed by the open assistant turn's tokens."""
    rendered = codec.chat.render(t.chat.messages, True)
    assert tok.decode(t.ids[: t.chat.turn_start], skip_special_tokens=False) == rendered
    users = [m["content"] for m in t.chat.messages if m["role"] == "user"][1:]
    assert users and all(u in ("[correct]", "[wrong]") for u in users)  # each verdict is a user turn, delimiter dropped


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("engine", ["cached", "reencode"])
def test_feedback_turns_in_the_rollout_keep_token_in_token_out(hub, engine):
    model, tok, codec = hub
    envs_ = [gym.make("metarl/Math-v0", max_episodes=BUDGET.max_episodes, feedback=True) for _ in range(3)]
    trials = run_trials(
        model, codec, envs_, [{"seed": i} for i in range(3)], [0, 1, 2], BUDGET, torch.Generator().manual_seed(0), engine=engine
    )
    for t in trials:
        check_conversation(tok, codec, t)
        act = np.asarray(t.action, dtype=bool)
        # every action token is where the policy sampled it; the inserted ones hold the template's turns
        inserted = tok.decode(
            [i for i, a in zip(t.ids, act) if not a][len(codec.prompt_ids(t.chat.messages[0]["content"])) :],
            skip_special_tokens=False,
        )
        assert "<|im_start|>user\n[" in inserted and "<|im_start|>assistant\n" in inserted
        assert len(t.sample_logprobs) == len(t.ids) and all(lp == 0.0 for lp, a in zip(t.sample_logprobs, act) if not a)


def test_the_warm_start_traces_insert_feedback_as_the_rollout_does(hub):
    _, tok, codec = hub
    env = gym.make("metarl/Math-v0", max_episodes=3, feedback=True).unwrapped
    prompt, info = env.reset(seed=0)
    wrong = str(int(env.reference_answer) + 1)
    record = trace_record(
        env,
        codec,
        BudgetConfig(max_episode_tokens=32, max_total_tokens=96, max_prompt_tokens=256),
        prompt,
        info["problem_id"],
        [wrong, f"Answer: {env.reference_answer}"],
        "expert",
    )
    text = tok.decode(record["input_ids"], skip_special_tokens=False)
    chat = ChatFormat(tok, name="toy-qwen")
    messages, _ = chat.start(prompt)
    assert text.startswith(
        chat.render([*messages, {"role": "assistant", "content": wrong + "\n"}, {"role": "user", "content": "[wrong]"}], True)
    )
    assert text.endswith(f"Answer: {env.reference_answer}<|im_end|>")
