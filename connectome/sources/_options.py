"""One check of option names, shared by the registry and every loader."""
from __future__ import annotations

from typing import Iterable, Mapping

from ..errors import DataError


def check_option_names(source: str, options: Mapping, accepted: Iterable[str]) -> None:
    """Raise a one-line DataError naming the first option ``source`` does not accept, and the accepted ones."""
    accepted = sorted(accepted)
    bad = sorted(str(k) for k in set(options) - set(accepted))
    if bad:
        raise DataError(f"source {source}: unknown option {bad[0]!r}; accepted: {', '.join(accepted) or 'none'}")
