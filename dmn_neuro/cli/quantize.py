"""``dmn-neuro quantize``: put a checkpoint on the Loihi 2 fixed-point grid (optionally after QAT).

The new checkpoint's float model is what the fixed-point export computes, up
to Loihi's membrane truncation (partly compensated, see :mod:`dmn_neuro.training.qat`),
so ``dmn-neuro verify NEW --target lava-fixed`` compares like with like, and
``--target nir``/``lava`` stay exact.
"""
from __future__ import annotations

import json
import logging

import click

from dmn_neuro.cli.params import FiniteRange

from dmn_neuro.training import qat

logger = logging.getLogger(__name__)


#: Compensations in units of the membrane's least significant bit.
LSB = FiniteRange(0.0, 16.0)


@click.command("quantize")
@click.argument("checkpoint", type=click.Path())
@click.option("-o", "--out", "out", required=True, type=click.Path(), help="The new checkpoint: a directory, or one file if the path ends in .pt.")
@click.option("--finetune-episodes", type=click.IntRange(0, 1_000_000), default=0, show_default=True,
              help="Quantisation-aware fine-tuning episodes (straight-through estimator) before snapping.")
@click.option("--weight-bits", type=click.IntRange(2, 8), default=8, show_default=True, help="As for `export --fixed-point`.")
@click.option("--truncation-bias-lsb", type=LSB, default=qat.TRUNCATION_BIAS_LSB, show_default=True)
@click.option("--threshold-margin-lsb", type=LSB, default=qat.THRESHOLD_MARGIN_LSB, show_default=True)
@click.option("--leak-lsb", type=LSB, default=qat.LEAK_LSB, show_default=True)
@click.option("--clip-weights", "clip_weights", type=FiniteRange(0.0, 1e6, min_open=True), default=None,
              metavar="THRESHOLDS", help="First clip every weight to at most this many postsynaptic thresholds "
              "(a few huge weights coarsen the grid of a population's other inputs; above 254 Loihi cannot hold "
              "them). Default: no clipping.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def quantize_cmd(checkpoint, out, finetune_episodes, weight_bits, truncation_bias_lsb, threshold_margin_lsb,
                 leak_lsb, clip_weights, as_json):
    """Snap a checkpoint onto the Loihi 2 fixed-point grid and save it as a new checkpoint."""
    snap_options = {"truncation_bias_lsb": truncation_bias_lsb, "threshold_margin_lsb": threshold_margin_lsb,
                    "leak_lsb": leak_lsb}
    progress = None if as_json else (lambda r: click.echo(f"qat episode {r['episode']}: loss {r['total']:.4f}"))
    rep = qat.quantize_checkpoint(checkpoint, out, finetune_episodes, weight_bits, snap_options, progress,
                                  clip_weight_thresholds=clip_weights)
    if as_json:
        click.echo(json.dumps(rep, default=float))
        return
    click.echo(f"wrote {rep['checkpoint']} (snapped to the fixed-point grid, {rep['snap']['rounds']} round(s))")
    click.echo(f"{'population':<12}{'vth':>7}{'dv':>6}{'decay err':>12}{'bias err':>12}{'beta delta':>13}")
    for name, p in rep["quantisation_before"]["populations"].items():
        s = rep["snap"]["populations"][name]
        click.echo(f"{name:<12}{s['vth']:>7}{s['dv']:>6}{p['decay_error']:>12.2e}{p['bias_error_max']:>12.2e}"
                   f"{s['beta_delta']:>13.2e}")
    click.echo(f"{'projection':<12}{'rel err':>10}{'max err':>10}{'zeroed':>8}{'max delta':>12}")
    for name, q in rep["quantisation_before"]["projections"].items():
        s = rep["snap"]["projections"][name]
        click.echo(f"{name:<12}{q['rel_weight_error']:>10.2e}{q['max_abs_weight_error']:>10.2e}"
                   f"{s['became_zero']:>8}{s['max_abs_delta_thresholds']:>12.2e}")
