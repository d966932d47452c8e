"""The Llama-family transformer (Llama, Mistral, Qwen2, SmolLM) over a flat varlen batch.

One forward takes the packed tokens of every sequence in a step (prefill chunks and decode rows
alike), writes their K/V into the paged cache and returns logits only where a token is sampled.
It knows nothing about requests, scheduling or tokenization. Linear layers are fused (q|k|v and
gate|up) and are plain ``nn.Linear`` modules that quantization swaps for packed ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from picochat.errors import ModelLoadError
from picochat.kernels import dispatch, reference
from picochat.kernels.reference import AttentionMetadata, DecodeMetadata
from picochat.model.config import ModelConfig


@dataclass
class Kernels:
    """The kernel implementations a forward uses, chosen by ``kernels.dispatch`` per device."""

    attention: Callable[..., torch.Tensor]
    decode_attention: Callable[..., torch.Tensor] | None  # for DecodeMetadata steps, where supported
    rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rope: Callable[..., tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def select(cls, attention_backend: str, device: torch.device) -> "Kernels":
        return cls(dispatch.attention_fn(attention_backend, device), dispatch.decode_attention_fn(attention_backend, device),
                   dispatch.rms_norm_fn(device), dispatch.rope_fn(device))


@dataclass
class KVCache:
    """One layer's paged cache pair."""

    k: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    v: torch.Tensor  # [num_blocks, block_size, Hkv, D]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, kernels: Kernels):
        return kernels.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.scale = cfg.head_dim ** -0.5
        self.sliding_window = cfg.sliding_window
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                meta: AttentionMetadata | DecodeMetadata, cache: KVCache, kernels: Kernels) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)  # (T, H, D)
        k = k.view(t, self.num_kv_heads, self.head_dim)  # (T, Hkv, D)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        q, k = kernels.rope(q, k, positions, cos_sin)
        reference.write_kv(k, v, cache.k, cache.v, meta.slot_mapping)
        if isinstance(meta, DecodeMetadata):  # the window is already in meta's bias
            out = kernels.decode_attention(q, cache.k, cache.v, meta, self.scale)
        else:
            out = kernels.attention(q, cache.k, cache.v, meta, self.scale, self.sliding_window)  # (T, H, D)
        return self.o_proj(out.reshape(t, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, residual, positions, cos_sin, meta, cache, kernels: Kernels):
        h, residual = self.input_layernorm(x, residual, kernels)
        h = self.attn(h, positions, cos_sin, meta, cache, kernels)
        h, residual = self.post_attention_layernorm(h, residual, kernels)
        return self.mlp(h), residual


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        # uninitialised: weights are always loaded (and normal_ on the meta device would import dynamo)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        with torch.device("cpu"):  # a real table even while the weights are built on the meta device
            cos_sin = reference.rope_cos_sin_cache(
                cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("cos_sin", cos_sin, persistent=False)
        self.kernels = Kernels.select("sdpa", torch.device("cpu"))

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata | DecodeMetadata,
                caches: list[KVCache], logits_indices: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions: [T]; returns fp32 logits [len(logits_indices) or T, V].

        A ``DecodeMetadata`` step (one token per sequence, only where ``kernels.decode_attention``
        exists) runs without host data, so it can be compiled as one graph."""
        x = self.embed_tokens(input_ids)  # (T, hidden)
        residual = None
        for layer, cache in zip(self.layers, caches):
            x, residual = layer(x, residual, positions, self.cos_sin, meta, cache, self.kernels)
        if logits_indices is not None:
            x, residual = x[logits_indices], residual[logits_indices]
        x, _ = self.norm(x, residual, self.kernels)
        return self.lm_head(x).float()

    def select_kernels(self, attention_backend: str, device: torch.device) -> None:
        self.kernels = Kernels.select(attention_backend, device)

    # ------------------------------------------------------------------------ loading weights

    @classmethod
    def from_hf_tensors(cls, cfg: ModelConfig, tensors: dict[str, torch.Tensor],
                        dtype: torch.dtype) -> "Transformer":
        """Build from HF-named tensors, fusing q|k|v and gate|up; every shape is checked first."""
        with torch.device("meta"):
            model = cls(cfg)
        params: dict[str, torch.Tensor] = {
            "embed_tokens.weight": _take(tensors, "model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size)),
            "norm.weight": _take(tensors, "model.norm.weight", (cfg.hidden_size,)),
        }
        if not cfg.tie_word_embeddings:
            params["lm_head.weight"] = _take(tensors, "lm_head.weight", (cfg.vocab_size, cfg.hidden_size))
        h, q, kv, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
        for i in range(cfg.num_layers):
            src, dst = f"model.layers.{i}.", f"layers.{i}."
            attn = [_take(tensors, f"{src}self_attn.{n}_proj.weight", (rows, h))
                    for n, rows in (("q", q), ("k", kv), ("v", kv))]
            params[dst + "attn.qkv_proj.weight"] = _cat_rows(attn)
            if cfg.attention_bias:
                params[dst + "attn.qkv_proj.bias"] = torch.cat(
                    [_take(tensors, f"{src}self_attn.{n}_proj.bias", (rows,)) for n, rows in (("q", q), ("k", kv), ("v", kv))])
            params[dst + "attn.o_proj.weight"] = _take(tensors, f"{src}self_attn.o_proj.weight", (h, q))
            params[dst + "mlp.gate_up_proj.weight"] = _cat_rows([
                _take(tensors, f"{src}mlp.gate_proj.weight", (inter, h)),
                _take(tensors, f"{src}mlp.up_proj.weight", (inter, h))])
            params[dst + "mlp.down_proj.weight"] = _take(tensors, f"{src}mlp.down_proj.weight", (h, inter))
            params[dst + "input_layernorm.weight"] = _take(tensors, f"{src}input_layernorm.weight", (h,))
            params[dst + "post_attention_layernorm.weight"] = _take(tensors, f"{src}post_attention_layernorm.weight", (h,))
        model.load_state_dict({k: v.to(dtype) for k, v in params.items()}, strict=False, assign=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        return model.eval()


def _cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts)``; placeholders (meta tensors that quantized linears replace) by shape
    alone: torch's meta kernel for cat imports torch._dynamo, ~3 s of a quantized model's load."""
    if all(p.is_meta for p in parts):
        rows = sum(p.shape[0] for p in parts)
        return torch.empty((rows, *parts[0].shape[1:]), dtype=parts[0].dtype, device="meta")
    return torch.cat(parts)


def _take(tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...]) -> torch.Tensor:
    t = tensors.get(name)
    if t is None:
        raise ModelLoadError(f"checkpoint has no tensor {name!r}")
    if tuple(t.shape) != shape:
        raise ModelLoadError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
    return t
