"""Entry-point discovery through fake installed distributions; broken plugins are isolated."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

import kvcompress
from kvcompress.plugins import get_registry

GOOD = '''
from dataclasses import dataclass
from typing import ClassVar
import kvcompress

@dataclass
class Oldest(kvcompress.SelectionPolicy):
    """Keeps the oldest tokens (a test plugin)."""
    name: ClassVar[str] = "{name}"
    def score(self, ctx):
        return -ctx.positions.float()

@kvcompress.hookimpl
def register_policies(register):
    register(Oldest)

@kvcompress.hookimpl
def register_tasks(register):
    register(len, name="{name}-task", description="a task object")
'''


def _fake_dist(root: Path, dist: str, module: str, source: str) -> None:
    """Install a distribution by hand: a module plus a ``.dist-info`` with its entry points."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[kvcompress]\n{module} = {module}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    monkeypatch.undo()
    for name in list(sys.modules):
        if name.startswith("kvc_fake_"):
            del sys.modules[name]
    get_registry(refresh=True)


def test_plugin_discovered_and_broken_plugin_isolated(site):
    _fake_dist(site, "kvc-fake-good", "kvc_fake_good", GOOD.format(name="oldest"))
    _fake_dist(site, "kvc-fake-broken", "kvc_fake_broken", "raise ImportError('needs libfoo')\n")
    reg = get_registry(refresh=True)
    assert reg.policies["oldest"].distribution == "kvc-fake-good"
    assert reg.policies["oldest"].version == "1.2.3"
    assert reg.policies["oldest"].description == "Keeps the oldest tokens (a test plugin)."
    assert reg.tasks["oldest-task"].obj is len
    assert reg.policies["sink"].distribution == "kvcompress"  # built-ins still there
    failure = [f for f in reg.failures if f.distribution == "kvc-fake-broken"]
    assert failure and "needs libfoo" in failure[0].error and failure[0].plugin == "kvc_fake_broken"
    names = [p.name for p in kvcompress.list_policies()]
    assert "oldest" in names and "window" in names
    cache = kvcompress.make_cache("oldest(budget=4)")
    assert cache.selection.name == "oldest"
    with pytest.raises(kvcompress.PolicyUnavailableError, match="needs libfoo"):
        kvcompress.make_cache("kvc_fake_broken")


def test_name_clash_names_both_distributions(site):
    _fake_dist(site, "kvc-fake-one", "kvc_fake_one", GOOD.format(name="twin"))
    _fake_dist(site, "kvc-fake-two", "kvc_fake_two", GOOD.format(name="twin"))
    with pytest.raises(kvcompress.RegistrationConflictError) as info:
        get_registry(refresh=True)
    assert "kvc-fake-one" in str(info.value) and "kvc-fake-two" in str(info.value)


def test_hook_that_raises_is_reported(site):
    _fake_dist(site, "kvc-fake-raiser", "kvc_fake_raiser", '''
import kvcompress
@kvcompress.hookimpl
def register_policies(register):
    raise RuntimeError("boom")
''')
    reg = get_registry(refresh=True)
    assert any("boom" in f.error and f.distribution == "kvc-fake-raiser" for f in reg.failures)
    assert "sink" in reg.policies


def test_unknown_policy_lists_known_and_failures(site):
    _fake_dist(site, "kvc-fake-broken2", "kvc_fake_broken2", "import not_a_module_xyz\n")
    get_registry(refresh=True)
    with pytest.raises(kvcompress.UnknownPolicyError) as info:
        kvcompress.make_cache("nosuch")
    assert "known policies" in str(info.value) and "not_a_module_xyz" in str(info.value)
