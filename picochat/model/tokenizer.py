"""Text ↔ token ids for one model, and its chat template.

Owns building a `tokenizers.Tokenizer` from a GGUF file's vocabulary (llama.cpp's
``tokenizer.ggml.*`` keys) or from a Hugging Face model directory, encoding and decoding, the
ids that end a turn, and rendering a chat with the model's own Jinja template the way
transformers' ``apply_chat_template`` does, so prompt ids match HF's exactly. Streaming decode
lives in ``detokenizer.py``; the engine itself never sees text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import gguf
import jinja2
import tokenizers
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from picochat.errors import ConfigError, ModelLoadError

# Used when a model ships no template of its own.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHAT_ROLES = ("system", "user", "assistant", "tool")

# Special tokens that end an assistant turn in the common chat formats (ChatML, Llama 3, Phi,
# Gemma, GPT-2 style). They stop generation only when the vocabulary marks them special.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<|endoftext|>", "<end_of_turn>")

# ---- pre-tokenizers for byte-level BPE, keyed by `tokenizer.ggml.pre` (llama.cpp's names) ----

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
# GPT-2's split after every digit is cut off on its own (StarCoder-derived vocabularies).
_DIGIT_SPLIT_PRES = frozenset({"smollm", "starcoder", "refact"})
# Llama 3 looks a whole pre-token up in the vocabulary before merging (`ignore_merges`).
_IGNORE_MERGES_PRES = frozenset({"llama-bpe", "llama3", "llama-v3"})


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The split this vocabulary's merges were learned on; GPT-2's for an unknown `pre`."""
    if pre in _SPLITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRES:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def _byte_level_backend(tokens: list[str], merges: list[str], pre: str) -> tokenizers.Tokenizer:
    """GPT-2 style byte-level BPE (`tokenizer.ggml.model == "gpt2"`)."""
    vocab = {token: index for index, token in enumerate(tokens)}
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    backend = tokenizers.Tokenizer(models.BPE(vocab, pairs, ignore_merges=pre in _IGNORE_MERGES_PRES))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    return backend


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece files list no merges: every split of a token into two vocabulary pieces is one,
    ranked by the merged token's score (transformers' `generate_merges`, so ids match HF's)."""
    ids = {token: index for index, token in enumerate(tokens)}
    ranked: list[tuple[str, str, float]] = []
    for token, score in dict(zip(tokens, scores)).items():
        splits = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ids and token[k:] in ids]
        splits.sort(key=lambda pair: (ids[pair[0]], ids[pair[1]]))
        ranked.extend((left, right, score) for left, right in splits)
    ranked.sort(key=lambda merge: (merge[2], len(merge[0]), len(merge[1])), reverse=True)  # stable
    return [(left, right) for left, right, _ in ranked]


def _sentencepiece_backend(
    tokens: list[str], merges: list[str] | None, scores: list[float] | None, unk_id: int | None, add_space_prefix: bool
) -> tokenizers.Tokenizer:
    """SentencePiece-style BPE with byte fallback and ▁ for spaces (`tokenizer.ggml.model == "llama"`)."""
    vocab = {token: index for index, token in enumerate(tokens)}
    if merges is not None:
        pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    elif scores is not None:
        pairs = _merges_from_scores(tokens, scores)
    else:
        raise ModelLoadError("GGUF SentencePiece tokenizer has neither merges nor scores")
    unk_token = tokens[unk_id] if unk_id is not None else None
    backend = tokenizers.Tokenizer(models.BPE(vocab, pairs, unk_token=unk_token, fuse_unk=True, byte_fallback=True))
    # SentencePiece's dummy prefix: "▁" before the text even where it starts with a space (llama.cpp
    # adds it before every text fragment after a special token too; the normalizer runs per fragment).
    # tokenizers' Metaspace adds none before a leading space, so it is not used.
    spaces = normalizers.Replace(" ", "▁")
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), spaces]) if add_space_prefix else spaces
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _bos_eos_post_processor(
    bos: tuple[str, int] | None, eos: tuple[str, int] | None, add_bos: bool, add_eos: bool
) -> processors.TemplateProcessing:
    """What `encode(text, add_special_tokens=True)` wraps around the text (HF's `update_post_processor`)."""
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    single = " ".join([*([bos[0]] if add_bos else []), "$A", *([eos[0]] if add_eos else [])])
    special = [token for token, added in ((bos, add_bos), (eos, add_eos)) if added]
    return processors.TemplateProcessing(single=single, special_tokens=special)


