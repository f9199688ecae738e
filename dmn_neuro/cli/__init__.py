"""The ``dmn-neuro`` command line.

The group is thin: it loads configs into dataclasses, lets options override
fields, and turns every :class:`~dmn_neuro.errors.DMNError` into one line on
stderr and a non-zero exit (never a traceback).
"""
from __future__ import annotations

import logging
from typing import Optional

import click

from dmn_neuro.errors import DMNError

logger = logging.getLogger("dmn_neuro")


class DMNGroup(click.Group):
    """Click group that reports user-facing errors as one line."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DMNError as exc:
            raise click.ClickException(str(exc)) from None
        except FileNotFoundError as exc:
            raise click.ClickException(f"file not found: {exc.filename or exc}") from None
        except PermissionError as exc:
            raise click.ClickException(f"permission denied: {exc.filename or exc}") from None
        except KeyboardInterrupt:
            raise click.Abort() from None


@click.group(cls=DMNGroup)
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("--threads", type=click.IntRange(min=1), envvar="DMN_NEURO_THREADS", default=None,
              help="CPU threads for torch (default: torch's choice; 1 is fastest on small shared machines).")
@click.version_option(package_name="dmn-neuro")
def cli(verbose: int, threads: Optional[int]) -> None:
    """dmn-neuro: train connectome-constrained spiking circuits of the fly
    olfactory system and export them to neuromorphic hardware."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if threads:
        import torch

        torch.set_num_threads(threads)


def _register() -> None:
    from dmn_neuro.cli.connectome import connectome
    from dmn_neuro.cli.train import evaluate, run, train

    cli.add_command(connectome)
    cli.add_command(train)
    cli.add_command(evaluate)
    cli.add_command(run)
    from dmn_neuro.cli.export import export, verify
    from dmn_neuro.cli.quantize import quantize_cmd

    cli.add_command(export)
    cli.add_command(verify)
    cli.add_command(quantize_cmd)


_register()


def main(argv: Optional[list] = None) -> None:
    cli.main(args=argv, prog_name="dmn-neuro")


if __name__ == "__main__":  # pragma: no cover
    main()
