"""Layer 1: the data every layer above shares. A trial as a token stream (:mod:`.trial`), the
rollout batch and its padding (:mod:`.batch`), and the one registry helper (:mod:`.registry`).
Imports only metarl_llm.config (and envs/ never).
"""