# ---- chat templates, rendered the way transformers renders them ----


class _GenerationBlock(Extension):
    """`{% generation %}…{% endgeneration %}` marks assistant text for HF's training masks; we keep the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    # Jinja's own `tojson` HTML-escapes; HF's does not.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


# HF's settings: trim_blocks and lstrip_blocks change whitespace, so they decide the prompt's ids.
_JINJA = ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, loopcontrols]
)
_JINJA.filters["tojson"] = _tojson
_JINJA.globals["raise_exception"] = _raise_exception
_JINJA.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)


def _compile_template(source: str) -> jinja2.Template:
    try:
        return _JINJA.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise ConfigError(f"chat template does not parse (line {err.lineno}): {err.message}") from None


def _checked_messages(messages: Sequence[dict]) -> list[dict]:
    """Plain copies of the messages, or a ConfigError naming the first bad one."""
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        raise ConfigError(f"messages must be a list of {{role, content}} objects, not {type(messages).__name__}")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ConfigError(f"message {index} must be an object with role and content, not {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise ConfigError(f"message {index} has unknown role {role!r} (expected one of {', '.join(CHAT_ROLES)})")
        if not isinstance(content, str):
            raise ConfigError(f"message {index} ({role}) content must be a string, not {type(content).__name__}")
        checked.append(dict(message))
    return checked


# ---- the tokenizer ----


class Tokenizer:
    """One model's tokenizer: a `tokenizers.Tokenizer` plus special tokens and the chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        chat_template: str | None,
        extra_stop_ids: Iterable[int] = (),
    ) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token is not None else None
        self.eos_token_id = backend.token_to_id(eos_token) if eos_token is not None else None
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self._special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        end_of_turn = {backend.token_to_id(token) for token in _END_OF_TURN_TOKENS} & self._special_ids
        ids = {self.eos_token_id, *extra_stop_ids, *end_of_turn} - {None}
        self.stop_token_ids: frozenset[int] = frozenset(ids)
        self.chat_template = chat_template or CHATML_TEMPLATE
        self._template = _compile_template(self.chat_template)

    # -- construction --

    def to_json(self) -> str:
        """Everything needed to rebuild this tokenizer without its source files (a cache entry)."""
        return json.dumps({"backend": self.backend.to_str(), "bos_token": self.bos_token,
                           "eos_token": self.eos_token, "chat_template": self.chat_template,
                           "stop_token_ids": sorted(self.stop_token_ids)})

    @classmethod
    def from_json(cls, text: str, chat_template: str | None = None) -> Tokenizer:
        state = json.loads(text)
        return cls(tokenizers.Tokenizer.from_str(state["backend"]), bos_token=state["bos_token"],
                   eos_token=state["eos_token"], chat_template=chat_template or state["chat_template"],
                   extra_stop_ids=state["stop_token_ids"])

    @classmethod
    def from_gguf(cls, path: Path | str, chat_template: str | None = None) -> Tokenizer:
        try:
            reader = gguf.GGUFReader(path)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"cannot read GGUF file {path}: {err}") from None
        return cls.from_gguf_reader(reader, chat_template=chat_template)

    @classmethod
    def from_gguf_reader(cls, reader: gguf.GGUFReader, chat_template: str | None = None) -> Tokenizer:
        """Build the tokenizer llama.cpp's `tokenizer.ggml.*` metadata describes."""

        def field(key: str, default: Any = None) -> Any:
            found = reader.fields.get(key)
            return found.contents() if found is not None else default

        kind, tokens = field("tokenizer.ggml.model"), field("tokenizer.ggml.tokens")
        if tokens is None:
            raise ModelLoadError("GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
        if kind == "gpt2":
            merges = field("tokenizer.ggml.merges")
            if merges is None:
                raise ModelLoadError("GGUF byte-level BPE tokenizer has no merges (tokenizer.ggml.merges)")
            backend = _byte_level_backend(tokens, merges, field("tokenizer.ggml.pre", "default"))
            add_bos_default = False
        elif kind == "llama":
            backend = _sentencepiece_backend(
                tokens,
                field("tokenizer.ggml.merges"),
                field("tokenizer.ggml.scores"),
                field("tokenizer.ggml.unknown_token_id"),
                add_space_prefix=field("tokenizer.ggml.add_space_prefix", True),
            )
            add_bos_default = True  # llama.cpp's default for SentencePiece vocabularies
        else:
            raise ModelLoadError(f"unsupported GGUF tokenizer model {kind!r} (supported: gpt2, llama)")

        # Control tokens (<|im_start|>, …) are special; user-defined ones (<think>, …) are matched whole.
        token_types = field("tokenizer.ggml.token_type", [])
        typed = list(zip(tokens, token_types))
        backend.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t, k in typed if k == gguf.TokenType.CONTROL]
        )
        backend.add_tokens(
            [AddedToken(t, special=False, normalized=False) for t, k in typed if k == gguf.TokenType.USER_DEFINED]
        )

        def token(key: str) -> tuple[str, int] | None:
            index = field(key)
            return (tokens[index], index) if index is not None and 0 <= index < len(tokens) else None

        bos, eos = token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id")
        add_bos = field("tokenizer.ggml.add_bos_token", add_bos_default)
        add_eos = field("tokenizer.ggml.add_eos_token", False)
        backend.post_processor = _bos_eos_post_processor(bos, eos, add_bos, add_eos)
        eot = token("tokenizer.ggml.eot_token_id")
        return cls(
            backend,
            bos_token=bos[0] if bos else None,
            eos_token=eos[0] if eos else None,
            chat_template=chat_template or field("tokenizer.chat_template"),
            extra_stop_ids=[eot[1]] if eot else [],
        )

    @classmethod
    def from_hf_dir(cls, path: Path | str, chat_template: str | None = None) -> Tokenizer:
        """`tokenizer.json` + `tokenizer_config.json` (+ `generation_config.json` EOS ids) from a model dir."""
        path = Path(path)
        try:
            backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as err:  # tokenizers raises a bare Exception for a bad or missing file
            raise ModelLoadError(f"cannot load {path / 'tokenizer.json'}: {err}") from None
        # As in transformers 5, tokenizer.json's post-processor alone decides whether BOS/EOS are added;
        # `add_bos_token` in tokenizer_config.json is ignored, and a chat_template.jinja file wins.
        config = {**_read_json(path / "special_tokens_map.json"), **_read_json(path / "tokenizer_config.json")}
        bos_token, eos_token = _token_content(config.get("bos_token")), _token_content(config.get("eos_token"))
        template_file = path / "chat_template.jinja"
        if chat_template is None and template_file.is_file():
            chat_template = template_file.read_text(encoding="utf-8")

        generation_eos = _read_json(path / "generation_config.json").get("eos_token_id", [])
        return cls(
            backend,
            bos_token=bos_token,
            eos_token=eos_token,
            chat_template=chat_template or _named_template(config.get("chat_template")),
            extra_stop_ids=[generation_eos] if isinstance(generation_eos, int) else generation_eos,
        )

    # -- text ↔ ids --

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in it (``<|im_start|>``) become their ids."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    # -- chats --

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text the model's template makes of `messages` (HF's `apply_chat_template`)."""
        checked = _checked_messages(messages)
        try:
            return self._template.render(
                messages=checked,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.TemplateError as err:
            raise ConfigError(f"chat template rejected the messages: {err.message}") from None

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids for a chat; the template writes its own BOS, so none is added here (as in HF)."""
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read {path}: {err}") from None


def _token_content(token: str | dict | None) -> str | None:
    """`tokenizer_config.json` spells a special token as a string or as an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


def _named_template(template: str | list | None) -> str | None:
    """A config's chat template: one string, or a list of named ones of which "default" is used."""
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        return named.get("default")
    return template
