"""The trained verifier: a causal-LM trunk with a linear scalar head, saved and loaded as a
directory. It reads the policy's own token ids, so it must share the policy's vocabulary.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from metarl_llm.config import TinyModelConfig
from metarl_llm.models import build_tiny_model, resolve_dtype
from metarl_llm.verify.data import SUCCESS_THRESHOLD

VERIFIER_FILE = "verifier.json"  # marks a saved verifier directory; holds the format and head size
HEAD_FILE = "verifier_head.safetensors"
FORMAT = "metarl-llm verifier"
FORMAT_VERSION = 1


# ------------------------------------------------------------------------- model


class Verifier(nn.Module):
    """A causal-LM trunk with a linear scalar head: the logit of P(success).

    ``trunk`` is the base model of any transformers causal LM (``model.base_model``;
    a causal LM itself is accepted and its base model taken); ``tokenizer`` is kept for
    saving and must have the policy's vocabulary. The head starts at zero (P = 0.5).
    """

    def __init__(self, trunk: nn.Module, tokenizer):
        super().__init__()
        trunk = getattr(trunk, "base_model", trunk)
        if getattr(getattr(trunk, "config", None), "hidden_size", None) is None:
            raise ValueError(f"Verifier: the trunk {type(trunk).__name__} has no config.hidden_size (not a transformers model?)")
        self.trunk = trunk
        self.tokenizer = tokenizer
        self.head = nn.Linear(trunk.config.hidden_size, 1, dtype=torch.float32)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @property
    def pad_id(self) -> int:
        """Id used for padding (never read: padded keys are masked, padded queries unread)."""
        for tid in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if tid is not None:
                return int(tid)
        return 0

    def logits_at(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
    ) -> torch.Tensor:
        """Logits [M] read at the M stream positions (rows[m], cols[m]) of one forward pass.

        ``input_ids``, ``attention_mask``: [B, L], right-padded (mask 1...1 0...0 per row).
        Each read position must hold a real token. Because the trunk is causal, the
        hidden state at position c depends on tokens 0..c only: reading c of a long
        stream equals reading the last token of the prefix of length c+1.
        """
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"Verifier: input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must both be [B, L]"
            )
        if rows.shape != cols.shape or rows.dim() != 1:
            raise ValueError(f"Verifier: rows {tuple(rows.shape)} and cols {tuple(cols.shape)} must be 1-D of one length")
        b, length = input_ids.shape
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= b or int(cols.min()) < 0 or int(cols.max()) >= length):
            raise ValueError(f"Verifier: read positions out of range for input of shape [{b}, {length}]")
        if bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
            raise ValueError("Verifier: attention_mask must be right-padded (1s then 0s in every row)")
        if rows.numel() and not bool(attention_mask[rows, cols].bool().all()):
            raise ValueError("Verifier: a read position falls on padding (attention_mask 0)")
        vocab = self.trunk.get_input_embeddings().num_embeddings
        if input_ids.numel() and (int(input_ids.max()) >= vocab or int(input_ids.min()) < 0):
            raise ValueError(
                f"Verifier: token ids must lie in [0, {vocab}) (the trunk's embedding size); got [{int(input_ids.min())}, {int(input_ids.max())}]"
            )
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self.head(hidden[rows, cols].to(self.head.weight.dtype)).squeeze(-1).float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits of P(success) read at ``positions`` [B] (one per row) or [B, K] (K per row): [B] or [B, K]."""
        if positions.dim() not in (1, 2) or positions.shape[0] != input_ids.shape[0]:
            raise ValueError(f"Verifier: positions {tuple(positions.shape)} must be [B] or [B, K] with B = {input_ids.shape[0]}")
        positions = positions.to(input_ids.device)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        rows = rows if positions.dim() == 1 else rows[:, None].expand_as(positions)
        return self.logits_at(input_ids, attention_mask, rows.reshape(-1), positions.reshape(-1)).view(positions.shape)

    def save(self, directory: str | Path) -> Path:
        """Write the trunk (``save_pretrained``), the tokenizer, the head and ``verifier.json`` into ``directory``."""

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.trunk.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}, directory / HEAD_FILE)
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "hidden_size": self.head.in_features,
            "label": f"outcome >= {SUCCESS_THRESHOLD}",
        }
        (directory / VERIFIER_FILE).write_text(json.dumps(meta, indent=1))
        return directory


def is_saved_verifier(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by :meth:`Verifier.save`."""
    return (Path(path).expanduser() / VERIFIER_FILE).is_file()


def load_verifier(path: str | Path, device: str | torch.device | None = None, trust_remote_code: bool = False) -> Verifier:
    """A verifier saved by :meth:`Verifier.save`, in eval mode, on ``device`` (default cpu)."""

    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"verifier path {path} does not exist")
    for name in (VERIFIER_FILE, HEAD_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a saved verifier: {path / name} not found")
    meta = json.loads((path / VERIFIER_FILE).read_text())
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path / VERIFIER_FILE}: format {meta.get('format')!r} version {meta.get('version')!r}; expected {FORMAT!r} version {FORMAT_VERSION}"
        )
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    trunk = AutoModel.from_pretrained(path, dtype="auto", trust_remote_code=trust_remote_code)
    verifier = Verifier(trunk, tokenizer)
    head = load_file(path / HEAD_FILE)
    if head["weight"].shape != verifier.head.weight.shape:
        raise ValueError(
            f"{path / HEAD_FILE}: head weight {tuple(head['weight'].shape)} does not fit the trunk's hidden size {verifier.head.in_features}"
        )
    verifier.head.load_state_dict(head)
    return verifier.to(device or "cpu").eval()


def check_same_vocabulary(verifier_tokenizer, policy_tokenizer) -> None:
    """ValueError unless both tokenizers map the same strings to the same ids (a verifier
    reads the policy's token ids as they are)."""
    a, b = verifier_tokenizer.get_vocab(), policy_tokenizer.get_vocab()
    if a != b:
        differ = sum(1 for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        raise ValueError(
            f"the verifier's tokenizer ({len(a)} entries) differs from the policy's ({len(b)} entries) on {differ} "
            "entries: a verifier reads the policy's token ids and needs the same vocabulary"
        )


def build_verifier(
    tokenizer,
    name_or_path: str | None = None,
    *,
    policy: nn.Module | None = None,
    tiny: TinyModelConfig | None = None,
    seed: int = 0,
    dtype: str = "float32",
    trust_remote_code: bool = False,
) -> Verifier:
    """A fresh verifier over the policy's ``tokenizer``.

    ``name_or_path``: None builds a tiny Llama-style trunk from ``tiny`` (seeded by
    ``seed``); ``"policy"`` copies ``policy``'s trunk; anything else is a hub id or a
    local directory of a causal LM, whose tokenizer must match ``tokenizer``. The trunk
    gets ``dtype``; the head stays float32.
    """
    if name_or_path is None:
        lm = build_tiny_model(tiny or TinyModelConfig(), len(tokenizer), tokenizer.pad_token_id, seed)
        return Verifier(lm.base_model.to(resolve_dtype(dtype)), tokenizer)
    if name_or_path == "policy":
        if policy is None:
            raise ValueError("verifier.name_or_path='policy' needs the policy model")
        return Verifier(copy.deepcopy(policy.base_model).to(resolve_dtype(dtype)), tokenizer)

    check_same_vocabulary(AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code), tokenizer)
    # Loaded as a causal LM so that a bidirectional encoder cannot slip in: prefix scores
    # read from one pass are only valid for a causal trunk.
    lm = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code)
    return Verifier(lm.base_model, tokenizer)
