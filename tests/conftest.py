import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def compose_cfg():
    """Compose the project's Hydra config with overrides, as train.py would."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from metarl_llm.config import register_configs

    register_configs()
    conf_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")

    def _compose(*overrides: str, to_object: bool = True):
        with initialize_config_dir(version_base=None, config_dir=conf_dir):
            cfg = compose("config", overrides=list(overrides))
        return OmegaConf.to_object(cfg) if to_object else cfg

    return _compose


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread is fastest and leaves the other core alone; restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
