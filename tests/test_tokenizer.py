"""The tokenizer encodes, decodes and renders chats exactly as transformers does for the same files."""

import json
from pathlib import Path

import gguf
import pytest
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as BackendTokenizer

from picochat.errors import ConfigError, ModelLoadError
from picochat.model.tokenizer import Tokenizer, _byte_level_pre_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello, world! How are you today?",
    "def square(x):\n    return x ** 2  # the square\n\n\nprint(square(12))",
    "Emoji: 😀🎉👍🏽 and a flag 🇫🇷, ZWJ family 👨‍👩‍👧",
    "日本語のテキストと中文字符，还有한국어",
    "   leading and trailing spaces   ",
    "tabs\tand\n\nnewlines\r\nand    runs      of spaces",
    "Numbers 1234567890 3.14159 -42 1e10 2024-11-22 $1,000.50",
    "naïve café — “quotes” ‘single’ Ünïcödé ΑΒΓ Привет مرحبا",
    "inline specials <|im_start|>user\nhi<|im_end|><|endoftext|>",
    "",
]

CHATS = {
    "single user turn": [{"role": "user", "content": "What is 2+2?"}],
    "system prompt": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour 🎨."},
    ],
    "multi-turn": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello. How can I help?"},
        {"role": "user", "content": "Write  a haiku\nabout 雪."},
    ],
}


def _hf_tokenizer(monkeypatch_env: pytest.MonkeyPatch, directory: Path, **kwargs):
    monkeypatch_env.setenv("HF_HUB_OFFLINE", "1")
    return transformers.AutoTokenizer.from_pretrained(str(directory), **kwargs)


@pytest.fixture(scope="module")
def ours(default_gguf_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(default_gguf_path)


@pytest.fixture(scope="module")
def hf(default_gguf_path: Path):
    with pytest.MonkeyPatch.context() as env:
        return _hf_tokenizer(env, default_gguf_path.parent, gguf_file=default_gguf_path.name)


# ---- the default model's GGUF vocabulary (byte-level BPE, pre-tokenizer "smollm") ----


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_encode_matches_hf(ours: Tokenizer, hf, text: str) -> None:
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(text), skip_special_tokens=False) == text


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", CHATS)
def test_encode_chat_matches_hf_apply_chat_template(ours: Tokenizer, hf, name: str, add_generation_prompt: bool):
    messages = CHATS[name]
    expected = hf.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    assert ours.encode_chat(messages, add_generation_prompt=add_generation_prompt) == expected


def test_smollm2_special_tokens(ours: Tokenizer) -> None:
    assert ours.vocab_size == 49152
    assert (ours.bos_token_id, ours.eos_token_id) == (1, 2)
    # <|im_end|> (EOS) and <|endoftext|> end a turn; <|im_start|> (BOS) and ordinary text do not.
    assert ours.stop_token_ids == frozenset({0, 2})
    assert ours.is_special(1) and not ours.is_special(ours.encode(" the")[0])
    assert ours.encode("hi", add_special_tokens=True) == ours.encode("hi")  # add_bos_token is false
    ids = ours.encode_chat(CHATS["single user turn"])
    assert ours.decode(ids).startswith("system\nYou are a helpful AI assistant")
    assert ours.decode(ids, skip_special_tokens=False).startswith("<|im_start|>system\n")


# ---- a SentencePiece-style GGUF vocabulary (byte fallback, merges derived from scores) ----


# llama.cpp's ids for the tiny vocabulary (llama-cpp-python 0.3.36: ``Llama(path, vocab_only=True)
# .tokenize(text.encode(), add_bos=True)``): SentencePiece's dummy "▁" comes first even before a
# leading space, as sentencepiece itself and transformers 5.17 have it (transformers 5.23 drops it there).
LLAMA_CPP_SPM_IDS = {
    "Hello world!": [1, 272, 277, 267], " Hello  world": [1, 259, 272, 259, 277],
    "日本 Hello 😀": [1, 281, 272, 259, 243, 162, 155, 131], "xyz\n日": [1, 259, 123, 124, 125, 13, 278], "": [1],
}


