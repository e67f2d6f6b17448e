"""Layer 6: supervised fine-tuning. The SFT fit (:mod:`.fit`), traces replayed through an
environment (:mod:`.traces`), the warm start on expert traces (:mod:`.warm_start`) and the
verifier-free baselines (:mod:`.vf`).
"""
