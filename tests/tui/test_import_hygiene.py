"""The engine and its helpers import without the UI: no textual in sys.modules."""

from __future__ import annotations

import subprocess
import sys

HEADLESS = ["picochat.engine.protocol", "picochat.engine.engine", "picochat.system", "picochat.config"]


def test_engine_imports_without_textual():
    code = ("import sys, " + ", ".join(HEADLESS) + "\n"
            "leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'textual_plotext'))\n"
            "print(leaked)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