def test_sentencepiece_gguf_matches_llama_cpp_and_hf(tiny_spm_gguf: Path) -> None:
    ours = Tokenizer.from_gguf(tiny_spm_gguf)
    with pytest.MonkeyPatch.context() as env:
        hf = _hf_tokenizer(env, tiny_spm_gguf.parent, gguf_file=tiny_spm_gguf.name)
    for text, expected in LLAMA_CPP_SPM_IDS.items():
        ids = ours.encode(text, add_special_tokens=True)
        assert ids == expected, text
        if not text.startswith(" "):
            assert ids[1:] == hf.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_unsupported_gguf_tokenizer_model_is_named(tmp_path: Path) -> None:
    path = tmp_path / "t5.gguf"
    writer = gguf.GGUFWriter(path, "t5")
    writer.add_tokenizer_model("t5")
    writer.add_token_list(["<pad>", "</s>", "▁a"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="unsupported GGUF tokenizer model 't5'"):
        Tokenizer.from_gguf(path)


# ---- a Hugging Face model directory ----

HF_DIR_TEMPLATE = """{{ bos_token }}
{%- for message in messages %}
    {% if message['role'] == 'system' %}
<<{{ message['content'] }}>>
    {% else %}
{{ message['role'] }}: {{ message['content'] | trim }}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
assistant:
{%- endif %}"""


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small byte-level BPE trained here, saved the way a Hugging Face model repo stores it."""
    directory = tmp_path_factory.mktemp("hf-model")
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<|eot|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["hello world, the user and the assistant talk", "system prompts say hello", "be brief"] * 20
    backend.train_from_iterator(corpus, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    backend.save(str(directory / "tokenizer.json"))
    config = {
        "bos_token": "<s>",
        "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "rstrip": False,
                      "normalized": False, "single_word": False, "special": True},  # fmt: skip
        "chat_template": HF_DIR_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    return directory


def test_hf_dir_renders_and_encodes_like_transformers(hf_dir: Path) -> None:
    ours = Tokenizer.from_hf_dir(hf_dir)
    with pytest.MonkeyPatch.context() as env:
        hf = _hf_tokenizer(env, hf_dir)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": " hello world "}]
    assert ours.render_chat(messages) == "<s><<be brief>>\nuser: hello world</s>\nassistant:"
    assert ours.render_chat(messages) == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ours.encode_chat(messages) == expected
    assert ours.encode("hello world", add_special_tokens=True) == hf("hello world")["input_ids"]
    assert ours.encode("hello world", add_special_tokens=True)[0] == ours.bos_token_id == 0
    # EOS from tokenizer_config.json plus <|eot|> from generation_config.json.
    assert ours.stop_token_ids == frozenset({1, 2})


def test_chat_template_override_and_chatml_fallback(hf_dir: Path) -> None:
    messages = [{"role": "user", "content": "hi"}]
    override = Tokenizer.from_hf_dir(hf_dir, chat_template="{% for m in messages %}<{{ m.content }}>{% endfor %}")
    assert override.render_chat(messages) == "<hi>"
    plain = Tokenizer(BackendTokenizer.from_file(str(hf_dir / "tokenizer.json")), bos_token=None, eos_token=None,
                      chat_template=None)  # fmt: skip
    assert plain.render_chat(messages) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert plain.render_chat(messages, add_generation_prompt=False) == "<|im_start|>user\nhi<|im_end|>\n"


def test_template_helpers_behave_as_in_transformers(hf_dir: Path) -> None:
    template = (
        "{% generation %}{{ messages[0]['content'] | tojson }}{% endgeneration %}"
        "{% if messages | length > 1 %}{{ raise_exception('only one message, please') }}{% endif %}"
        "{{ strftime_now('%Y') | length }}"
    )
    tokenizer = Tokenizer.from_hf_dir(hf_dir, chat_template=template)
    assert tokenizer.render_chat([{"role": "user", "content": "<é>"}]) == '"<é>"4'
    two = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(ConfigError, match="chat template rejected the messages: only one message, please"):
        tokenizer.render_chat(two)


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([{"role": "wizard", "content": "hi"}], "message 0 has unknown role 'wizard'"),
        ([{"role": "user", "content": "hi"}, {"role": "user", "content": 3}], "message 1 \\(user\\) content must be"),
        ([{"role": "user"}], "message 0 \\(user\\) content must be a string, not NoneType"),
        (["hello"], "message 0 must be an object"),
        ("hello", "messages must be a list"),
    ],
)
def test_malformed_messages_are_one_line_config_errors(hf_dir: Path, messages, error: str) -> None:
    tokenizer = Tokenizer.from_hf_dir(hf_dir)
    with pytest.raises(ConfigError, match=error) as caught:
        tokenizer.encode_chat(messages)
    assert "\n" not in str(caught.value)


def test_broken_template_and_missing_files_are_user_errors(hf_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="chat template does not parse"):
        Tokenizer.from_hf_dir(hf_dir, chat_template="{% for m in messages %}")
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_split_regexes_match_transformers_gguf_loader(pre: str) -> None:
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    splits = getattr(mapping, "GGUF_PRE_TOKENIZER_SPLITS", None)
    if splits is None:  # transformers 5.17 (seen on a GPU box) has no such table
        pytest.skip("this transformers has no GGUF_PRE_TOKENIZER_SPLITS table to compare with")
    theirs = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(splits[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    text = "Hello 1234567 world's DON'T\n\n  x\t\ty 日本語 😀!!"
    assert _byte_level_pre_tokenizer(pre).pre_tokenize_str(text) == theirs.pre_tokenize_str(text)
