"""Chat-formatted streams on Qwen3's real tokenizer and chat template: the prompt's tokens are the
template's, the environment's reply is a user turn whose tokens extend the stream exactly (the
policy's tokens are kept as sampled), and a template that rewrites an earlier turn is refused."""

import pytest

from metarl_llm.core.chat import ChatFormat, TemplateError


def test_prompt_is_rendered_through_the_template(qwen_tokenizer):
    chat = ChatFormat(qwen_tokenizer, system_prompt="Be brief.", name="Qwen3")
    messages, ids = chat.start("What is 3+4?")
    expected = qwen_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert ids == list(expected)
    assert qwen_tokenizer.decode(ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 3+4?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ids[0] == qwen_tokenizer.convert_tokens_to_ids("<|im_start|>")  # a special token, one id


def test_feedback_turns_extend_the_stream_token_for_token(qwen_tokenizer):
    tok = qwen_tokenizer
    chat = ChatFormat(tok, name="Qwen3")
    messages, stream = chat.start("What is 3+4?")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for attempt, reply in (("I think it is 8", "[wrong]"), ("Then 7", "[correct]")):
        # the policy's tokens as sampled: one token per character, not the canonical BPE encoding
        sampled = [tok.convert_tokens_to_ids(tok.tokenize(c)[0]) for c in attempt] + [end]
        assert sampled[:-1] != tok.encode(attempt, add_special_tokens=False)
        before = stream + sampled
        messages, obs = chat.reply(messages, tok.decode(before), attempt, reply)
        stream = before + obs
        assert stream[: len(before)] == before  # nothing the policy wrote is re-encoded
        assert tok.decode(stream) == chat.render(messages, True)  # the stream is the conversation the template renders
    assert tok.decode(obs) == "\n<|im_start|>user\n[correct]<|im_end|>\n<|im_start|>assistant\n"


def test_a_template_that_drops_earlier_think_blocks_is_refused(qwen_tokenizer):
    tok = qwen_tokenizer
    chat = ChatFormat(tok, name="Qwen3")
    messages, stream = chat.start("What is 3+4?")
    attempt = "<think>\n3+4 is 8?\n</think>\n\nAnswer: 8"
    stream = stream + tok.encode(attempt, add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
    with pytest.raises(TemplateError, match=r"the chat template of Qwen3 does not extend the token stream.*<think>"):
        chat.reply(messages, tok.decode(stream), attempt, "[wrong]")


def test_a_tokenizer_without_a_template_is_refused(qwen_tokenizer):
    class Base:
        chat_template = None

    with pytest.raises(TemplateError, match="base-model has no chat template"):
        ChatFormat(Base(), name="base-model")
