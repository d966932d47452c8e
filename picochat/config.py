"""Typed configuration: sampling, engine, scheduler, quantization and speculation settings.

Every config is a frozen dataclass whose ``validate()`` raises :class:`ConfigError` with a
one-line message naming the bad field. The user config (theme, last model, …) lives in a TOML
file in the XDG config dir; this module reads and writes it atomically. Nothing here imports
torch, so the CLI and the UI can validate settings cheaply.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from picochat.errors import ConfigError

DType = Literal["float32", "bfloat16", "float16"]
QuantMode = Literal["none", "int8", "int4"]
SpecMode = Literal["off", "ngram", "draft"]
AttentionBackend = Literal["auto", "triton", "sdpa", "reference"]


@dataclass(frozen=True)
class SamplingParams:
    """How one request turns logits into tokens (vLLM's definitions)."""

    temperature: float = 0.7  # 0 → greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]
    top_k: int = -1  # -1 (or 0) → disabled
    min_p: float = 0.0  # drop tokens below min_p * p(max)
    repetition_penalty: float = 1.0  # >1 penalises tokens seen in prompt or output (CTRL-style)
    presence_penalty: float = 0.0  # subtracted once from tokens seen in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    seed: int | None = None  # per-request generator; same seed → same tokens
    max_tokens: int = 512
    stop: tuple[str, ...] = ()  # stop strings (not included in the output)
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's EOS / end-of-turn ids
    ignore_eos: bool = False  # benchmarks: always produce max_tokens

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> "SamplingParams":
        checks = [
            (self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= -1, f"top_k must be -1 (off) or >= 0, got {self.top_k}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0.0,
             f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2.0 <= self.presence_penalty <= 2.0,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2.0 <= self.frequency_penalty <= 2.0,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.seed is None or 0 <= self.seed < 2**63, f"seed must be a non-negative int, got {self.seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        return self

    def replace(self, **changes: Any) -> "SamplingParams":
        return dataclasses.replace(self, **changes).validate()

    def summary(self) -> str:
        """Short text for a status bar."""
        if self.greedy:
            return f"greedy · max {self.max_tokens}"
        parts = [f"T={self.temperature:g}"]
        if self.top_p < 1.0:
            parts.append(f"top-p {self.top_p:g}")
        if self.top_k > 0:
            parts.append(f"top-k {self.top_k}")
        if self.min_p > 0:
            parts.append(f"min-p {self.min_p:g}")
        if self.seed is not None:
            parts.append(f"seed {self.seed}")
        parts.append(f"max {self.max_tokens}")
        return " · ".join(parts)


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous-batching budgets."""

    max_num_seqs: int = 16  # sequences in one step
    max_num_batched_tokens: int = 512  # tokens (prefill chunks + decode rows) in one step
    block_size: int = 16  # tokens per KV block
    kv_cache_memory_mb: int | None = None  # KV budget; None → sized from free memory
    num_kv_blocks: int | None = None  # exact pool size, overriding the memory budget
    enable_prefix_caching: bool = True
    max_waiting: int = 1024  # submit() beyond this raises QueueFull

    def validate(self) -> "SchedulerConfig":
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory_mb is not None and self.kv_cache_memory_mb < 1:
            raise ConfigError(f"kv_cache_memory_mb must be >= 1, got {self.kv_cache_memory_mb}")
        return self


@dataclass(frozen=True)
class QuantConfig:
    mode: QuantMode = "none"
    group_size: int = 32  # int4 only: 32, 64 or 128
    # the output projection in int8 in either mode: in int4 it raised the default model's
    # perplexity 19.72 → 20.72, in int8 to 19.85; it is the largest single matmul of a decode step
    quantize_lm_head: bool = True

    def validate(self) -> "QuantConfig":
        if self.mode not in ("none", "int8", "int4"):
            raise ConfigError(f"quant must be none, int8 or int4, got {self.mode!r}")
        if self.group_size not in (32, 64, 128):
            raise ConfigError(f"int4 group size must be 32, 64 or 128, got {self.group_size}")
        return self


@dataclass(frozen=True)
class SpecConfig:
    mode: SpecMode = "off"
    k: int = 4  # proposed tokens per step
    ngram_n: int = 3  # n-gram match length (prompt lookup)
    draft_model: str | None = None

    def validate(self) -> "SpecConfig":
        if self.mode not in ("off", "ngram", "draft"):
            raise ConfigError(f"spec must be off, ngram or draft, got {self.mode!r}")
        if not 1 <= self.k <= 16:
            raise ConfigError(f"spec k must be in 1..16, got {self.k}")
        if self.ngram_n < 1:
            raise ConfigError(f"ngram n must be >= 1, got {self.ngram_n}")
        if self.mode == "draft" and not self.draft_model:
            raise ConfigError("spec mode 'draft' needs a draft model (--draft-model)")
        return self


@dataclass(frozen=True)
class EngineConfig:
    model: str = "smollm2-135m-instruct"  # a model card name or a path (GGUF file or HF dir)
    dtype: DType = "float32"
    device: str = "auto"  # auto → cuda if available else cpu
    threads: int | None = None  # torch intra-op threads; None → physical cores
    attention: AttentionBackend = "auto"
    max_model_len: int | None = None  # None → the model's context length
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    spec: SpecConfig = field(default_factory=SpecConfig)
    # build the fast decode-only step once the engine is idle, serving eagerly until it is ready:
    # torch.compile on a helper thread (CPU; minutes cold), CUDA graphs (GPU; seconds). None: only
    # where that is cheap, i.e. CUDA graphs (the console's default). PICOCHAT_COMPILE=0 in the
    # environment turns the default off (the test suite does)
    compile: bool | None = field(default_factory=lambda: os.environ.get("PICOCHAT_COMPILE", "1") != "0")

    def validate(self) -> "EngineConfig":
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.attention not in ("auto", "triton", "sdpa", "reference"):
            raise ConfigError(f"attention must be auto, triton, sdpa or reference, got {self.attention!r}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if self.max_model_len is not None and self.max_model_len < 16:
            raise ConfigError(f"max_model_len must be >= 16, got {self.max_model_len}")
        self.scheduler.validate()
        self.quant.validate()
        self.spec.validate()
        return self

    def replace(self, **changes: Any) -> "EngineConfig":
        return dataclasses.replace(self, **changes).validate()


# ---------------------------------------------------------------------------- user config (TOML)

def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "picochat"


def data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "picochat"


def cache_dir() -> Path:
    base = os.environ.get("PICOCHAT_CACHE_DIR")
    if base:
        return Path(base)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "picochat"


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file and rename, so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_user_config() -> dict[str, Any]:
    path = config_dir() / "config.toml"
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


def save_user_config(values: dict[str, Any]) -> None:
    """Persist flat key = value pairs (str, int, float, bool) in config.toml."""
    lines = []
    for key, value in sorted(values.items()):
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            lines.append(f"{key} = {value!r}")
        else:
            escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'{key} = "{escaped}"')
    atomic_write_text(config_dir() / "config.toml", "\n".join(lines) + "\n")
