"""Every code block of README.md and docs/**/*.md runs.

- ```python blocks of one page run in order in one namespace that starts with ``kvcompress``, ``torch`` and
  the default model as ``model``, ``tokenizer``, ``ids`` / ``input_ids`` (a short prompt) and ``loaded`` (the
  harness's ``LoadedModel``); README.md's blocks run with warnings turned into errors.
- ```bash / ```sh blocks run in a temporary directory with ``bash -e`` (the repository is ``$REPO``).
- ```toml blocks must parse; ```text, ```console output and other blocks are data, not code.
- A block that must not run is marked on the line before its fence, visibly in the page's source:
  ``<!-- docs-test: skip (why) -->``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import tomllib
from conftest import REPO, load_real_model

FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\b(?P<why>[^>]*)-->\s*$")
RUN = {"python", "py", "bash", "sh", "shell", "toml"}


def pages() -> list[Path]:
    """README.md and every page under docs/."""
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def blocks(page: Path) -> list[tuple[int, str, str, str | None]]:
    """(line, language, code, skip reason) of every fenced block."""
    text = page.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        body = "\n".join(row[len(m["indent"]):] for row in m["body"].splitlines())
        out.append((line, m["lang"].lower(), body, skip["why"].strip(" ()") if skip else None))
    return out


def _prelude(page: Path) -> dict:
    """A fresh module (in ``sys.modules``, so dataclasses defined in a block work) with the prelude names."""
    import types

    import torch

    import kvcompress

    loaded = load_real_model()
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    name = "docs_" + re.sub(r"\W", "_", str(page.relative_to(REPO)))
    module = types.ModuleType(name)
    sys.modules[name] = module
    module.__dict__.update(kvcompress=kvcompress, torch=torch, loaded=loaded, model=loaded.model,
                           tokenizer=loaded.tokenizer, ids=ids, input_ids=ids)
    return module.__dict__


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_code_blocks_run(page, tmp_path):
    found = [b for b in blocks(page) if b[1] in RUN]
    if not found:
        pytest.skip(f"{page.relative_to(REPO)} has no code blocks")
    namespace: dict | None = None
    ran = 0
    for line, lang, code, skip in found:
        where = f"{page.relative_to(REPO)}:{line}"
        if skip is not None:
            assert skip, f"{where}: a skip marker must say why"
            continue
        ran += 1
        if lang == "toml":
            tomllib.loads(code)
        elif lang in ("python", "py"):
            namespace = namespace or _prelude(page)
            with warnings.catch_warnings():
                if page.name == "README.md" and page.parent == REPO:
                    warnings.simplefilter("error")
                try:
                    exec(compile(code, where, "exec"), namespace)  # noqa: S102 - running the docs is the point
                except Exception as exc:
                    raise AssertionError(f"{where}: the python block fails: {type(exc).__name__}: {exc}") from exc
        else:
            env = {**os.environ, "REPO": str(REPO), "PYTHON": sys.executable,
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
            res = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], cwd=tmp_path, env=env, text=True,
                                 capture_output=True, timeout=600, check=False)
            assert res.returncode == 0, f"{where}: the shell block fails ({res.returncode}):\n{res.stderr[-3000:]}"
    assert ran or all(b[3] for b in found)


def test_skip_markers_are_sparing():
    found = [(p, b) for p in pages() for b in blocks(p) if b[1] in RUN]
    skipped = [b for _, b in found if b[3] is not None]
    assert found and len(skipped) <= len(found) // 2, "most code blocks must run"
