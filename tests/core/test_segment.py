"""Episode segmenters on real token streams of a production vocabulary (Qwen3's byte-level BPE,
where ``.\\n\\n``, ``?\\n`` and ``.\\n\\n\\n`` are single tokens): each rule's cuts, by hand."""

import pytest

from metarl_llm.core.segment import SEGMENTERS, SegmentConfig, TokenTexts, make_segmenter
from metarl_llm.core.trial import StreamCodec

TRACE = "Let me compute 3+4.\n\nWait, that is wrong?\nAlternatively 7.\n\n\nAnswer: \\boxed{7}"
LINES = "a?\nb.\nc\n\nd"


@pytest.fixture(scope="module")
def texts(qwen_tokenizer):
    return TokenTexts(qwen_tokenizer)


def pieces(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    return ids, [tok.decode([i]) for i in ids]


def episodes(tok, ids, ends):
    return [tok.decode(ids[a:b]) for a, b in zip([0] + ends[:-1], ends)]


def test_the_streams_hold_merged_newline_tokens(qwen_tokenizer):
    _, trace = pieces(qwen_tokenizer, TRACE)
    assert trace == [
        "Let",
        " me",
        " compute",
        " ",
        "3",
        "+",
        "4",
        ".\n\n",
        "Wait",
        ",",
        " that",
        " is",
        " wrong",
        "?\n",
        "Alternatively",
        " ",
        "7",
        ".\n\n\n",
        "Answer",
        ":",
        " \\",
        "boxed",
        "{",
        "7",
        "}",
    ]
    assert pieces(qwen_tokenizer, LINES)[1] == ["a", "?\n", "b", ".\n", "c", "\n\n", "d"]


def test_delimiter_rule_cuts_at_every_token_holding_a_newline(qwen_tokenizer, texts):
    seg = make_segmenter(SegmentConfig(name="delimiter"), texts)
    ids, _ = pieces(qwen_tokenizer, TRACE)
    assert seg(ids) == [8, 14, 18, 25]
    ids, _ = pieces(qwen_tokenizer, LINES)
    assert seg(ids) == [2, 4, 6, 7]
    # the same cuts as the rollout's stop tokens (StreamCodec.delimiter_ids), an independent reference
    codec = StreamCodec(qwen_tokenizer, "\n", "Answer:")
    for text in (TRACE, LINES):
        ids, _ = pieces(qwen_tokenizer, text)
        assert seg(ids) == [k + 1 for k, i in enumerate(ids) if i in codec.delimiter_ids] + [len(ids)]


def test_paragraph_rule_cuts_at_blank_lines_inside_merged_tokens(qwen_tokenizer, texts):
    seg = make_segmenter(SegmentConfig(name="paragraph"), texts)
    ids, _ = pieces(qwen_tokenizer, TRACE)
    assert seg(ids) == [8, 18, 25]
    assert episodes(qwen_tokenizer, ids, seg(ids)) == [
        "Let me compute 3+4.\n\n",
        "Wait, that is wrong?\nAlternatively 7.\n\n\n",
        "Answer: \\boxed{7}",
    ]
    ids, _ = pieces(qwen_tokenizer, LINES)
    assert seg(ids) == [6, 7]
    ids, _ = pieces(
        qwen_tokenizer, "x\n\n\n\n\n\ny\n\n"
    )  # runs of blank lines cut once; trailing blank lines join the last episode
    ends = seg(ids)
    assert episodes(qwen_tokenizer, ids, ends) == ["x\n\n\n\n\n\n", "y\n\n"]


def test_marker_rule_starts_episodes_only_at_marked_paragraphs(qwen_tokenizer, texts):
    ids, _ = pieces(qwen_tokenizer, TRACE)
    seg = make_segmenter(SegmentConfig(name="markers"), texts)
    assert seg(ids) == [8, 25]  # "Wait" begins a paragraph; "Alternatively" begins a line only, "Answer" is no marker
    long = (
        "First, 12 * 3 = 36.\n\nSo the total is 36.\n\nWait, the question asks for 12 * 4.\n\n"
        "That gives 48.\n\nAlternatively, 4 * 12 = 48 as well.\n\nBut let me double-check: 48 / 12 = 4.\n\nSo 48."
    )
    ids, _ = pieces(qwen_tokenizer, long)
    ends = seg(ids)
    eps = episodes(qwen_tokenizer, ids, ends)
    assert [e.split(",")[0].split(":")[0] for e in eps] == ["First", "Wait", "Alternatively", "But let me double-check"]
    assert "".join(eps) == long  # the cuts lose no token
    sizes = [b - a for a, b in zip([0] + ends[:-1], ends)]
    # max_episodes: the adjacent pair of the fewest tokens merges first
    capped = make_segmenter(SegmentConfig(name="markers", max_episodes=3), texts)(ids)
    j = min(range(3), key=lambda k: sizes[k] + sizes[k + 1])
    assert capped == ends[:j] + ends[j + 1 :]
    assert make_segmenter(SegmentConfig(name="markers", max_episodes=1), texts)(ids) == [len(ids)]
    # min_tokens: an episode shorter than that joins the one before it (the end before it goes)
    short = min(sizes[1:])
    merged = make_segmenter(SegmentConfig(name="markers", min_tokens=short + 1), texts)(ids)
    assert merged == [e for k, e in enumerate(ends) if k + 1 == len(ends) or sizes[k + 1] > short] and len(merged) == 3


def test_chunk_rule_and_empty_streams(qwen_tokenizer, texts):
    ids, _ = pieces(qwen_tokenizer, TRACE)
    assert make_segmenter(SegmentConfig(name="chunks", chunk_tokens=10), texts)(ids) == [10, 20, 25]
    for name in SEGMENTERS:
        assert make_segmenter(SegmentConfig(name=name), texts)([]) == []


def test_bad_settings_name_the_key(texts):
    with pytest.raises(
        ValueError, match=r"segment.name='lines' is not registered; choose from \['chunks', 'delimiter', 'markers', 'paragraph'\]"
    ):
        make_segmenter(SegmentConfig(name="lines"), texts)
    with pytest.raises(ValueError, match="segment.chunk_tokens must be >= 1"):
        make_segmenter(SegmentConfig(name="chunks", chunk_tokens=0), texts)
    with pytest.raises(ValueError, match="segment.markers must be non-empty phrases"):
        make_segmenter(SegmentConfig(name="markers", markers=[" "]), texts)
