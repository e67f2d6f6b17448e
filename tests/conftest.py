import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def compose_cfg():
    """Compose the project's Hydra config with overrides, as train.py would."""
    from metarl_llm.config import compose_config

    def _compose(*overrides: str, to_object: bool = True):
        return compose_config(overrides, to_object=to_object)

    return _compose


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread is fastest and leaves the other core alone; restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
