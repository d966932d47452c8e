"""Every Python source of the project compiles without a warning: a user's first run (no bytecode
cached yet) must not print one, e.g. Python 3.12's SyntaxWarning for an invalid escape sequence
(3.11 raises it as a hidden DeprecationWarning, so only this test sees it here)."""

from __future__ import annotations

import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_source_compiles_without_a_warning():
    sources = [p for folder in ("picochat", "kernels", "benchmarks", "scripts", "tests")
               for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(sources) > 50
    noisy = []
    for path in sources:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                compile(path.read_text(), str(path), "exec")
            except (SyntaxWarning, DeprecationWarning) as e:
                noisy.append(f"{path.relative_to(ROOT)}: {e}")
    assert not noisy, noisy
