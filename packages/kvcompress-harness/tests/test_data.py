"""Data sources: shipped excerpt, local files, the offline fallback."""

from __future__ import annotations

import pytest

from kvcompress_harness import data
from kvcompress_harness.errors import DataError


def test_excerpt_is_a_prefix_of_wikitext_test(wikitext_file):
    full = data.read_file(wikitext_file).text
    shipped = data.excerpt().text
    assert len(shipped) > 10_000
    assert full.startswith(shipped)
    assert "Creative Commons Attribution-ShareAlike 3.0" in \
        data.package_data("README.md").read_text(encoding="utf-8")


def test_offline_auto_falls_back_and_says_so(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    text = data.load_text("auto")
    assert text.source.endswith("(shipped excerpt)")
    assert "HF_DATASETS_OFFLINE" in text.note
    with pytest.raises(DataError, match="HF_DATASETS_OFFLINE"):
        data.load_text("wikitext")


def test_data_file_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.load_text(data_file=str(tmp_path / "missing.txt"))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00\x81 not utf-8")
    with pytest.raises(DataError, match="cannot read .* as UTF-8"):
        data.load_text(data_file=str(bad))
    with pytest.raises(DataError, match="allowed: auto, wikitext, excerpt"):
        data.load_text("nope")


def test_data_file_normalises_line_endings(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(b"a\r\nb\rc\n")
    assert data.load_text(data_file=str(f)).text == "a\nb\nc\n"
