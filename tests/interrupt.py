"""Interrupting a run at a chosen step, as Ctrl-C would, to test that it resumes exactly."""
from __future__ import annotations

from typing import Any, Callable

import pytest


def run_interrupted(monkeypatch, owner: type, method: str, call: int, run: Callable[[], Any]) -> None:
    """Run ``run()`` with ``owner.method`` raising KeyboardInterrupt at its ``call``-th call (1-based);
    the interrupt must reach the caller. The method is restored afterwards."""
    original = getattr(owner, method)
    calls = {"n": 0}

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, method, interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            run()
    finally:
        monkeypatch.setattr(owner, method, original)
