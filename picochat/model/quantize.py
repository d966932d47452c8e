"""Quantizing a loaded transformer: which linears, building their replacements, swapping them in.

A live switch is two steps so the old weights keep serving meanwhile:
:func:`build_quantized_linears` prepares the new modules without touching the model (slow, run it
off the engine thread), then :func:`swap_linears` puts them in between two engine steps and hands
back the modules it replaced (keep them to switch back without reloading). Switching between two
quantized modes needs the float linears: pass a model that still holds ``nn.Linear``\\ s.

The formats live in ``quant_formats``, the modules in ``quant_linear``, GGUF conversion in
``quant_gguf``; this module re-exports what the rest of picochat uses.
"""

from __future__ import annotations


import torch
from torch import nn

from picochat.config import QuantConfig
from picochat.model.quant_formats import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8
from picochat.model.quant_gguf import int4_from_gguf, int8_from_gguf_q8_0, linear_from_gguf
from picochat.model.quant_linear import Backend, Int4Linear, Int8Embedding, Int8Linear, QuantLinear
from picochat.progress import ProgressFn

__all__ = [
    "Backend", "Int4Linear", "Int8Linear", "QuantLinear", "build_quantized_linears", "dequantize_int4",
    "dequantize_int8", "int4_from_gguf", "int8_from_gguf_q8_0", "linear_from_gguf", "quantize_int4",
    "quantize_int8", "quantize_linear", "quantizable_linears", "swap_linears", "weight_bytes",
]

# the transformer's linears inside each layer (``layers[i].attn.*``, ``layers[i].mlp.*``)
LAYER_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
LM_HEAD = "lm_head"
LM_HEAD_QUANT = QuantConfig(mode="int8")  # the lm_head's format in every mode (see QuantConfig)
EMBEDDING = "embed_tokens"  # tied to the lm_head: read from its int8 weights once that is quantized


def quantizable_linears(model: nn.Module, include_lm_head: bool) -> list[tuple[str, nn.Linear]]:
    """The float linears to quantize (``nn.Linear``\\ s, also those packed for oneDNN at load),
    by qualified name, in model order."""
    from picochat.model.packed_linear import PackedLinear  # it imports this module

    names = LAYER_LINEARS + ((LM_HEAD,) if include_lm_head else ())
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, PackedLinear)) and name.rpartition(".")[2] in names]


def quantize_linear(linear: nn.Linear, cfg: QuantConfig, backend: Backend = "auto") -> QuantLinear:
    """An int8 or int4 replacement for ``linear`` (on its device), per ``cfg.mode``."""
    weight = linear.weight.detach()
    bias = None if linear.bias is None else linear.bias.detach()
    if cfg.mode == "int8":
        return Int8Linear(*quantize_int8(weight), bias=bias, backend=backend)
    if cfg.mode == "int4":
        return Int4Linear(*quantize_int4(weight, cfg.group_size), bias=bias, backend=backend)
    raise ValueError(f"quantize_linear needs mode int8 or int4, got {cfg.mode!r}")


@torch.no_grad()
def build_quantized_linears(model: nn.Module, cfg: QuantConfig, progress: ProgressFn | None = None,
                            backend: Backend = "auto") -> dict[str, nn.Module]:
    """Quantized replacements for the model's linears, by qualified name; the model is untouched.

    Mode ``none`` needs no new modules and returns ``{}``. Raises ConfigError (one line) for a
    group size that does not fit a layer.
    """
    cfg.validate()
    if cfg.mode == "none":
        return {}
    targets = quantizable_linears(model, cfg.quantize_lm_head)
    replacements: dict[str, nn.Module] = {}
    for i, (name, linear) in enumerate(targets):
        if progress is not None:
            progress(f"quantizing {name} to {cfg.mode}", i / len(targets))
        replacements[name] = quantize_linear(linear, LM_HEAD_QUANT if name == LM_HEAD else cfg, backend)
    if progress is not None:
        progress(f"quantized {len(targets)} linears to {cfg.mode}", 1.0)
    head = replacements.get(LM_HEAD)
    if head is not None:
        embedding = model.get_submodule(EMBEDDING)
        if embedding.weight is model.get_submodule(LM_HEAD).weight:  # tied
            replacements[EMBEDDING] = Int8Embedding(head, embedding.weight.dtype)
    return replacements


def swap_linears(model: nn.Module, replacements: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Put ``replacements`` into ``model``; return the modules they replaced, by name.

    Every name is resolved before anything changes, so a bad name leaves the model as it was.
    Call it between engine steps (no forward pass may run meanwhile).
    """
    slots = []
    for name in replacements:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if not isinstance(getattr(parent, child, None), nn.Module):
            raise AttributeError(f"model has no module {name!r} to replace")
        slots.append((name, parent, child))
    previous = {name: getattr(parent, child) for name, parent, child in slots}
    for name, parent, child in slots:
        setattr(parent, child, replacements[name])
    return previous


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights: its parameters (tied ones once) plus quantized linears."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    quantized = sum(m.weight_bytes() for m in model.modules() if isinstance(m, QuantLinear))
    return params + quantized
