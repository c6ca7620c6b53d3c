"""pbt-operator: Population Based Training and PB2, on Kubernetes or on one machine.

From Python (a script, a notebook): `pbt_operator.run(manifest, function=...)` trains a population on
this machine as `pbt run` does and returns a `RunResult` (local/session.py; docs/python.md). They are
imported on first use, so `import pbt_operator` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .local.runner import RunError
    from .local.session import RunResult, run

__version__ = "0.1.0"

__all__ = ["RunError", "RunResult", "__version__", "run"]

_LAZY = {"run": "session", "RunResult": "session", "RunError": "runner"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".local.{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
