"""Streaming detokenization equals decoding everything at once, and never shows half a character."""

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from picochat.model.detokenizer import IncrementalDetokenizer
from picochat.model.tokenizer import Tokenizer

TEXTS = [
    "Hello world! 😀🎉👍🏽 👨‍👩‍👧 🇫🇷",
    "日本語のテキストと中文字符，还有한국어",
    " leading space, then    runs of spaces and\ttabs\n\nand newlines ",
    "mixed: naïve café — “quotes” Привет مرحبا 1234 x² ∑ 𝔘𝔫𝔦",
    "def f(x):\n    return '🙂' * x\n",
]

SPM_TEXTS = ["Hello world!", " Hello  world", "日本 Hello 😀 world", "Hello 🇫🇷 café 𝔘", "😀😀"]


@pytest.fixture(scope="module")
def smollm(default_gguf_path: Path) -> Tokenizer:
    """Byte-level BPE: an emoji or CJK character is split across tokens as raw UTF-8 bytes."""
    return Tokenizer.from_gguf(default_gguf_path)


@pytest.fixture(scope="module")
def spm(tiny_spm_gguf: Path) -> Tokenizer:
    """SentencePiece style: ▁ for spaces, a stripped first space, <0xNN> byte-fallback tokens."""
    return Tokenizer.from_gguf(tiny_spm_gguf)


def stream(tokenizer: Tokenizer, ids: list[int], chunk: int = 1, skip_special_tokens: bool = True) -> list[str]:
    """Every piece the detokenizer emits, feeding `chunk` ids per step, then the flush."""
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    pieces = [detokenizer.add(ids[start : start + chunk]) for start in range(0, len(ids), chunk)]
    return [*pieces, detokenizer.flush()]


def assert_streams_like_decode(tokenizer: Tokenizer, ids: list[int], chunk: int = 1) -> None:
    pieces, whole = stream(tokenizer, ids, chunk), tokenizer.decode(ids)
    assert "".join(pieces) == whole
    if "\ufffd" not in whole:  # a vocabulary without some byte drops it, leaving half a character
        assert not any("\ufffd" in piece for piece in pieces)


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_stream_equals_decode(smollm: Tokenizer, text: str, chunk: int) -> None:
    ids = smollm.encode(text)
    assert smollm.decode(ids) == text and len(ids) > len(text.split())  # split below word level
    assert_streams_like_decode(smollm, ids, chunk)


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_byte_fallback_stream_equals_decode(spm: Tokenizer, text: str) -> None:
    ids = spm.encode(text, add_special_tokens=True)
    assert spm.decode(ids) == text  # the dummy "▁" added before the text is stripped again: spaces round-trip
    assert_streams_like_decode(spm, ids)


def test_emoji_waits_for_its_last_byte(spm: Tokenizer) -> None:
    ids = spm.encode("😀 Hello")  # ▁, four <0xNN> tokens, ▁Hello
    assert len(ids) == 6
    detokenizer = IncrementalDetokenizer(spm)
    # The first ▁ is the stripped prefix space; ▁Hello keeps its space because the prefix gives context.
    assert [detokenizer.add([i]) for i in ids] == ["", "", "", "", "😀", " Hello"]


def test_special_tokens_are_skipped_or_kept(smollm: Tokenizer) -> None:
    ids = smollm.encode("<|im_start|>assistant\nHi there<|im_end|>")
    assert "".join(stream(smollm, ids)) == "assistant\nHi there"
    assert "".join(stream(smollm, ids, skip_special_tokens=False)) == "<|im_start|>assistant\nHi there<|im_end|>"


def test_unfinished_character_comes_out_at_flush(spm: Tokenizer) -> None:
    ids = spm.encode("Hello 😀")[:-2]  # cut the emoji after two of its four bytes
    pieces = stream(spm, ids)
    assert pieces[-1].endswith("\ufffd") and "\ufffd" not in "".join(pieces[:-1])
    assert "".join(pieces) == spm.decode(ids)


@pytest.mark.parametrize("strays", [3, 100])
def test_invalid_bytes_are_not_held_forever(spm: Tokenizer, strays: int) -> None:
    stray = spm.backend.token_to_id("<0xFF>")  # never valid UTF-8
    ids = [stray] * strays + spm.encode(" world")
    pieces = stream(spm, ids)
    assert "".join(pieces) == spm.decode(ids)
    assert pieces[-2].endswith(" world") and pieces[-1] == ""
    assert any(pieces[:strays]) == (strays > 32)  # a long run comes out before the text ends it


def test_each_step_decodes_a_small_window(smollm: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = smollm.encode(" ".join(TEXTS) * 4)
    longest: list[int] = []
    decode = smollm.decode

    def spy(window, skip_special_tokens=True):
        longest.append(len(window))
        return decode(window, skip_special_tokens)

    monkeypatch.setattr(smollm, "decode", spy)
    assert "".join(stream(smollm, ids)) == decode(ids)
    assert len(ids) > 400 and max(longest) <= 8


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.text(st.characters(exclude_characters="\ufffd", exclude_categories=("Cs",)), max_size=40),
    chunk=st.integers(1, 4),
)
def test_random_unicode_streams_like_decode(smollm: Tokenizer, spm: Tokenizer, text: str, chunk: int) -> None:
    for tokenizer in (smollm, spm):
        assert_streams_like_decode(tokenizer, tokenizer.encode(text), chunk)
