"""docs/config.md is generated from the schema and must be fresh; it names every key a run has."""

from omegaconf import OmegaConf

from metarl_llm.runtime.setup import compose_config
from tests.support import ROOT, load_script, undocumented_keys


def load_generator():
    return load_script("docs/config_reference.py", "config_reference")


def test_config_reference_is_fresh():
    gen = load_generator()
    assert (ROOT / "docs" / "config.md").read_text() == gen.render(), (
        "docs/config.md is stale: run python docs/config_reference.py"
    )


def leaf_keys(node, prefix=""):
    for k, v in node.items():
        if OmegaConf.is_dict(v):
            yield from leaf_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def test_config_reference_names_every_key_of_every_env():
    text = (ROOT / "docs" / "config.md").read_text()
    missing = []
    for env in ("planted_subseq", "math", "reasoning_gym", "arc"):
        cfg = compose_config([f"env={env}"], to_object=False)
        missing += [k for k in leaf_keys(cfg) if not k.startswith("hydra") and f"`{k}`" not in text]
    assert not missing, f"keys missing from docs/config.md: {sorted(set(missing))}"


def test_glossary_patterns_match_what_they_say():
    assert (
        undocumented_keys([{"train/J/boundary_3": 0, "heldout_budget/0.5x/pass@4": 0, "heldout/prefix/ece": 0, "iteration": 1}])
        == []
    )
    assert undocumented_keys([{"train/made_up": 0}]) == ["train/made_up"]


def test_documents_the_code_cites_exist():
    """Every *.md a module, test or benchmark cites (docs/design.md, bench/results/...) is in the tree."""
    import re

    missing = []
    for f in [*ROOT.glob("metarl_llm/**/*.py"), *ROOT.glob("envs/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py")]:
        for ref in set(re.findall(r"\b((?:docs|bench|bench/results)/[\w./-]+\.md)\b", f.read_text())):
            if not (ROOT / ref).exists():
                missing.append(f"{f.relative_to(ROOT)} cites {ref}")
    assert not missing, "\n".join(missing)


def test_files_the_documents_name_exist():
    """Every project source file README.md and docs/*.md name (``metarl_llm/rl/bonus.py``, ``envs/arc.py``, ...)
    exists: a module moved or renamed leaves no stale path in the documentation."""
    import re

    missing = []
    for doc in [ROOT / "README.md", *ROOT.glob("docs/*.md")]:
        for ref in set(re.findall(r"\b((?:metarl_llm|envs|bench|tests|docs)/[\w/]+\.(?:py|yaml|md))\b", doc.read_text())):
            if not (ROOT / ref).exists():
                missing.append(f"{doc.relative_to(ROOT)} names {ref}")
    assert not missing, "\n".join(missing)
