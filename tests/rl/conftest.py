"""Fixtures of the rl/ tests."""

import pytest

from metarl_llm.config import TinyModelConfig
from metarl_llm.core.trial import StreamCodec
from metarl_llm.models import build_char_tokenizer, build_tiny_model


@pytest.fixture(scope="module")
def char_policy():
    """(model, codec): a small tiny model (width 32, 2 layers, seed 0) over the character
    vocabulary, in eval mode, with the newline delimiter and ``Answer:`` as forced-answer text."""
    tok = build_char_tokenizer()
    cfg = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    model = build_tiny_model(cfg, len(tok), tok.pad_token_id, 0).eval()
    return model, StreamCodec(tok, "\n", "Answer:")
