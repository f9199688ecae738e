"""The ``dmn-neuro`` command line.

The group is thin: it loads configs into dataclasses, lets options override
fields, and is the one error boundary of the program (:meth:`DMNGroup.main`):
every failure -- a bad value, flag, file or path, a corrupt checkpoint, out of
memory, a full disk, Ctrl-C -- ends as one line on stderr and a non-zero exit.
An unexpected exception is one line too, with "run with -vv for details"; the
traceback is printed only with ``-vv``.

Exit codes: 0 success, 1 failure, 2 bad usage (unknown flag or value), 130 interrupted.
"""
from __future__ import annotations

import errno
import logging
import sys
import traceback
from typing import Optional

import click

from connectome.atomic import describe_os_error
from dmn_neuro.errors import DMNError

logger = logging.getLogger("dmn_neuro")

EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def error_line(exc: BaseException, verbose: bool = False) -> "tuple[str, int]":
    """The one line (without ``Error: ``) and the exit code for ``exc``."""
    if isinstance(exc, click.UsageError):
        ctx = exc.ctx
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        return _one_line(exc.format_message()) + hint, EXIT_USAGE
    if isinstance(exc, click.ClickException):
        return _one_line(exc.format_message()), exc.exit_code or EXIT_FAILURE
    if isinstance(exc, (KeyboardInterrupt, click.Abort)):
        return "interrupted", EXIT_INTERRUPTED
    if isinstance(exc, DMNError):
        return _one_line(exc), EXIT_FAILURE
    if isinstance(exc, MemoryError):
        return "out of memory (reduce --batch-size, --steps or the circuit size)", EXIT_FAILURE
    if isinstance(exc, FileNotFoundError):
        return f"file not found: {exc.filename or _one_line(exc)}", EXIT_FAILURE
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM,
                                                   errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.EEXIST):
        return describe_os_error(exc, str(exc.filename or "output")), EXIT_FAILURE
    if isinstance(exc, OSError):
        return f"{exc.strerror or type(exc).__name__}: {exc.filename or _one_line(exc)}", EXIT_FAILURE
    where = "" if verbose else " (run with -vv for details)"
    return f"internal error: {type(exc).__name__}: {_one_line(exc).split(' Traceback')[0][:300]}{where}", EXIT_FAILURE


def _verbosity(args) -> int:
    """How many -v the group got (its options come before the command name)."""
    n, skip = 0, False
    for a in args:
        a = str(a)
        if skip:
            skip = False
        elif a == "--threads":
            skip = True
        elif a == "--verbose":
            n += 1
        elif a.startswith("-v") and set(a[1:]) == {"v"}:
            n += len(a) - 1
        elif not a.startswith("-"):
            break
    return n


class DMNGroup(click.Group):
    """Click group whose ``main`` is the program's one error boundary."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                              **extra)
        except SystemExit:
            raise
        except BaseException as exc:  # noqa: BLE001 - this is the boundary
            verbose = _verbosity(sys.argv[1:] if args is None else args) >= 2
            if verbose and not isinstance(exc, (click.ClickException, click.Abort, KeyboardInterrupt)):
                traceback.print_exc(file=sys.stderr)
            line, code = error_line(exc, verbose)
            click.echo(f"Error: {line}", err=True)
            sys.exit(code)
        sys.exit(rv if isinstance(rv, int) else 0)


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
    from dmn_neuro.cli.analyze import analyze

    cli.add_command(analyze)
    from dmn_neuro.cli.experiment import experiment

    cli.add_command(experiment)
    from dmn_neuro.cli.embody import embody

    cli.add_command(embody)


_register()


def main(argv: Optional[list] = None) -> None:
    cli.main(args=argv, prog_name="dmn-neuro")


if __name__ == "__main__":  # pragma: no cover
    main()
