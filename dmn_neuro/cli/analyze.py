"""``dmn-neuro analyze``: learned vs connectome, KC coding, MBON readout, lesions and manifolds of a checkpoint."""
from __future__ import annotations

import json
import sys

import click

from dmn_neuro.cli.params import SEED


@click.command()
@click.argument("checkpoint", type=click.Path())
@click.option("--episodes", type=click.IntRange(0, 100_000), default=25, show_default=True,
              help="Held-out episodes per lesion condition (0: no lesions, no trajectory manifold).")
@click.option("--steps", type=click.IntRange(1, 1_000_000), default=None,
              help="Episode length of the lesion evaluations (default: the checkpoint's training length).")
@click.option("--odor-steps", type=click.IntRange(1, 100_000), default=250, show_default=True,
              help="Steps of each open-loop odor presentation (KC coding, odor manifold).")
@click.option("--odors", default=None,
              help="Comma-separated Hallem & Carlson odors (default: every odor the encoder knows).")
@click.option("--seed", type=SEED, default=12345, show_default=True, help="Seed of the held-out episodes and odor input.")
@click.option("--no-lesions", is_flag=True, help="Skip the lesion evaluations (the trajectory manifold still runs).")
@click.option("--no-umap", is_flag=True, help="PCA only, even when umap-learn is installed.")
@click.option("--no-figures", is_flag=True, help="JSON and .npz only.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Where to write analysis.json, kc_coding.npz and figures (default CHECKPOINT_analysis).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as one JSON object.")
def analyze(checkpoint, episodes, steps, odor_steps, odors, seed, no_lesions, no_umap, no_figures, out_dir, as_json):
    """What a trained checkpoint learned: weights vs synapse counts, KC odor coding,
    MBON->DN readout, lesions without retraining, activity manifolds."""
    from tqdm import tqdm

    from dmn_neuro.analysis.analyze import analyze_checkpoint
    from dmn_neuro.errors import ConfigError

    odor_list = None
    if odors is not None:
        odor_list = [o.strip() for o in odors.split(",") if o.strip()]
        if not odor_list:
            raise ConfigError(f"--odors {odors!r} names no odor")
    bar = []

    def progress(label, total):
        if not bar:
            bar.append(tqdm(total=total, desc="analyze", file=sys.stderr, unit="step", disable=as_json))
        bar[0].set_postfix_str(label[:30])
        bar[0].update(1)

    try:
        res = analyze_checkpoint(checkpoint, out_dir, episodes=episodes, steps=steps, odor_steps=odor_steps,
                                 odors=odor_list, seed=seed, lesions=not no_lesions, use_umap=not no_umap,
                                 figures=not no_figures, progress=progress)
    finally:
        if bar:
            bar[0].close()
    if as_json:
        click.echo(json.dumps(res))
        return
    click.echo(f"wrote {res['out_dir']}/analysis.json")
    click.echo(json.dumps(res["headline"], indent=1))
