"""load_checkpoint: a GGUF file or a Hugging Face folder → ModelConfig, HF-named tensors, tokenizer.

Dispatches to ``gguf_loader`` / ``safetensors_loader`` and checks every tensor's shape against
the ModelConfig before anyone uses it. A GGUF's tensors (dequantized, or with the quantized
linears as their raw blocks) are kept as a converted safetensors file in the cache dir, so later
starts skip the GGUF's header parse and dequantization.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from picochat.config import cache_dir
from picochat.errors import ModelLoadError
from picochat.model.config import ModelConfig
from picochat.model.gguf_loader import GGUFQuantTensor, config_from_gguf, open_gguf, read_gguf_tensors
from picochat.model.safetensors_loader import read_hf_config, read_safetensors

if TYPE_CHECKING:
    from picochat.model.tokenizer import Tokenizer

CONVERTED_FORMAT = "3"  # bump when the GGUF → HF conversion changes, to invalidate old caches
_IGNORED_HF_TENSOR = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


@dataclass
class LoadedCheckpoint:
    config: ModelConfig
    tensors: dict[str, torch.Tensor]  # HF names, in the requested dtype
    tokenizer: Tokenizer
    source: Path
    format: str  # "gguf" | "safetensors"
    quantized: dict[str, GGUFQuantTensor] = field(default_factory=dict)  # keep_quantized: raw linears


def load_checkpoint(path: Path, dtype: torch.dtype = torch.float32, keep_quantized: bool = False,
                    chat_template: str | None = None) -> LoadedCheckpoint:
    """Load a ``.gguf`` file or an HF folder. With ``keep_quantized`` (GGUF only), Q4_0 / Q4_1 /
    Q8_0 linear weights stay raw in ``quantized`` instead of being dequantized into ``tensors``."""
    path = Path(path).expanduser()
    if path.is_dir():
        return _load_hf_dir(path, dtype, chat_template)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder")
    if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
        return _load_gguf(path, dtype, keep_quantized, chat_template)
    raise ModelLoadError(f"{path}: not a .gguf file or a Hugging Face model folder")


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of ``config`` must hold, with its shape."""
    hidden, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(config.num_layers):
        layer = f"model.layers.{i}."
        shapes |= {
            layer + "self_attn.q_proj.weight": (config.q_size, hidden),
            layer + "self_attn.k_proj.weight": (config.kv_size, hidden),
            layer + "self_attn.v_proj.weight": (config.kv_size, hidden),
            layer + "self_attn.o_proj.weight": (hidden, config.q_size),
            layer + "mlp.gate_proj.weight": (inter, hidden),
            layer + "mlp.up_proj.weight": (inter, hidden),
            layer + "mlp.down_proj.weight": (hidden, inter),
            layer + "input_layernorm.weight": (hidden,),
            layer + "post_attention_layernorm.weight": (hidden,),
        }
        if config.attention_bias:
            shapes |= {
                layer + "self_attn.q_proj.bias": (config.q_size,),
                layer + "self_attn.k_proj.bias": (config.kv_size,),
                layer + "self_attn.v_proj.bias": (config.kv_size,),
            }
    return shapes


