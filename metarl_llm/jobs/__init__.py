"""Layer 7: jobs, the only code that reads a whole TrainConfig. PPO (:mod:`.ppo`), verifier
training (:mod:`.verifier`), the verifier-free SFT baselines (:mod:`.sft`), evaluating a saved
run (:mod:`.evaluate_run`), and what they share (:mod:`.common`).
"""
