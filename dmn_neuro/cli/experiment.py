"""``dmn-neuro experiment run`` / ``report``: grids of conditions x seeds and their statistics."""
from __future__ import annotations

import json
import sys

import click


@click.group()
def experiment():
    """Grids of training runs (conditions x seeds) and their statistics."""


@experiment.command("run")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Experiment directory (runs/, results/; locked while running). Rerun the same command to "
                   "finish an interrupted experiment: finished cells are reused.")
@click.option("--workers", type=click.IntRange(1, 4096), default=None,
              help="Local worker processes, one torch thread each (default: the CPU count).")
@click.option("--ray-address", default=None, metavar="ADDR",
              help="Run the cells as Ray tasks on this cluster ('auto' or a head address; needs dmn-neuro[cluster]).")
def run_cmd(file, out_dir, workers, ray_address):
    """Train and evaluate every cell of the experiment FILE (YAML; see dmn_neuro.experiments.spec)."""
    import os

    from tqdm import tqdm

    from dmn_neuro.experiments.grid import run_experiment
    from dmn_neuro.experiments.spec import load_spec

    spec = load_spec(file)
    bar = []

    def progress(event, info):
        if event == "start":
            bar.append(tqdm(total=info["total"], initial=info["done"], desc="experiment", unit="cell", file=sys.stderr))
            if info["done"]:
                click.echo(f"reusing {info['done']} finished cells; running {len(info['todo'])}", err=True)
        elif bar:
            bar[0].update(1)
            bar[0].set_postfix_str(f"{info['key']}{'' if info['ok'] else ' FAILED'}"[:40])

    try:
        res = run_experiment(spec, out_dir, workers=workers or os.cpu_count() or 1, ray_address=ray_address,
                             progress=progress)
    finally:
        if bar:
            bar[0].close()
    click.echo(json.dumps(res))


@experiment.command("report")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--no-figures", is_flag=True, help="report.json and report.md only.")
def report_cmd(directory, as_json, no_figures):
    """Per-condition statistics over seeds, pairwise tests and learning curves of an experiment DIRECTORY."""
    from dmn_neuro.experiments.report import write_report

    rep = write_report(directory, figures=not no_figures)
    if as_json:
        click.echo(json.dumps(rep))
    else:
        click.echo(f"wrote {directory}/report.md, report.json{'' if no_figures else ' and figures'}")
