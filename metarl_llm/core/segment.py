"""Episode segmentation: where a policy's token stream is cut into episodes (docs/design.md section 5).

A segmenter maps the tokens a policy wrote for one trial (or one turn) to the end positions of
its episodes. It works on token ids and never splits a token: a cut falls after the token in
which the text that ends an episode ends, so merged tokens (``?\\n``, ``.\\n\\n`` of byte-level
BPE vocabularies) end an episode as a lone ``\\n`` does. Each token's text is decoded once per
vocabulary (:class:`TokenTexts`), so segmenting a stream costs no decode per call.

Registered rules (``SEGMENTERS``, the ``segment.name`` choices):

- ``delimiter``: an episode ends at every token whose text contains the delimiter (``\\n``:
  one line per episode; the rule of the tiny-model tasks).
- ``paragraph``: an episode ends at each blank line (a run of newlines holding an empty line).
- ``markers``: MRT's rule for long reasoning traces. Paragraphs are cut, and a new episode
  begins only at a paragraph whose text starts with one of ``markers`` ("Wait",
  "Alternatively", "But let me double-check", ...); episodes of fewer than ``min_tokens``
  tokens are merged into the one before them; at most ``max_episodes`` episodes are kept by
  merging the adjacent pair of the fewest tokens, repeatedly.
- ``chunks``: fixed chunks of ``chunk_tokens`` tokens.

Every rule returns ends that are strictly increasing, end at ``len(ids)`` and cut no episode
of whitespace only (such text is merged into its neighbour).
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Callable, Sequence

from metarl_llm.config import DEFAULT_MARKERS, SegmentConfig  # noqa: F401  (DEFAULT_MARKERS re-exported)
from metarl_llm.core.registry import Registry

_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


class TokenTexts:
    """The text of every id of a tokenizer's vocabulary, decoded once (``texts[i]``)."""

    def __init__(self, tokenizer):
        n = len(tokenizer)
        pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
        self.texts: list[str] = [tokenizer.convert_tokens_to_string([p]) if p is not None else "" for p in pieces]

    def of(self, ids: Sequence[int]) -> tuple[str, list[int]]:
        """(text of ``ids``, end offset in that text of each token) -> a str and ``len(ids)`` ints."""
        ends, pos, parts = [], 0, []
        for i in ids:
            t = self.texts[i]
            parts.append(t)
            pos += len(t)
            ends.append(pos)
        return "".join(parts), ends


Segmenter = Callable[[Sequence[int]], list[int]]  # ids of one stream -> end positions of its episodes
SEGMENTERS = Registry("episode segmenter", "segment.name")  # name -> factory (SegmentConfig, TokenTexts) -> Segmenter
register_segmenter = SEGMENTERS.register


def make_segmenter(cfg: SegmentConfig, texts: TokenTexts, max_episodes: int = 0) -> Segmenter:
    """The segmenter ``cfg.name`` selects, over the vocabulary of ``texts``. ``max_episodes``:
    the cap of the markers rule when ``cfg.max_episodes`` is 0 (the run's ``budget.max_episodes``)."""
    cfg.validate()
    factory = SEGMENTERS.lookup(cfg.name)
    if cfg.name == "markers" and not cfg.max_episodes and max_episodes:
        cfg = replace(cfg, max_episodes=max_episodes)
    return factory(cfg, texts)


def _finish(cuts: list[int], n: int, text_ends: list[int], text: str) -> list[int]:
    """Sorted, unique cuts in (0, n] ending with n, dropping any cut that would leave an episode of
    whitespace only (its tokens go to the next episode; trailing whitespace to the last one)."""
    out, start = [], 0
    for c in sorted(set(cuts)) + [n]:
        if c <= start or c > n:
            continue
        lo = text_ends[start - 1] if start else 0
        if text[lo : text_ends[c - 1]].strip() or c == n:
            out.append(c)
            start = c
    if out and out[-1] != n:
        out.append(n)
    if len(out) > 1 and not text[text_ends[out[-2] - 1] :].strip():  # whitespace after the last cut joins the episode before
        out.pop(-2)
    return out


def _token_at(text_ends: list[int], char: int) -> int:
    """Index of the token holding character offset ``char``."""
    lo, hi = 0, len(text_ends) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if text_ends[mid] > char:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _paragraph_cuts(text: str, text_ends: list[int]) -> list[int]:
    """Cuts after the token that holds the end of each blank line."""
    return [_token_at(text_ends, m.end() - 1) + 1 for m in _BLANK_LINE.finditer(text)]


@register_segmenter("delimiter")
def delimiter_segmenter(cfg: SegmentConfig, texts: TokenTexts) -> Segmenter:
    """A cut after every token whose text contains ``cfg.delimiter``."""
    ends_episode = {i for i, t in enumerate(texts.texts) if cfg.delimiter in t}

    def segment(ids: Sequence[int]) -> list[int]:
        if not ids:
            return []
        text, text_ends = texts.of(ids)
        return _finish([k + 1 for k, i in enumerate(ids) if i in ends_episode], len(ids), text_ends, text)

    return segment


@register_segmenter("paragraph")
def paragraph_segmenter(cfg: SegmentConfig, texts: TokenTexts) -> Segmenter:
    """A cut at each blank line."""

    def segment(ids: Sequence[int]) -> list[int]:
        if not ids:
            return []
        text, text_ends = texts.of(ids)
        return _finish(_paragraph_cuts(text, text_ends), len(ids), text_ends, text)

    return segment


@register_segmenter("markers")
def marker_segmenter(cfg: SegmentConfig, texts: TokenTexts) -> Segmenter:
    """MRT: a new episode at a paragraph that begins with a marker; short episodes merged into the
    one before; at most ``max_episodes`` by merging the adjacent pair of the fewest tokens."""
    markers = tuple(m.strip() for m in cfg.markers)

    def segment(ids: Sequence[int]) -> list[int]:
        if not ids:
            return []
        text, text_ends = texts.of(ids)
        paragraphs = _finish(_paragraph_cuts(text, text_ends), len(ids), text_ends, text)
        cuts = []
        for start in paragraphs[:-1]:  # the paragraph beginning at token `start`
            if text[text_ends[start - 1] :].lstrip().startswith(markers):
                cuts.append(start)
        ends = _finish(cuts, len(ids), text_ends, text)
        if cfg.min_tokens:
            merged, start = [], 0
            for e in ends:
                if merged and e - start < cfg.min_tokens:
                    merged[-1] = e  # too short: joins the episode before it
                else:
                    merged.append(e)
                start = e
            ends = merged
        while cfg.max_episodes and len(ends) > cfg.max_episodes:
            sizes = [b - a for a, b in zip([0] + ends[:-1], ends)]
            j = min(range(len(ends) - 1), key=lambda k: sizes[k] + sizes[k + 1])  # first pair of the fewest tokens
            del ends[j]
        return ends

    return segment


@register_segmenter("chunks")
def chunk_segmenter(cfg: SegmentConfig, texts: TokenTexts) -> Segmenter:
    """Fixed chunks of ``cfg.chunk_tokens`` tokens (the last one may be shorter)."""

    def segment(ids: Sequence[int]) -> list[int]:
        n = len(ids)
        return [min(e, n) for e in range(cfg.chunk_tokens, n + cfg.chunk_tokens, cfg.chunk_tokens)] if n else []

    return segment
