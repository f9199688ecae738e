"""Parameter types shared by the commands: every flag is checked where it enters."""
from __future__ import annotations

import click

#: Seeds torch accepts.
SEED = click.IntRange(0, 2**63 - 1)


class FiniteRange(click.FloatRange):
    """A float range that also refuses NaN (which compares false with both bounds)."""

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if value != value:
            self.fail(f"{value} is not a number in the range {self._describe_range()}", param, ctx)
        return value
