"""Discovery through the entry points: a broken task plugin is reported and skipped."""

from __future__ import annotations

import sys
import textwrap

import kvcompress
import pytest

from kvcompress_harness.errors import UnknownNameError
from kvcompress_harness.runner import RunConfig, resolve_tasks, run


@pytest.fixture
def fake_plugins(tmp_path, monkeypatch):
    """Two fake distributions on sys.path: one fails to import, one's register_tasks raises."""
    for dist, module, body in [
        ("broken_tasks", "broken_tasks_mod", "raise ImportError('deliberately broken for the test')\n"),
        ("raising_tasks", "raising_tasks_mod", textwrap.dedent("""
            import kvcompress

            @kvcompress.hookimpl
            def register_tasks(register):
                raise RuntimeError('task table corrupt')
        """)),
    ]:
        info = tmp_path / f"{dist}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist.replace('_', '-')}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[kvcompress]\n{dist} = {module}\n")
        (tmp_path / f"{module}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    kvcompress.get_registry(refresh=True)
    yield tmp_path
    monkeypatch.undo()
    for module in ("broken_tasks_mod", "raising_tasks_mod"):
        sys.modules.pop(module, None)
    kvcompress.get_registry(refresh=True)


def test_broken_task_plugin_is_reported_and_skipped(fake_plugins, tiny, tmp_path, capsys):
    from kvcompress_harness.cli import main

    reg = kvcompress.get_registry()
    failures = {f.distribution: f.error for f in reg.failures}
    assert "deliberately broken" in failures["broken-tasks"]
    assert "task table corrupt" in failures["raising-tasks"]
    assert "perplexity" in reg.tasks and "window" in reg.policies

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "plugins that failed to load:" in out and "deliberately broken for the test" in out
    assert "task table corrupt" in out and "perplexity" in out

    with pytest.raises(UnknownNameError, match="broken_tasks.*failed to load: ImportError: deliberately broken"):
        resolve_tasks(["broken_tasks"])
    records = run(RunConfig(policies=["window(budget=8)"], tasks=["perplexity"], lengths=[16], chunk=8,
                            out=str(tmp_path / "r.jsonl"), data="excerpt", progress=False), loaded=tiny)
    assert [r["status"] for r in records] == ["ok", "ok"]
