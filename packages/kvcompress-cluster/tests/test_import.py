"""Registering the plugin and building its policy import neither torch nor transformers (`kvcompress list`
stays fast)."""

from __future__ import annotations

import subprocess
import sys


def test_plugin_module_is_light():
    code = ("import sys, kvcompress_cluster.plugin; from kvcompress_cluster import Cluster; "
            "p = Cluster.from_params(budget=128, clusters=8); p.spec(); p.slot_states; p.needs_attention; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
