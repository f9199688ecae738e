"""``dmn-neuro connectome``: inspect and export the olfactory connectome.

Commands:
    info          layers, neuron counts and per-projection edges, synapses, density,
                  sign balance and provenance (``--json``: exactly one JSON object)
    export-table  write neurons.csv and edges.csv of the selected circuit

Every :class:`~dmn_neuro.errors.DMNError` becomes one line ``Error: ...`` and exit
status 1 (the group class does it, so it holds standalone and when registered
under the top-level ``dmn-neuro`` group).
"""
from __future__ import annotations

import json

import click

from connectome.errors import DMNError

DEFAULT_INFO_LAYERS = "ORN,PN,KC,APL,MBON,DN"


class DMNErrorGroup(click.Group):
    """A click group that turns DMNError into ``click.ClickException`` (one line, exit 1)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DMNError as exc:
            raise click.ClickException(str(exc)) from None


def _parse_options(items):
    import yaml

    out = {}
    for item in items:
        if "=" not in item:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--option")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError:
            out[k.strip()] = v
    return out


def _load(source, layers, no_cache, cache_dir, options):
    from connectome.fetch_data import FlyWireConnectome
    from connectome.tables import check_layers

    layer_list = check_layers(layers)
    fetcher = FlyWireConnectome(use_cache=not no_cache, cache_dir=cache_dir)
    return fetcher.fetch_olfactory_circuit(include_layers=list(layer_list), source=source,
                                           **_parse_options(options))


_common = [
    click.option("--source", default="flywire_v783_mb", show_default=True,
                 help="flywire_v783_mb | hemibrain_v1.2.1_mb | codex:DIR | cave | synthetic"),
    click.option("--layers", default=DEFAULT_INFO_LAYERS, show_default=True,
                 help="comma-separated layers (ORN, PN, KC, APL, MBON, DN, DAN)"),
    click.option("--no-cache", is_flag=True, help="bypass the on-disk cache"),
    click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                 help="cache root (default $DMN_NEURO_CACHE or ~/.cache/dmn-neuro)"),
    click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
                 help="source option, e.g. n_dn=8, orn_per_glomerulus=2, seed=1, scale=2"),
]


def common_options(f):
    for dec in reversed(_common):
        f = dec(f)
    return f


@click.group("connectome", cls=DMNErrorGroup)
def connectome():
    """Inspect and export the fly olfactory connectome."""


@connectome.command("info")
@common_options
@click.option("--json", "as_json", is_flag=True, help="print exactly one JSON object")
def info(source, layers, no_cache, cache_dir, options, as_json):
    """Print layers, neuron counts and projections with their provenance."""
    data = _load(source, layers, no_cache, cache_dir, options)
    if as_json:
        click.echo(json.dumps(data.summary()))
        return
    model_layers = set(data.metadata.get("model_layers", []))
    click.echo(f"source: {data.source}  version: {data.version}")
    click.echo("layers:")
    for name, n in data.layer_sizes.items():
        tag = "  [MODEL ASSUMPTION: synthesised neurons]" if name in model_layers else ""
        click.echo(f"  {name:<5} {n:>7,d}{tag}")
    click.echo("projections:")
    click.echo(f"  {'pre -> post':<14} {'edges':>9} {'synapses':>11} {'density':>8} {'exc/inh edges':>15}  provenance")
    any_model = False
    for p in data.projections:
        tag = ""
        if p.provenance == "model":
            tag, any_model = "  [MODEL ASSUMPTION]", True
        click.echo(f"  {p.pre + ' -> ' + p.post:<14} {p.n_edges:>9,d} {p.n_synapses:>11,d} {p.density:>8.4f} "
                   f"{str(p.n_excitatory_edges) + '/' + str(p.n_inhibitory_edges):>15}  {p.provenance}{tag}")
    click.echo(f"total: {sum(data.layer_sizes.values()):,d} neurons, {len(data.edge_table):,d} edges, "
               f"{data.total_synapses:,d} synapses")
    if any_model:
        click.echo("note: [MODEL ASSUMPTION] projections are not measured: ORN_g -> uPNs of glomerulus g and "
                   "all-to-all MBON -> DN with nominal synapse counts (see connectome/sources/model.py); "
                   "use --source codex:DIR or cave for real ORN->PN and MBON->DN edges.")


@connectome.command("export-table")
@common_options
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="directory for neurons.csv and edges.csv")
def export_table(source, layers, no_cache, cache_dir, options, out_dir):
    """Write the selected circuit as neurons.csv and edges.csv (atomically)."""
    data = _load(source, layers, no_cache, cache_dir, options)
    n_path, e_path = data.to_tables(out_dir)
    click.echo(f"wrote {n_path} ({sum(data.layer_sizes.values()):,d} neurons) and {e_path} "
               f"({len(data.edge_table):,d} edges)")
