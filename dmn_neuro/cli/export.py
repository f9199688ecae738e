"""``dmn-neuro export`` and ``dmn-neuro verify``.

``verify`` drives the trained PyTorch circuit (float64, reference snnTorch
path) and the exported model with the same ORN input built from real Hallem &
Carlson odor responses, compares the spikes of every population, and exits 0
only within the target's tolerance (:data:`exporters.verify.TOLERANCES`).
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, Optional, Sequence

import click
import numpy as np

from dmn_neuro.errors import ConfigError

logger = logging.getLogger(__name__)

FORMATS = ("nir", "lava")
#: Loihi 2 synaptic weights have at most 8 bits; mixed-sign weights need at least 2.
WEIGHT_BITS = click.IntRange(2, 8)
#: Longest verification run (the reference and the Lava worker hold every spike in memory).
MAX_VERIFY_STEPS = 200_000
TARGETS = ("nir", "lava", "lava-fixed")
def _load(checkpoint):
    from dmn_neuro.training.checkpoint import load_circuit
    from dmn_neuro.training.config import TrainingConfig

    circuit, ck = load_circuit(checkpoint)
    cfg = TrainingConfig.from_dict(ck["meta"]["config"]).replace(device="cpu")
    return circuit, cfg, ck


@click.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--format", "fmt", required=True, type=click.Choice(FORMATS), help="nir: one .nir file; lava: a Lava process-graph directory.")
@click.option("-o", "--out", "out", required=True, type=click.Path(), help="Output file (nir) or directory (lava).")
@click.option("--fixed-point", is_flag=True, help="lava: quantise to Loihi 2 fixed point (8-bit weights, 12-bit decays) and write netx HDF5.")
@click.option("--weight-bits", type=WEIGHT_BITS, default=8, show_default=True, help="Synaptic weight bits of the fixed-point export (Loihi 2: 2..8).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object describing what was written.")
def export(checkpoint, fmt, out, fixed_point, weight_bits, as_json):
    """Export a trained circuit to NIR or to a Lava process graph."""
    circuit, cfg, ck = _load(checkpoint)
    spec = circuit.to_spec(metadata={"checkpoint": str(checkpoint), "episode": ck["meta"].get("episode")})
    if fmt == "nir":
        if fixed_point:
            raise ConfigError("--fixed-point applies to --format lava only")
        from exporters.nir_export import export_nir

        path = export_nir(spec, out)
        info = {"format": "nir", "path": str(path), "populations": spec.population_names,
                "dt_s": spec.semantics.dt_s}
    else:
        from exporters.lava_export import export_lava

        res = export_lava(spec, out, fixed_point=fixed_point, **({"weight_bits": weight_bits} if fixed_point else {}))
        info = {"format": "lava-fixed" if fixed_point else "lava", "path": str(res["graph_dir"]),
                "files": [str(f) for f in res["files"]]}
        if fixed_point:
            info["quantisation"] = res["quantisation"]
    if as_json:
        click.echo(json.dumps(info, default=str))
    else:
        click.echo(f"wrote {info['format']} export to {info['path']}")
        if "quantisation" in info:
            click.echo(json.dumps(info["quantisation"], indent=1, default=str))


@click.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--target", required=True, type=click.Choice(TARGETS))
@click.option("--steps", type=click.IntRange(1, MAX_VERIFY_STEPS), default=1000, show_default=True, help="Open-loop steps compared (>= 1000 to pass).")
@click.option("--odors", default=None, help="Comma-separated Hallem odors (default: the trained odors plus others).")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True, help="Seed of the Poisson ORN input.")
@click.option("--closed-loop-episodes", type=click.IntRange(0, 10_000), default=50, show_default=True, help="lava-fixed: held-out episodes for the navigation gate.")
@click.option("--export-dir", type=click.Path(file_okay=False), default=None, help="Keep the exported model here (default: a temporary directory).")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), default=None, help="Write verification.json and verification.png here.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def verify(checkpoint, target, steps, odors, seed, closed_loop_episodes, export_dir, report_dir, as_json):
    """Run the export in its target simulator and compare spikes with the trained model (exit 0 = pass)."""
    from dmn_neuro.analysis.recording import (VERIFY_CONCENTRATIONS, closed_loop_success, default_odors,
                                              run_open_loop, verification_input)

    from exporters.verify import run_target, tolerance_for, verify_spikes

    circuit, cfg, ck = _load(checkpoint)
    odor_list = default_odors(cfg) if odors is None else [o.strip() for o in odors.split(",") if o.strip()]
    if not odor_list:
        raise ConfigError(f"--odors names no odor (got {odors!r}); give comma-separated Hallem & Carlson odor names")
    x = verification_input(circuit, cfg, odor_list, steps, seed)
    spec = circuit.to_spec(metadata={"checkpoint": str(checkpoint)})
    reference = run_open_loop(circuit, x)
    tmp = None
    workdir = Path(export_dir) if export_dir else Path(tempfile.mkdtemp(prefix="dmn-neuro-verify-"))
    tmp = None if export_dir else workdir
    closed: Dict[str, object] = {"odors": odor_list, "concentrations": list(VERIFY_CONCENTRATIONS), "seed": seed}
    tol = tolerance_for(target)
    try:
        candidate, info = run_target(spec, x, target, workdir)
        if target == "lava-fixed":
            from dmn_neuro.simulation.fixed_point import FixedPointStepper

            closed["quantisation"] = info["quantisation"]
            if closed_loop_episodes > 0:
                ref_rate = closed_loop_success(circuit, cfg, None, closed_loop_episodes)
                fx_rate = closed_loop_success(circuit, cfg, FixedPointStepper(info["fixed_point_spec"]),
                                              closed_loop_episodes)
                tol = tol.with_navigation(ref_rate, fx_rate)
                closed["closed_loop_episodes"] = closed_loop_episodes
        result = verify_spikes(reference, candidate, target, lag=0, tolerance=tol,
                               populations=spec.population_names, extra=closed)
        if report_dir:
            from exporters.report import write_report

            write_report(result, reference, candidate, Path(report_dir))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if as_json:
        click.echo(result.to_json())
    else:
        from exporters.report import format_table

        click.echo(format_table(result))
    if not result.passed:
        sys.exit(1)
