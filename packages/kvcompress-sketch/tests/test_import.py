"""Registering the plugin imports neither torch nor transformers (`kvcompress list` stays fast)."""

from __future__ import annotations

import subprocess
import sys


def test_plugin_module_is_light():
    code = ("import sys, kvcompress_sketch.plugin; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
