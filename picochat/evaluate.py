"""The quality harness: perplexity over a text with a sliding window, and greedy agreement between
two models over a prompt set. Used by ``picochat eval ppl`` and ``benchmarks/quality.py``.

It drives the Transformer directly, one sequence at a time, over a private paged cache whose block
table is the identity (slot = position); it knows nothing about the scheduler or sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from picochat.config import EngineConfig
from picochat.errors import ConfigError
from picochat.kernels import dispatch
from picochat.kernels.reference import AttentionMetadata
from picochat.model.transformer import KVCache, Transformer

SAMPLE_TEXT = "eval_text.txt"  # in picochat/data/, original prose released CC0 (data/README.md)
BLOCK_SIZE = 16

# Short chat prompts for greedy agreement: explanation, instruction, story, code, facts.
PROMPTS = (
    "Explain how a bicycle stays upright while it is moving.",
    "Write three tips for someone learning to cook.",
    "Tell me a short story about a lighthouse keeper.",
    "What causes the seasons on Earth?",
    "Write a Python function that returns the factorial of a number.",
    "Describe the water cycle in simple words.",
    "Why do leaves change color in autumn?",
    "Give me a packing list for a weekend camping trip.",
)


@dataclass(frozen=True)
class Agreement:
    """How often model b's greedy token equals model a's, over a's greedy continuations."""

    per_position: float  # b's argmax equals a's token, given a's prefix, over every position
    until_divergence: float  # mean over prompts of the share of a's tokens before b first differs
    positions: int  # tokens compared in all


class _Sequence:
    """One sequence over its own paged K/V cache: feed tokens, get logits at chosen positions."""

    def __init__(self, model: Transformer, capacity: int):
        cfg = model.config
        weight = model.norm.weight  # the model's device and dtype (the embedding may be int8)
        self.model, self.device, self.length = model, weight.device, 0
        num_blocks = -(-capacity // BLOCK_SIZE)
        shape = (num_blocks, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim)
        self.caches = [KVCache(torch.zeros(shape, dtype=weight.dtype, device=self.device),
                               torch.zeros(shape, dtype=weight.dtype, device=self.device))
                       for _ in range(cfg.num_layers)]
        self.block_table = torch.arange(num_blocks, dtype=torch.int32, device=self.device)[None]

    def feed(self, token_ids: Sequence[int], logits_at: Sequence[int]) -> torch.Tensor:
        """Append ``token_ids``; fp32 logits [len(logits_at), V] at those indices of the chunk."""
        start, n = self.length, len(token_ids)
        positions = torch.arange(start, start + n, device=self.device)
        meta = AttentionMetadata(
            query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor([start + n], dtype=torch.int32, device=self.device),
            block_tables=self.block_table, slot_mapping=positions,
            query_lens_cpu=[n], seq_lens_cpu=[start + n], block_size=BLOCK_SIZE)
        logits = self.model(torch.tensor(list(token_ids), device=self.device), positions, meta, self.caches,
                            torch.tensor(list(logits_at), dtype=torch.int64, device=self.device))
        self.length += n
        return logits


def perplexity(model: Transformer, token_ids: Sequence[int], window: int = 512,
               stride: int | None = None) -> float:
    """exp(mean NLL) over the text, Hugging Face's sliding-window method: windows of ``window``
    tokens start every ``stride`` tokens (default: half a window) and each scores only the tokens
    no earlier window scored, with the window's other tokens as context. A window's first token
    has no context there, so with ``stride == window`` (no overlap) it goes unscored."""
    if not 2 <= window <= model.config.max_position_embeddings:
        raise ConfigError(f"window must be in 2..{model.config.max_position_embeddings}, got {window}")
    stride = window // 2 if stride is None else stride
    if not 1 <= stride <= window:
        raise ConfigError(f"stride must be in 1..{window} (the window), got {stride}")
    if len(token_ids) < 2:
        raise ConfigError(f"perplexity needs a text of at least 2 tokens, got {len(token_ids)}")
    device = model.norm.weight.device
    nll, count, done = 0.0, 0, 0  # tokens before ``done`` are scored
    for begin in range(0, len(token_ids), stride):
        end = min(begin + window, len(token_ids))
        chunk = token_ids[begin:end]
        first = max(done, begin + 1) - begin  # chunk index of the first token to score
        # the logits at chunk index i predict chunk[i + 1]
        logits = _Sequence(model, len(chunk)).feed(chunk, range(first - 1, len(chunk) - 1))
        targets = torch.tensor(chunk[first:], dtype=torch.int64, device=device)
        nll += F.cross_entropy(logits, targets, reduction="sum").item()
        count += len(chunk) - first
        done = end
        if end == len(token_ids):
            break
    return math.exp(nll / count)


def greedy_tokens(model: Transformer, prompt_ids: Sequence[int], max_tokens: int, stop_id: int | None,
                  forced: Sequence[int] | None = None) -> list[int]:
    """The model's greedy choice at each step after ``prompt_ids``: up to ``max_tokens`` tokens,
    ending at ``stop_id``. Each step is fed the previous choice, or with ``forced`` (teacher
    forcing) the previous forced token instead — the same prefill and decode steps either way."""
    seq = _Sequence(model, len(prompt_ids) + max_tokens)
    chosen = [int(seq.feed(prompt_ids, [len(prompt_ids) - 1])[0].argmax())]
    fed = chosen if forced is None else forced  # ``chosen`` grows as it is fed
    while len(chosen) < max_tokens and fed[len(chosen) - 1] != stop_id:
        chosen.append(int(seq.feed([fed[len(chosen) - 1]], [0])[0].argmax()))
    return chosen


def greedy_agreement(model_a: Transformer, model_b: Transformer, tokenizer, prompts: Sequence[str] = PROMPTS,
                     max_tokens: int = 32) -> Agreement:
    """Model a (the reference) writes a greedy reply to each prompt; model b is fed the same tokens
    through the same decode steps, and at each position its greedy choice is compared with a's.
    Up to the first difference b takes exactly the steps it would take generating alone, so its
    own reply equals a's that far: one pass gives both measures, and a model agrees with itself."""
    matches, until_divergence = [], []
    for prompt in prompts:
        prompt_ids = tokenizer.encode_chat([{"role": "user", "content": prompt}])
        reply = greedy_tokens(model_a, prompt_ids, max_tokens, tokenizer.eos_token_id)
        choices = greedy_tokens(model_b, prompt_ids, len(reply), None, forced=reply)
        same = [b == a for b, a in zip(choices, reply)]
        matches += same
        until_divergence.append((same.index(False) if False in same else len(same)) / len(same))
    return Agreement(sum(matches) / len(matches), sum(until_divergence) / len(until_divergence), len(matches))


# ------------------------------------------------------------------------------ CLI helpers

def read_text(path: Path | None) -> str:
    """The text of ``path``, or the shipped sample when None."""
    if path is None:
        return resources.files("picochat").joinpath("data", SAMPLE_TEXT).read_text(encoding="utf-8")
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None


def load_for_eval(config: EngineConfig) -> tuple[Transformer, object]:
    """The model and tokenizer of ``config`` (model, dtype, quant, threads, attention, device)."""
    from picochat.engine.engine import load_model

    if config.threads:
        torch.set_num_threads(config.threads)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if config.device == "auto" else config.device)
    loaded = load_model(config, device)
    try:
        backend = dispatch.resolve_attention_backend(config.attention, device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    loaded.model.select_kernels(backend, device)
    return loaded.model, loaded.tokenizer
