"""Layer 3: trained verifiers. The model (:mod:`.model`), its examples and labels (:mod:`.data`),
calibration metrics (:mod:`.calibration`), training (:mod:`.train`), scoring trials and prefixes
(:mod:`.scoring`, which also gives the ``verifier`` estimator of J) and best-of-N (:mod:`.best_of_n`).
"""
