"""Builds a ready-to-run Transformer from a checkpoint file, in the requested dtype and weight
quantization, and prepares replacement linears for a live quantization switch.

GGUF Q4_0 / Q4_1 weights become int4 (group 32) and Q8_0 weights int8 straight from their raw
blocks, never through a full-precision copy of the model; any other combination dequantizes one
fused linear at a time and quantizes it. Embeddings and norms stay in the model's dtype.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from picochat.config import QuantConfig
from picochat.model.loader import LoadedCheckpoint, load_checkpoint
from picochat.model.packed_linear import pack_linears
from picochat.model.transformer import Transformer
from picochat.progress import ProgressFn


# fused module (under layers.{i}.) → the HF linears it concatenates along its output rows
FUSED_LINEARS = {
    "attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}
GGUF_DIRECT = {"int4": {"Q4_0", "Q4_1"}, "int8": {"Q8_0"}}


def build_transformer(path: Path, dtype: torch.dtype, quant: QuantConfig, device: torch.device,
                      chat_template: str | None = None, progress: ProgressFn | None = None
                      ) -> tuple[Transformer, object]:
    """The model (on ``device``) and its tokenizer."""
    direct = quant.mode != "none" and Path(path).suffix.lower() == ".gguf"
    ckpt = load_checkpoint(path, dtype, keep_quantized=direct, chat_template=chat_template)
    if not ckpt.quantized:
        model = Transformer.from_hf_tensors(ckpt.config, ckpt.tensors, dtype).to(device)
        if quant.mode != "none":
            from picochat.model.quantize import build_quantized_linears, swap_linears
            swap_linears(model, build_quantized_linears(model, quant, progress))
    else:
        model = _from_gguf_blocks(ckpt, dtype, quant, device, progress)
    pack_linears(model)  # the float linears left, on a CPU that runs their dtype natively
    return model, ckpt.tokenizer


def prepare_linears(path: Path, dtype: torch.dtype, quant: QuantConfig, device: torch.device,
                    progress: ProgressFn | None = None) -> dict[str, nn.Module]:
    """Every linear of a freshly built model in ``quant`` (float ones for mode none), by name —
    what a live switch swaps into the serving model while the old weights keep serving."""
    model, _ = build_transformer(path, dtype, quant, device, progress=progress)
    names = [f"layers.{i}.{name}" for i in range(model.config.num_layers) for name in FUSED_LINEARS]
    if quant.quantize_lm_head or not model.config.tie_word_embeddings:
        names.append("lm_head")
        if model.config.tie_word_embeddings:  # the embedding reads the (quantized) lm_head's table
            names.append("embed_tokens")
    return {name: model.get_submodule(name) for name in names}


def _from_gguf_blocks(ckpt: LoadedCheckpoint, dtype: torch.dtype, quant: QuantConfig,
                      device: torch.device, progress: ProgressFn | None) -> Transformer:
    from picochat.model.gguf_dequant import dequantize_blocks
    from picochat.model.quant_gguf import linear_from_gguf
    from picochat.model.quantize import quantize_linear, swap_linears

    cfg = ckpt.config
    placeholders = {name: torch.empty(t.shape, device="meta") for name, t in ckpt.quantized.items()}
    model = Transformer.from_hf_tensors(cfg, {**ckpt.tensors, **placeholders}, dtype)
    replacements: dict[str, nn.Module] = {}
    for i in range(cfg.num_layers):
        if progress:
            progress(f"building {quant.mode} layer {i + 1}/{cfg.num_layers}", i / cfg.num_layers)
        for fused, sources in FUSED_LINEARS.items():
            names = [f"model.layers.{i}.{s}.weight" for s in sources]
            bias = ckpt.tensors.get(f"model.layers.{i}.{sources[0]}.bias")
            if bias is not None:  # q|k|v biases, fused like their weights
                bias = torch.cat([ckpt.tensors[n.replace(".weight", ".bias")] for n in names])
            bias = None if bias is None else bias.to(device)
            # a quantized module picks its backend (and weight layout) for the device it is built on
            raws = [None if r is None else replace(r, data=r.data.to(device))
                    for r in map(ckpt.quantized.get, names)]
            if (all(r is not None and r.qtype in GGUF_DIRECT[quant.mode] for r in raws)
                    and (quant.mode == "int8" or quant.group_size == 32)):
                replacements[f"layers.{i}.{fused}"] = linear_from_gguf(raws, bias=bias)
                continue
            weight = torch.cat([dequantize_blocks(r.data, r.qtype).reshape(r.shape) if r is not None
                                else ckpt.tensors[n].float().to(device) for r, n in zip(raws, names)])
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
            linear.weight, linear.bias = nn.Parameter(weight), (nn.Parameter(bias) if bias is not None else None)
            replacements[f"layers.{i}.{fused}"] = quantize_linear(linear, quant)
    swap_linears(model, replacements)
    meta = [name for name, p in model.named_parameters() if p.is_meta]
    if meta:
        raise RuntimeError(f"weights left unloaded: {meta[:3]}")
    model = model.to(device)
    if quant.quantize_lm_head:
        from picochat.model.quantize import build_quantized_linears
        swap_linears(model, build_quantized_linears(model, quant))
    return model
