"""bench/verification.py: what a heterogeneity level sets under each dial."""

import pytest

from tests.support import load_script


def test_a_level_sets_the_variety_or_the_length_paced_mixture():
    vb = load_script("bench/verification.py")
    assert vb.level_overrides("variety", "math", "mid") == ["warm_start.variety=0.5"]
    assert vb.level_overrides("length", "planted_subseq", "high") == ["env.expert_heterogeneity=1.0", "env.expert_pace=length"]
    assert vb.level_overrides("length", "planted_subseq", "low") == ["env.expert_heterogeneity=0.0", "env.expert_pace=length"]
    with pytest.raises(SystemExit, match="planted_subseq's expert mixture; setting math:mid"):
        vb.level_overrides("length", "math", "mid")


def test_the_length_overrides_compose_and_validate():
    from metarl_llm.runtime.setup import compose_config

    vb = load_script("bench/verification.py")
    cfg = compose_config(["env=planted_subseq", "algo=verifier", *vb.level_overrides("length", "planted_subseq", "mid")])
    cfg.validate()
    assert (cfg.env.expert_heterogeneity, cfg.env.expert_pace) == (0.5, "length")
