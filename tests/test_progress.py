"""Progress lines for long saves and loads (cgsnap/_progress.py): shown on a terminal only,
after a second, never in tests or pipes unless asked for (CGSNAP_PROGRESS=1)."""
from __future__ import annotations

import io

import numpy as np

from cgsnap import _progress
from cgsnap.format import fileformat


def test_silent_unless_wanted(monkeypatch):
    monkeypatch.setenv("CGSNAP_PROGRESS", "0")
    out = io.StringIO()
    with _progress.task("saving x", 100, out):
        _progress.advance(100)
    assert out.getvalue() == ""
    monkeypatch.setenv("CGSNAP_PROGRESS", "auto")      # under pytest: never
    with _progress.task("saving x", 100, out):
        _progress.advance(100)
    assert out.getvalue() == ""
    _progress.advance(5)                               # no task: nothing happens


def test_a_line_after_the_first_second(monkeypatch):
    monkeypatch.setenv("CGSNAP_PROGRESS", "1")
    clock = iter([0.0, 0.5, 1.2, 1.25, 2.0, 2.1])       # start, then one reading per advance
    monkeypatch.setattr(_progress.time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    with _progress.task("loading f.cgsnap", 4 << 30, out):
        _progress.advance(1 << 30)                     # at 0.5 s: too early
        assert out.getvalue() == ""
        _progress.advance(1 << 30)                     # at 1.2 s: shown
        _progress.advance(1)                           # at 1.25 s: throttled
        _progress.advance(2 << 30)                     # at 2.0 s
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n")
    assert "cgsnap: loading f.cgsnap: 2.15 GB of 4.29 GB (50%)" in text
    assert "4.29 GB of 4.29 GB (100%)" in text


def test_an_inner_task_is_silent(monkeypatch):
    monkeypatch.setenv("CGSNAP_PROGRESS", "1")
    monkeypatch.setattr(_progress, "SHOW_AFTER", 0.0)
    monkeypatch.setattr(_progress, "_EVERY", 0.0)
    outer, inner = io.StringIO(), io.StringIO()
    with _progress.task("outer", 10, outer):
        with _progress.task("inner", 10, inner):
            _progress.advance(10)
    assert inner.getvalue() == "" and "outer" in outer.getvalue()


def test_a_save_reports_its_bytes(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CGSNAP_PROGRESS", "1")
    monkeypatch.setattr(_progress, "SHOW_AFTER", 0.0)
    monkeypatch.setattr(_progress, "_EVERY", 0.0)
    data = np.arange(1 << 20, dtype=np.uint8)
    fileformat.write_file(tmp_path / "p.cgsnap", {"x": 1}, [data, data[:1000]])
    err = capsys.readouterr().err
    assert "cgsnap: saving p.cgsnap:" in err and "(100%)" in err and err.endswith("\n")