def check_shapes(config: ModelConfig, tensors: dict[str, torch.Tensor],
                 quantized: dict[str, GGUFQuantTensor], source: Path) -> None:
    """Raise ModelLoadError naming ``source`` unless the tensors are exactly those ``config`` implies."""
    expected = expected_shapes(config)
    found = {name: tuple(t.shape) for name, t in tensors.items()} | {name: q.shape for name, q in quantized.items()}
    missing = [name for name in expected if name not in found]
    if missing:
        raise ModelLoadError(f"{source}: missing tensor {missing[0]}"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(found.keys() - expected.keys())
    if unexpected:
        raise ModelLoadError(f"{source}: unexpected tensor {unexpected[0]} for a {config.architecture} "
                             f"model with {config.num_layers} layers")
    for name, shape in expected.items():
        if found[name] != shape:
            raise ModelLoadError(f"{source}: tensor {name} has shape {list(found[name])}, "
                                 f"but config implies {list(shape)}")


# ---------------------------------------------------------------------------- formats

def _load_hf_dir(path: Path, dtype: torch.dtype, chat_template: str | None) -> LoadedCheckpoint:
    config = read_hf_config(path)
    tensors = {name: t for name, t in read_safetensors(path, dtype).items()
               if not _IGNORED_HF_TENSOR.fullmatch(name)}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # some tied checkpoints store the copy anyway
    check_shapes(config, tensors, {}, path)
    from picochat.model.tokenizer import Tokenizer  # lazy: tokenizers + jinja2 are slow to import
    tokenizer = Tokenizer.from_hf_dir(path, chat_template=chat_template)
    return LoadedCheckpoint(config, tensors, tokenizer, path, "safetensors")


def _load_gguf(path: Path, dtype: torch.dtype, keep_quantized: bool,
               chat_template: str | None) -> LoadedCheckpoint:
    from picochat.model.tokenizer import Tokenizer  # lazy: tokenizers + jinja2 are slow to import

    converted = converted_path(path, dtype, keep_quantized)
    cached = _read_converted(converted)
    if cached is not None:  # the GGUF itself is not even opened: its header parse costs seconds
        config, tensors, quantized, tokenizer_json = cached
        check_shapes(config, tensors, quantized, path)
        return LoadedCheckpoint(config, tensors, Tokenizer.from_json(tokenizer_json, chat_template),
                                path, "gguf", quantized)
    reader = open_gguf(path)
    config = config_from_gguf(reader, path)
    tensors, quantized = read_gguf_tensors(reader, config, path, dtype, keep_quantized)
    check_shapes(config, tensors, quantized, path)
    tokenizer = Tokenizer.from_gguf_reader(reader)
    _write_converted(converted, tensors, quantized, config, tokenizer.to_json())
    if chat_template is not None:  # the cache keeps the file's own template
        tokenizer = Tokenizer.from_json(tokenizer.to_json(), chat_template)
    return LoadedCheckpoint(config, tensors, tokenizer, path, "gguf", quantized)


def _has_gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read the file ({e.strerror or e})") from None


# ---------------------------------------------------------------------------- converted GGUF cache

def converted_path(gguf_path: Path, dtype: torch.dtype, keep_quantized: bool = False) -> Path:
    """``cache_dir()/converted/<name>-<size>-<mtime>-<dtype>[_blocks].safetensors``: a changed file
    gets a new name; ``_blocks`` holds the quantized linears as their raw GGUF blocks."""
    stat = gguf_path.stat()
    kind = _dtype_name(dtype) + ("_blocks" if keep_quantized else "")
    return cache_dir() / "converted" / f"{gguf_path.stem}-{stat.st_size}-{stat.st_mtime_ns}-{kind}.safetensors"


_BLOCKS_PREFIX = "gguf_blocks/"  # a raw linear's key in a converted file: prefix + HF name


def _read_converted(file: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, GGUFQuantTensor], str] | None:
    """The cached config, tensors, raw quantized linears and tokenizer, or None when absent, of an
    older format or unreadable (then we convert again). The file name carries the GGUF's size and mtime."""
    if not file.is_file():
        return None
    try:
        with safe_open(file, framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != CONVERTED_FORMAT or "tokenizer" not in metadata:
                return None
            fields = json.loads(metadata["config"])
            fields["eos_token_ids"] = tuple(fields["eos_token_ids"])
            kinds = json.loads(metadata["quantized"])  # HF name → [qtype, N, K]
            tensors = {name: f.get_tensor(name) for name in f.keys() if not name.startswith(_BLOCKS_PREFIX)}
            quantized = {name: GGUFQuantTensor(qtype, f.get_tensor(_BLOCKS_PREFIX + name), (n, k))
                         for name, (qtype, n, k) in kinds.items()}
            return ModelConfig(**fields), tensors, quantized, metadata["tokenizer"]
    except (SafetensorError, OSError, KeyError, TypeError, ValueError):
        return None


def _write_converted(file: Path, tensors: dict[str, torch.Tensor], quantized: dict[str, GGUFQuantTensor],
                     config: ModelConfig, tokenizer_json: str) -> None:
    """Atomically save the converted tensors and drop older conversions of the same file; a cache
    that cannot be written (read-only or full disk) only costs speed next time."""
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    blocks = {_BLOCKS_PREFIX + name: q.data.contiguous() for name, q in quantized.items()}
    kinds = {name: [q.qtype, *q.shape] for name, q in quantized.items()}
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        save_file({**tensors, **blocks}, tmp, metadata={
            "format": CONVERTED_FORMAT, "config": _config_json(config), "tokenizer": tokenizer_json,
            "quantized": json.dumps(kinds)})
        os.replace(tmp, file)
    except OSError:
        tmp.unlink(missing_ok=True)
        return
    stem, _size, _mtime, kind = file.stem.rsplit("-", 3)
    stale = re.compile(rf"{re.escape(stem)}-\d+-\d+-{re.escape(kind)}\.safetensors")
    for old in file.parent.iterdir():
        if old != file and stale.fullmatch(old.name):
            old.unlink(missing_ok=True)


def _config_json(config: ModelConfig) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
