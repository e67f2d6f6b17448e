"""A real model family through ``model=hf model.name_or_path=DIR``: a hub-style local directory with
Qwen3's production tokenizer (151,669 entries) and chat template, and a toy-width Qwen2 model.
Prompts are rendered through the chat template and those tokens are the ones played and trained."""

import json

import pytest

from metarl_llm.jobs.common import stream_codec
from metarl_llm.models import load_policy
from metarl_llm.trainer import train
from tests.support import QUICK_RUN

SMALL = [
    *QUICK_RUN,
    "env=math",
    "algo.iterations=1",
    "algo.problems_per_iter=2",
    "algo.group_size=2",
    "algo.minibatch_size=4",
    "eval.num_problems=2",
    "eval.samples_per_problem=1",
    "budget.max_prompt_tokens=256",
    "algo.ppo_epochs=1",
    "budget.max_episodes=2",
    "budget.max_episode_tokens=8",
    "budget.max_total_tokens=16",
    "budget.answer_max_tokens=4",
]


@pytest.mark.usefixtures("one_thread")
def test_a_hub_directory_with_a_chat_template_trains_end_to_end(compose_cfg, qwen_dir, tmp_path):
    cfg = compose_cfg("model=hf", f"model.name_or_path={qwen_dir}", "model.system_prompt=Answer briefly.", *SMALL)
    _, tok = load_policy(cfg.model, 0)
    assert len(tok) == 151669 and tok.chat_template
    codec = stream_codec(cfg, tok)
    ids = codec.prompt_ids("What is 2+3?")
    assert tok.decode(ids) == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    )
    summary = train(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/outcome" in r for r in rows) and "heldout_success_final" in summary
    # off for a base model: the plain prompt
    plain = stream_codec(compose_cfg("model=hf", f"model.name_or_path={qwen_dir}", "model.chat_template=false"), tok)
    assert plain.prompt_ids("What is 2+3?") == tok.encode("What is 2+3?")


def test_a_system_prompt_without_a_template_is_refused(compose_cfg):
    cfg = compose_cfg("model.system_prompt=hi")
    _, tok = load_policy(cfg.model, 0)
    with pytest.raises(ValueError, match="model.system_prompt needs a chat template"):
        stream_codec(cfg, tok)
