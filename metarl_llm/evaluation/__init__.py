"""Layer 5: measuring a policy. Success-vs-tokens curves and their figures (:mod:`.curves`),
held-out evaluation and its report (:mod:`.heldout`), plots (:mod:`.report`) and the
base-policy diagnostics (:mod:`.diagnostics`).
"""
