"""Hugging Face model folders: ``config.json`` plus ``*.safetensors`` weights, single or sharded
(``model.safetensors.index.json``). Llama, Mistral, Qwen2/Qwen2.5 and SmolLM checkpoints.

Shape checks live in ``loader``, tokenizer construction in ``tokenizer``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from picochat.errors import ModelLoadError
from picochat.model.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"


def read_hf_config(path: Path) -> ModelConfig:
    config_file = path / "config.json"
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: no config.json (not a Hugging Face model folder)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{config_file}: cannot read it as JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{config_file}: expected a JSON object")
    try:
        return ModelConfig.from_hf_config(raw)
    except ModelLoadError as e:
        raise ModelLoadError(f"{config_file}: {e}") from None


def read_safetensors(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files, converted to ``dtype``."""
    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    tensors[name] = f.get_tensor(name).to(dtype)
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{file}: not a valid safetensors file, or truncated ({e})") from None
    index = path / INDEX_FILE
    if index.is_file():
        missing = sorted(set(_weight_map(index)) - tensors.keys())
        if missing:
            raise ModelLoadError(f"{index}: lists {len(missing)} tensor(s) its shards lack, e.g. {missing[0]}")
    return tensors


def weight_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        files = [path / name for name in dict.fromkeys(_weight_map(index).values())]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ModelLoadError(f"{index}: shard {absent[0]} is missing")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        other = " (only safetensors weights are supported)" if any(path.glob("*.bin")) else ""
        raise ModelLoadError(f"{path}: no *.safetensors weights{other}")
    return files


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{index}: not a valid safetensors index ({e})") from None
    if not isinstance(weight_map, dict):
        raise ModelLoadError(f"{index}: weight_map is not an object")
    return weight_map
