"""The one registry helper: names, the duplicate check, the error naming the choices; and every
registry complete as soon as the module that looks names up is imported (a fresh process)."""

import json
import subprocess
import sys

import pytest

from metarl_llm.core.registry import Registry
from tests.support import ROOT


def test_register_lookup_and_the_duplicate_check():
    reg = Registry("widget", "thing.widget")

    @reg.register("a")
    def a():
        return 1

    assert reg.lookup("a") is a and sorted(reg) == ["a"] and "a" in reg
    with pytest.raises(ValueError, match=r"widget 'a' is already registered"):
        reg.register("a")(lambda: 2)
    assert reg.lookup("a") is a  # the first registration stands
    with pytest.raises(ValueError, match=r"thing.widget='b' is not registered; choose from \['a'\]"):
        reg.lookup("b")


def test_every_registry_is_complete_in_a_fresh_process():
    code = """
import json
from metarl_llm.rollout.engine import ENGINES
from metarl_llm.rl.advantages import ADVANTAGES
from metarl_llm.rl.losses import POLICY_LOSSES
from metarl_llm.rl.bonus import ESTIMATORS, VERIFIERS
print(json.dumps({n: sorted(r) for n, r in [("engines", ENGINES), ("advantages", ADVANTAGES),
      ("losses", POLICY_LOSSES), ("estimators", ESTIMATORS), ("verifiers", VERIFIERS)]}))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == {
        "engines": ["cached", "hf_generate", "reencode"],
        "advantages": ["gae", "grpo", "rloo", "termination"],
        "losses": ["ppo_clip", "reinforce"],
        "estimators": ["likelihood", "sample", "verifier"],
        "verifiers": ["episode_score"],
    }
