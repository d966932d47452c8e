"""Shared fixtures: the default model's GGUF, and a tiny SentencePiece-style GGUF vocabulary."""

from pathlib import Path

import gguf
import pytest

DEFAULT_GGUF = Path.home() / ".cache/picochat/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"

# Pieces of a toy SentencePiece vocabulary; merges follow from the scores (earlier = higher).
# Anything else (emoji, most CJK) falls back to the <0xNN> byte tokens.
SPM_PIECES = [
    "▁", "H", "e", "l", "o", "w", "r", "d", "!", "ll", "llo", "ello", "▁H", "▁Hello",
    "or", "ld", "orld", "▁w", "▁world", "日", "本", "日本", "▁日本",
]  # fmt: skip


@pytest.fixture(scope="session")
def default_gguf_path() -> Path:
    if not DEFAULT_GGUF.is_file():
        pytest.skip(f"default model not downloaded: {DEFAULT_GGUF}")
    return DEFAULT_GGUF


@pytest.fixture(scope="session")
def tiny_spm_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer-only GGUF: `tokenizer.ggml.model = "llama"`, byte fallback, no merges, a template."""
    path = tmp_path_factory.mktemp("spm") / "tiny-spm.gguf"
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *SPM_PIECES]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * len(SPM_PIECES)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
