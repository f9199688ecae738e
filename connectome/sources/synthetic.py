"""Seeded synthetic olfactory circuit with literature statistics (provenance 'synthetic').

At ``scale = 1`` (defaults):

* 51 glomeruli (the first 51 of glomeruli.csv, with their receptors), one ORN
  per glomerulus (``orn_per_glomerulus``), uniglomerular PNs ``1 + Poisson(1.4)``
  per glomerulus (mean 2.4; Schlegel et al. 2021); ORN_g -> all PNs of g.
* 2000 KCs: 45 % gamma, 15 % alpha'beta', 40 % alpha/beta. Each KC draws
  ``1 + Poisson(2.8)`` PN partners uniformly (mean 3.8 PN partners per KC at
  >= 5 synapses, FlyWire v783), duplicates merged.
* 15 compartments (5 per lobe system), 2-3 MBONs each; each KC contacts MBONs of
  its own lobe system's compartments, on average 3.4 per KC (FlyWire: 2.9).
  MBON transmitters drawn ACh / Glu / GABA with p = 0.52 / 0.25 / 0.23 (FlyWire MBON mix).
* One APL per 2000 KCs: every KC of its block -> APL and APL -> every KC of its block.
* Sparse KC -> KC (Poisson(0.36) partners of the same lobe system); ``n_dn`` DNs, each MBON -> DN with p = 0.5.
* Synapse counts per edge ``5 + Poisson(lambda)`` with the FlyWire per-projection
  means (PN->KC 13.8, KC->MBON 7.4, KC->APL 21.7, APL->KC 17.4, KC->KC 5.7).

``scale`` multiplies every population size (glomeruli stay 51); ``degree_scale``
multiplies the per-KC partner counts (PN->KC, KC->MBON, KC->KC) so that edges can
reach whole-brain numbers. ``scale='whole_brain'`` = scale 64, degree_scale 15:
~141k neurons and ~15M edges (FlyWire v783: 139,255 neurons), for benchmarks.
Fully vectorised numpy; ids are 1..N in layer order.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np

from ..errors import DataError
from ..tables import EdgeTable, NeuronTable, OlfactoryCircuitData
from ._options import check_option_names
from .model import load_glomeruli

OPTIONS = {"seed": 0, "scale": 1.0, "degree_scale": 1.0, "n_glomeruli": 51, "orn_per_glomerulus": 1,
           "n_kc": 2000, "n_dn": 4}
#: What ``dmn-neuro train`` uses when the config names no source options: the ORN and DN
#: layer sizes of the bundled sources' training defaults.
TRAINING_DEFAULTS = {"orn_per_glomerulus": 8, "n_dn": 16}
PRESETS = {"whole_brain": {"scale": 64.0, "degree_scale": 15.0}}
_LOBES = ("KCg", "KCa'b'", "KCab")
_LOBE_FRACTION = (0.45, 0.15, 0.40)
_COMPARTMENTS = (("g1", "g2", "g3", "g4", "g5"), ("a'1", "a'2", "a'3", "b'1", "b'2"), ("a1", "a2", "a3", "b1", "b2"))
_MBON_NT = (("acetylcholine", 1, 0.52), ("glutamate", -1, 0.25), ("gaba", -1, 0.23))


#: Largest sizes the generator accepts (4x the whole-brain preset): beyond them
#: the tables alone would not fit this kind of machine's memory.
MAXIMA = {"scale": 256.0, "degree_scale": 64.0, "n_glomeruli": 51, "orn_per_glomerulus": 1000,
          "n_kc": 1_000_000, "n_dn": 100_000}


def _positive(name, value, integer=False):
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(value) and value > 0
    if integer:
        ok = ok and float(value) == int(value)
    if not ok:
        raise DataError(f"synthetic option {name} must be a positive {'integer' if integer else 'number'}, got {value!r}")
    if value > MAXIMA[name]:
        raise DataError(f"synthetic option {name} must be <= {MAXIMA[name]:g}, got {value!r}")
    return int(value) if integer else float(value)


def _counts(rng, n, mean):
    return (5 + rng.poisson(max(mean - 5.0, 0.0), size=n)).astype(np.int32)


def _dedupe(pre: np.ndarray, post: np.ndarray, n_total: int) -> Tuple[np.ndarray, np.ndarray]:
    key = pre.astype(np.int64) * n_total + post
    key.sort()
    if key.size:
        key = key[np.concatenate(([True], key[1:] != key[:-1]))]
    return (key // n_total).astype(np.int32), (key % n_total).astype(np.int32)


def generate(seed=0, scale=1.0, degree_scale=1.0, n_glomeruli=51, orn_per_glomerulus=1, n_kc=2000, n_dn=4):
    """Neuron and edge tables of the synthetic circuit (see module docstring)."""
    if isinstance(scale, str):
        if scale not in PRESETS:
            raise DataError(f"unknown synthetic scale preset {scale!r}; known: {', '.join(PRESETS)}")
        scale, degree_scale = PRESETS[scale]["scale"], PRESETS[scale]["degree_scale"]
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"synthetic option seed must be a non-negative integer, got {seed!r}")
    scale = _positive("scale", scale)
    degree_scale = _positive("degree_scale", degree_scale)
    n_glom = _positive("n_glomeruli", n_glomeruli, integer=True)
    rows = load_glomeruli()
    if n_glom > len(rows):
        raise DataError(f"synthetic option n_glomeruli must be <= {len(rows)}")
    rng = np.random.default_rng(int(seed))
    orn_per = max(1, int(round(_positive("orn_per_glomerulus", orn_per_glomerulus, True) * scale)))
    n_kc = max(1, int(round(_positive("n_kc", n_kc, True) * scale)))
    n_dn = max(1, int(round(_positive("n_dn", n_dn, True) * scale)))
    if n_kc * degree_scale > 64 * MAXIMA["n_kc"]:
        raise DataError(f"synthetic circuit too large: n_kc x scale x degree_scale = {n_kc * degree_scale:.3g} "
                        f"(at most {64 * MAXIMA['n_kc']:.3g})")
    n_apl = max(1, int(round(n_kc / 2000)))
    gloms = [r[0] for r in rows[:n_glom]]
    receptors = [r[1] for r in rows[:n_glom]]

    # --- populations (index order = layer order) ---
    pn_per_glom = 1 + rng.poisson(1.4 * scale + (scale - 1.0), size=n_glom) if scale != 1.0 else 1 + rng.poisson(1.4, n_glom)
    n_orn = n_glom * orn_per
    n_pn = int(pn_per_glom.sum())
    kc_lobe = rng.choice(3, size=n_kc, p=_LOBE_FRACTION).astype(np.int8)
    mbon_per_comp = rng.integers(2, 4, size=15) if scale == 1.0 else np.maximum(1, rng.poisson(2.3 * scale, size=15))
    n_mbon = int(mbon_per_comp.sum())
    sizes = {"ORN": n_orn, "PN": n_pn, "KC": n_kc, "APL": n_apl, "MBON": n_mbon, "DN": n_dn}
    off, o = {}, 0
    for k, v in sizes.items():
        off[k] = o
        o += v
    n_total = o

    layer = np.concatenate([np.full(v, k) for k, v in sizes.items()])
    orn_glom = np.repeat(np.arange(n_glom), orn_per)
    pn_glom = np.repeat(np.arange(n_glom), pn_per_glom)
    glom_names = np.array(gloms)
    glomerulus = np.concatenate([glom_names[orn_glom], glom_names[pn_glom], np.full(n_total - n_orn - n_pn, "")])
    receptor = np.concatenate([np.array(receptors)[orn_glom], np.full(n_total - n_orn, "")])
    comp_of_mbon = np.repeat(np.arange(15), mbon_per_comp)
    comp_names = np.array([c for lobe in _COMPARTMENTS for c in lobe])
    nt_choice = rng.choice(3, size=15, p=[p for _, _, p in _MBON_NT])  # one transmitter per compartment
    mbon_nt = nt_choice[comp_of_mbon]
    cell_type = np.concatenate([
        np.char.add("ORN_", glom_names[orn_glom]), np.char.add(glom_names[pn_glom], "_PN"),
        np.array(_LOBES)[kc_lobe], np.full(n_apl, "APL"),
        np.char.add("MBON_", comp_names[comp_of_mbon]), np.full(n_dn, "DN")])
    transmitter = np.full(n_total, "acetylcholine", dtype="<U13")
    transmitter[off["APL"]:off["APL"] + n_apl] = "gaba"
    transmitter[off["MBON"]:off["MBON"] + n_mbon] = np.array([t for t, _, _ in _MBON_NT])[mbon_nt]
    sign = np.ones(n_total, np.int8)
    sign[off["APL"]:off["APL"] + n_apl] = -1
    sign[off["MBON"]:off["MBON"] + n_mbon] = np.array([s for _, s, _ in _MBON_NT], np.int8)[mbon_nt]

    pre_parts, post_parts, cnt_parts, prov = [], [], [], {}

    def add(pre, post, mean, pair):
        pre, post = _dedupe(pre, post, n_total)
        pre_parts.append(pre)
        post_parts.append(post)
        cnt_parts.append(_counts(rng, pre.size, mean))
        prov[pair] = "synthetic"

    # ORN_g -> every PN of g
    pn_start = np.concatenate([[0], np.cumsum(pn_per_glom)[:-1]])
    reps = pn_per_glom[orn_glom]
    orn_idx = np.repeat(np.arange(n_orn), reps)
    within = np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps)
    add(off["ORN"] + orn_idx, off["PN"] + pn_start[orn_glom[orn_idx]] + within, 30.0, ("ORN", "PN"))
    # PN -> KC
    k = ((1 + rng.poisson(2.8, size=n_kc)) * degree_scale).round().astype(np.int64)
    kc_rep = np.repeat(np.arange(n_kc), k)
    add(off["PN"] + rng.integers(0, n_pn, kc_rep.size), off["KC"] + kc_rep, 13.8, ("PN", "KC"))
    # KC -> MBON within the KC's lobe system
    comp_start = np.concatenate([[0], np.cumsum(mbon_per_comp)[:-1]])
    d = rng.poisson(3.4 * degree_scale, size=n_kc)
    kc_rep = np.repeat(np.arange(n_kc), d)
    comp = kc_lobe[kc_rep].astype(np.int64) * 5 + rng.integers(0, 5, kc_rep.size)
    mb = comp_start[comp] + (rng.random(kc_rep.size) * mbon_per_comp[comp]).astype(np.int64)
    add(off["KC"] + kc_rep, off["MBON"] + mb, 7.4, ("KC", "MBON"))
    # KC <-> APL (block structure)
    kc_all = np.arange(n_kc)
    apl_of_kc = kc_all * n_apl // n_kc
    add(off["KC"] + kc_all, off["APL"] + apl_of_kc, 21.7, ("KC", "APL"))
    add(off["APL"] + apl_of_kc, off["KC"] + kc_all, 17.4, ("APL", "KC"))
    # KC -> KC within lobe system
    d = rng.poisson(0.36 * degree_scale, size=n_kc)
    kc_rep = np.repeat(kc_all, d)
    order = np.argsort(kc_lobe, kind="stable")
    lobe_start = np.searchsorted(kc_lobe[order], np.arange(3))
    lobe_n = np.bincount(kc_lobe, minlength=3)
    lb = kc_lobe[kc_rep]
    tgt = order[lobe_start[lb] + (rng.random(kc_rep.size) * lobe_n[lb]).astype(np.int64)]
    keep = tgt != kc_rep
    add(off["KC"] + kc_rep[keep], off["KC"] + tgt[keep], 5.7, ("KC", "KC"))
    # MBON -> DN
    m_rep, dn = np.nonzero(rng.random((n_mbon, n_dn)) < 0.5) if n_mbon * n_dn < 50_000_000 else (None, None)
    add(off["MBON"] + m_rep, off["DN"] + dn, 10.0, ("MBON", "DN"))

    ids = np.arange(1, n_total + 1, dtype=np.int64)
    neurons = NeuronTable(id=ids, layer=layer, sign=sign, cell_type=cell_type, transmitter=transmitter,
                          glomerulus=glomerulus, receptor=receptor)
    pre = np.concatenate(pre_parts).astype(np.int64)
    del pre_parts
    pre += 1
    post = np.concatenate(post_parts).astype(np.int64)
    del post_parts
    post += 1
    edges = EdgeTable(pre, post, np.concatenate(cnt_parts))
    return neurons, edges, prov, {"seed": int(seed), "scale": scale, "degree_scale": degree_scale}


def load_synthetic(layers: Sequence[str], **options) -> OlfactoryCircuitData:
    check_option_names("synthetic", options, OPTIONS)
    if "DAN" in layers:
        raise DataError("source synthetic has no DAN layer; valid here: ORN, PN, KC, APL, MBON, DN")
    neurons, edges, prov, meta = generate(**options)
    return OlfactoryCircuitData(neurons, edges, layers, prov, source="synthetic", version="synthetic-1",
                                default_provenance="synthetic", metadata=meta)


if __name__ == "__main__":  # timing snippet for the whole-brain-sized circuit (not a test)
    import resource
    import time

    t0 = time.perf_counter()
    n, e, _, _ = generate(seed=0, scale="whole_brain")
    t1 = time.perf_counter()
    data = OlfactoryCircuitData(n, e, ("ORN", "PN", "KC", "APL", "MBON", "DN"), {}, "synthetic", "synthetic-1",
                                "synthetic")
    t2 = time.perf_counter()
    print(f"generate: {t1 - t0:.2f} s, circuit object: {t2 - t1:.2f} s; neurons {len(n):,}, edges {len(e):,}, "
          f"synapses {data.total_synapses:,}; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
