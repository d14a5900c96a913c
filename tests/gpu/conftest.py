"""Fixtures of the GPU tests (helper modules such as workloads are importable through the
pytest ``pythonpath`` setting in pyproject.toml)."""

import pytest


@pytest.fixture
def make_bindings():
    """``make_bindings(**kw)``: a workloads.BindingsGraph freed (libraries, buffers, streams,
    events, graphs) when the test ends."""
    made = []

    def make(**kw):
        from workloads import BindingsGraph
        wl = BindingsGraph(**kw)
        made.append(wl)
        return wl
    yield make
    for wl in made:
        wl.close()
