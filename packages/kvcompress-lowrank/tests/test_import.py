"""Registering the plugin imports neither torch nor transformers (`kvcompress list` stays fast)."""

from __future__ import annotations

import subprocess
import sys


def test_plugin_module_is_light():
    """Import, registration and spec validation of lowrank alone (the other installed plugins left out: each
    package tests its own import)."""
    code = (
        "import sys, kvcompress, kvcompress.plugins as p; "
        "eps = p._entry_points; p._entry_points = lambda: [e for e in eps() if e.name in ('builtins', "
        "'lowrank')]; kvcompress.validate_spec('lowrank(k_rank=8,coeff_bits=None)'); "
        "kvcompress.list_policies(); "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_registered_as_a_representation():
    import kvcompress

    info = {p.name: p for p in kvcompress.list_policies()}["lowrank"]
    assert (info.kind, info.distribution) == ("representation", "kvcompress-lowrank")
    assert info.params["energy"] == 0.99 and info.params["coeff_bits"] == 4
