"""Hydra entry point: python train.py env=math bonus=info_gain (see README.md)."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from metarl_llm.config import register_configs

register_configs()


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from metarl_llm.trainer import train

    hydra_cfg = HydraConfig.get()
    run_dir = cfg.out_dir or hydra_cfg.runtime.output_dir
    group = OmegaConf.select(hydra_cfg, "sweep.dir") if str(hydra_cfg.mode) == "RunMode.MULTIRUN" else None
    summary = train(OmegaConf.to_object(cfg), run_dir, wandb_group=group.replace("/", "_") if group else None)
    return summary.get("heldout_success_final")  # the objective of a sweeper (None for algo=verifier)


if __name__ == "__main__":
    main()
