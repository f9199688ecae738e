"""Write a fixed-point circuit as lava-dl's netx HDF5 file (the Loihi deployment format).

Layout (what ``lava.lib.dl.netx.hdf5.Network`` reads)::

    layer/<i>/type        b'dense'
    layer/<i>/shape       [n_out]
    layer/<i>/inFeatures, outFeatures
    layer/<i>/weight      int [n_out, n_in]  (effective 8-bit weights; weight_exp 0)
    layer/<i>/bias        int [n_out]        (netx uses it as bias_mant with bias_exp 6)
    layer/<i>/neuron/{type b'CUBA', iDecay, vDecay, vThMant, refDelay, gradedSpike}

netx builds a *sequential* network, so only the feed-forward chain from the
input population to the output population (shortest path, e.g. ORN -> PN ->
KC -> MBON -> DN) is written as ``layer/*``; layer 0 is the input population
behind an identity dense layer fed with the graded (quantised) ORN input.
Projections off that chain -- the recurrent KC -> APL -> KC loop -- cannot be
expressed in netx. They are *not dropped silently*: they are stored under
``dmn_neuro/omitted/<k>/{pre, post, weight}`` (netx ignores that group), the
file attribute ``dmn_neuro_omitted`` lists them, and ``dmn_neuro_note`` says
that the netx network equals the Lava graph without them. netx also cannot
set initial membranes: with a nonzero bias, it integrates one bias-only step
more at the start than the Lava graph (``dmn_neuro_note`` says so too).
"""
from __future__ import annotations

import json
import logging
import os
from collections import deque
from pathlib import Path
from typing import Dict, List

import numpy as np

from connectome.atomic import atomic_file
from dmn_neuro.errors import ExportError

from dmn_neuro.simulation.fixed_point import NETX_BIAS_EXP, FixedPointSpec

logger = logging.getLogger(__name__)


def feedforward_chain(fps: FixedPointSpec) -> List[str]:
    """Shortest path of populations from the input to the output population."""
    nxt: Dict[str, List[str]] = {}
    for q in fps.projections:
        nxt.setdefault(q.pre, []).append(q.post)
    prev = {fps.input_population: None}
    todo = deque([fps.input_population])
    while todo:
        cur = todo.popleft()
        for post in nxt.get(cur, []):
            if post not in prev:
                prev[post] = cur
                todo.append(post)
    if fps.output_population not in prev:
        raise ExportError(f"no feed-forward path from {fps.input_population} to {fps.output_population}: cannot write netx")
    chain = [fps.output_population]
    while prev[chain[-1]] is not None:
        chain.append(prev[chain[-1]])
    return chain[::-1]


def _neuron(grp, pop) -> None:
    n = grp.create_group("neuron")
    n.create_dataset("type", data=np.bytes_("CUBA"))
    n.create_dataset("iDecay", data=np.int64(pop.du + 1))  # netx: du = iDecay - 1
    n.create_dataset("vDecay", data=np.int64(pop.dv))
    n.create_dataset("vThMant", data=np.int64(pop.vth))
    n.create_dataset("refDelay", data=np.int64(1))
    n.create_dataset("gradedSpike", data=np.bool_(False))


def write_netx(fps: FixedPointSpec, path: os.PathLike) -> Path:
    """Write ``fps`` as a netx HDF5 file at ``path`` (atomically: temporary file, then rename)."""
    import h5py

    path = Path(path)
    chain = feedforward_chain(fps)
    proj = {(q.pre, q.post): q for q in fps.projections}
    for p in fps.populations:
        if np.any(p.bias_exp < NETX_BIAS_EXP):
            raise ExportError(f"population {p.name}: bias_exp < {NETX_BIAS_EXP} is not expressible in netx")
    for a, b in zip(chain, chain[1:]):
        if proj[(a, b)].weight_exp != 0:
            raise ExportError(f"projection {a}->{b}: weight_exp {proj[(a, b)].weight_exp} is not expressible in netx")
    on_chain = set(zip(chain, chain[1:]))
    omitted = [q for q in fps.projections if (q.pre, q.post) not in on_chain]
    has_bias = any(np.any(p.bias_mant != 0) for p in fps.populations if p.name in chain)
    note = ("netx is feed-forward only: layers are the chain " + " -> ".join(chain)
            + "; projections off the chain (" + (", ".join(q.name for q in omitted) or "none")
            + ") are stored under dmn_neuro/omitted and are NOT part of the netx network, so its spikes equal "
              "the dmn-neuro Lava graph without them.")
    if has_bias:
        note += " netx cannot set initial membranes, so with nonzero bias it integrates one extra bias-only step."
    with atomic_file(path, "w+b") as fh, h5py.File(fh, "w") as f:
        f.attrs["dmn_neuro_note"] = note
        f.attrs["dmn_neuro_chain"] = json.dumps(chain)
        f.attrs["dmn_neuro_omitted"] = json.dumps([q.name for q in omitted])
        f.attrs["dmn_neuro_input_scale_note"] = "input x_int = clip(rint(x * input_scale)); see dmn_neuro/input_scale"
        dm = f.create_group("dmn_neuro")
        dm.create_dataset("input_scale", data=fps.input_scale)
        dm.attrs["input_limit"] = int(fps.input_limit)
        for k, q in enumerate(omitted):
            g = dm.create_group(f"omitted/{k}")
            g.attrs["pre"], g.attrs["post"] = q.pre, q.post
            g.create_dataset("weight", data=q.weight.astype(np.int32))
        layers = f.create_group("layer")
        for i, name in enumerate(chain):
            pop = fps.population(name)
            if i == 0:
                w = np.eye(pop.n, dtype=np.int32)  # graded input -> identity dense
            else:
                w = proj[(chain[i - 1], name)].weight.astype(np.int32)
            g = layers.create_group(str(i))
            g.create_dataset("type", data=np.bytes_("dense"))
            g.create_dataset("shape", data=np.array([pop.n], dtype=np.int64))
            g.create_dataset("inFeatures", data=np.int64(w.shape[1]))
            g.create_dataset("outFeatures", data=np.int64(w.shape[0]))
            g.create_dataset("weight", data=w)
            # effective bias = bias_mant << bias_exp == netx_bias << 6
            bias = np.left_shift(pop.bias_mant.astype(np.int64), pop.bias_exp - NETX_BIAS_EXP)
            if np.any(bias != 0):
                g.create_dataset("bias", data=bias)
            g.attrs["dmn_neuro_population"] = name
            _neuron(g, pop)
    logger.info("wrote netx file %s (chain %s, omitted %s)", path, chain, [q.name for q in omitted])
    return path

