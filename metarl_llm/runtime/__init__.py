"""Layer 2: running a job. Processes (:mod:`.distributed`), checkpoints (:mod:`.checkpoint`),
metrics and W&B (:mod:`.tracking`), Hydra schema registration and environment factories
(:mod:`.setup`), failure records (:mod:`.failures`) and plots (:mod:`.plotting`). Nothing here
knows what a PPO update is.
"""
