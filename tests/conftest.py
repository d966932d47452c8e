"""Shared fixtures: the default model (through the registry), tiny random-weight HF checkpoints
(Llama, Qwen2) with a byte-level BPE tokenizer, and a tiny SentencePiece-style GGUF vocabulary."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import gguf
import pytest
import torch

# engines (in-process and in subprocesses) serve eagerly: only the tests of the compiled step
# compile, so the suite does not spend its two cores compiling in the background
os.environ["PICOCHAT_COMPILE"] = "0"

from tiny_models import tiny_model  # noqa: E402

from picochat.engine.engine import LoadedModel
from picochat.errors import ModelLoadError
from picochat.model import registry
from picochat.model.tokenizer import Tokenizer

# Pieces of a toy SentencePiece vocabulary; merges follow from the scores (earlier = higher).
# Anything else (emoji, most CJK) falls back to the <0xNN> byte tokens.
SPM_PIECES = [
    "▁", "H", "e", "l", "o", "w", "r", "d", "!", "ll", "llo", "ello", "▁H", "▁Hello",
    "or", "ld", "orld", "▁w", "▁world", "日", "本", "日本", "▁日本",
]  # fmt: skip


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The default model's weights (a GGUF file), found through the registry; never downloads."""
    try:
        return registry.default_model_path(fetch=False)
    except ModelLoadError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def default_gguf_path(default_model_path: Path) -> Path:
    return default_model_path


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


# ---- tiny random-weight Hugging Face checkpoints ----

TINY_CONFIG: dict[str, Any] = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, rope_theta=5000.0, rms_norm_eps=1e-5,
    bos_token_id=254, eos_token_id=255,
)
# Tiny tokenizer: 243 byte tokens (every byte valid in UTF-8), 10 merges, 3 ChatML control tokens = 256.
TINY_MERGES = [("h", "e"), ("Ġ", "t"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("a", "n"), ("o", "n"), ("r", "e"),
               ("l", "l"), ("Ġ", "a")]
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 253, 254 (bos), 255 (eos)
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="session")
def tiny_hf_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: ``tiny_hf_llama_dir(tie=False, **config_overrides)`` → a saved random-weight
    LlamaForCausalLM folder (config.json, model.safetensors, tokenizer.json, …); built once per
    distinct arguments per session."""
    return _tiny_hf_factory(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def tiny_hf_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory like ``tiny_hf_llama_dir`` for Qwen2ForCausalLM (q/k/v biases, random like every weight)."""
    return _tiny_hf_factory(tmp_path_factory, "qwen2")


def _tiny_hf_factory(tmp_path_factory: pytest.TempPathFactory, arch: str) -> Callable[..., Path]:
    built: dict[str, Path] = {}

    def make(tie: bool = False, **overrides: Any) -> Path:
        key = repr((tie, sorted(overrides.items())))
        if key not in built:
            built[key] = _save_tiny_hf_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch, tie, overrides)
        return built[key]

    return make


def _save_tiny_hf_model(folder: Path, arch: str, tie: bool, overrides: dict[str, Any]) -> Path:
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                             "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
    config = config_cls(**{**TINY_CONFIG, "tie_word_embeddings": tie, **overrides})
    model = model_cls(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # HF's init leaves norms at 1 and biases at 0: randomise them too
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5, generator=generator)
            else:
                param.normal_(0.0, 0.1, generator=generator)
    model.save_pretrained(folder)
    _save_tiny_tokenizer(folder)
    return folder


def _save_tiny_tokenizer(folder: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    stand_in = _gpt2_byte_chars()
    assert set(stand_in.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    utf8_bytes = [b for b in range(256) if b not in (0xC0, 0xC1) and b < 0xF5]
    vocab = {stand_in[b]: i for i, b in enumerate(utf8_bytes)}
    for left, right in TINY_MERGES:
        vocab[left + right] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=TINY_MERGES))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TINY_SPECIAL_TOKENS])
    assert backend.get_vocab_size() == TINY_CONFIG["vocab_size"]
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "add_bos_token": False,
        "chat_template": CHATML}, indent=1))


def _gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's byte → printable stand-in character table (``bytes_to_unicode``)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for i, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + i)
    return table


# ---------------------------------------------------------------- tiny engines with the real tokenizer

@pytest.fixture(scope="session")
def tokenizer(default_gguf_path) -> Tokenizer:
    return Tokenizer.from_gguf(default_gguf_path)


@pytest.fixture(scope="module")
def tiny_loaded(tokenizer) -> LoadedModel:
    return tiny_model(tokenizer, 0.5)


@pytest.fixture(scope="module")
def looping_loaded(tokenizer) -> LoadedModel:
    return tiny_model(tokenizer, 0.2)


