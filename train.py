"""Hydra entry point: python train.py env=math bonus=info_gain (see README.md)."""

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from metarl_llm.runtime.distributed import agree_on_run_time, launched_world_size
from metarl_llm.runtime.setup import register_configs

register_configs()


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from metarl_llm.trainer import train  # deferred: start-up cost (torch, transformers; not needed for --help or --cfg)

    hydra_cfg = HydraConfig.get()
    run_dir = cfg.out_dir or hydra_cfg.runtime.output_dir
    group = OmegaConf.select(hydra_cfg, "sweep.dir") if str(hydra_cfg.mode) == "RunMode.MULTIRUN" else None
    summary = train(OmegaConf.to_object(cfg), run_dir, wandb_group=group.replace("/", "_") if group else None)
    return summary.get("heldout_success_final")  # the objective of a sweeper (None for job=train_verifier)


def quiet_replicas() -> None:
    """Under a multi-process launcher, processes other than the main one write neither
    Hydra's .hydra/ snapshot nor a log file into the shared run directory."""
    if launched_world_size() > 1:
        agree_on_run_time(cpu=True if "device=cpu" in sys.argv[1:] else None)

        if int(os.environ.get("RANK", "0")) != 0:
            sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]


if __name__ == "__main__":
    quiet_replicas()
    main()
