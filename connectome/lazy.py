"""Lazy package exports (PEP 562), shared by every package of the project.

A package lists its public names and the module each lives in; importing the
package stays cheap and side-effect free, and a name is imported on first use.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, List, Mapping, Tuple


def lazy_exports(package: str, table: Mapping[str, str]) -> Tuple[Callable[[str], object], Callable[[], List[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` serving ``{name: module}`` lazily."""
    exports: Dict[str, str] = dict(table)

    def __getattr__(name: str) -> object:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> List[str]:
        return sorted(exports)

    return __getattr__, __dir__
