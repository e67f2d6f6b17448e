"""Layer 4: the RL maths. Advantage estimators (:mod:`.advantages`), policy and value losses
(:mod:`.losses`), the PPO update (:mod:`.update`), scoring a rollout batch (:mod:`.scoring`) and
the per-episode progress bonuses (:mod:`.bonus`). Small functions on [B, T] tensors.
"""
