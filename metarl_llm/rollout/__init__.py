"""Layer 3: how trials are generated. Sampling (:mod:`.sampling`: ancestral and counter-based
draws, the one decode loop), the KV cache (:mod:`.kv_cache`), the engine interface and its
registry (:mod:`.base`), the engines (:mod:`.cached`, :mod:`.reencode`, :mod:`.hf_generate`),
``run_trials`` (:mod:`.engine`) and the meta-prover's forced answers (:mod:`.meta_prover`).
"""
