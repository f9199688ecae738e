"""Sensory input: Hallem & Carlson (2006) receptor responses -> ORN input currents.

Data
----
:func:`load_hallem_carlson` reads the bundled table
``connectome/data/hallem_carlson_2006`` (24 odorant receptors x 110 odors, CC BY-SA
4.0 via DoOR 2.0, see its ``SOURCE.md``): the responses are spikes/s *changes*
from the spontaneous rate at the 10^-2 dilution, and the spontaneous rate of each
receptor's ORN is kept apart (first data row of the file).

Encoding (model assumptions, all documented here)
-------------------------------------------------
* Every ORN neuron of the circuit belongs to one glomerulus (``glomeruli`` in
  ORN-layer order; several ORNs may share one).  A glomerulus gets the response
  of the Hallem receptors that map onto it (``receptors.csv``); a receptor
  mapped to ``"A+B"`` (Or33b: DM5+DM3, co-expressed with Or85a / Or47a) feeds
  both.  Where several receptors feed one glomerulus, their response *changes
  add* (a co-expressing ORN responds to the ligands of both) and their
  spontaneous rates are *averaged*.  Glomeruli without Hallem data fire at
  ``default_spontaneous_hz`` and do not respond to any odor.
* Concentration ``c`` is relative to the Hallem dilution (``c = 1`` is 10^-2)::

      rate = clamp(spontaneous + f(c) * response, min=0)          [Hz]
      f(c) = c                          (linear, default)
      f(c) = c (1 + K) / (c + K)        (Hill, n = 1, if hill_k = K; f(1) = 1)

  so ``c = 0`` gives the spontaneous rate exactly.
* Adaptation (gain control, off unless ``adaptation_tau_ms`` is given): ORNs
  adapt to the mean odor level and report changes relative to it (fold-change
  coding, Nagel & Wilson 2011 *Nat Neurosci* 14:208; Cafaro 2016), and the
  antennal lobe divides by the total input, which in Drosophila comes from both
  antennae (Olsen, Bhandawat & Wilson 2010 *Neuron* 66:287).  Modelled as one
  gain per episode set by the running mean ``a`` of ``f(c)`` over the two
  antennae (exponential, time constant ``adaptation_tau_ms``)::

      rate = clamp(spontaneous + L_a f(c) / (a + K_a) * response, min=0)
      a_0 = mean_antennae f(c_0);  a_{t+1} = d a_t + (1 - d) mean_antennae f(c_t),  d = exp(-dt / tau)

  ``K_a`` = ``adaptation_floor`` (the level below which nothing is amplified:
  no odor gives the spontaneous rate) and ``L_a`` = ``adaptation_level`` the
  response to a steady odor, as a concentration relative to the reference.  At a
  steady level ``c`` the gain is ``L_a f(c) / (f(c) + K_a)``, so static inputs
  (verification, analysis) use that.
  A left/right difference is then seen relative to the mean: a fly that
  compares its antennae does it the same way at every concentration.
* Currents: the ORN LIF integrates ``v <- beta v + I`` (see
  :mod:`dmn_neuro.simulation.semantics`).  ``current_per_hz`` is the charge one input spike
  delivers, in normalised membrane units (threshold units of the ORN
  population); ``'rate'`` encoding injects its expectation every step,
  ``I = rate_hz * dt_s * current_per_hz`` (deterministic and differentiable),
  ``'poisson'`` draws ``Bernoulli(rate_hz * dt_s)`` input spikes and injects
  ``current_per_hz`` per spike (seeded; a straight-through estimator passes the
  gradient of the expectation, so even Poisson input is differentiable w.r.t.
  the rate).
* Mixtures (:meth:`OdorEncoder.add_mixture`): each component at the same
  concentration, their response changes add (as for co-expressed receptors);
  real ORN mixture responses are often sublinear, so this is an upper bound.
  Several sources at their own concentrations (the choice task) add the same
  way: :meth:`OdorEncoder.rates` with ``odor_index [B, m]`` and a trailing
  source axis on the concentration gives ``spontaneous + sum_m f(c_m) response_m``
  (adapting: divided by ``a + K_a``, with ``a`` the mean over antennae of ``sum_m f(c_m)``).

Held-out split
--------------
:func:`well_driving_odors` are the odors that excite at least ``min_receptors``
(2) receptors by at least ``strong_hz`` (50 spikes/s); :func:`chemical_classes`
gives each odor its chemical class (the table lists odors class by class, in the
order of Hallem & Carlson's Table S1); :func:`held_out_split` holds out a seeded,
class-stratified share of the well-driving odors.
"""
from __future__ import annotations

import csv
import difflib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from connectome.errors import DataError

from dmn_neuro.simulation.semantics import DEFAULT_DT_MS

logger = logging.getLogger(__name__)

#: Name of the row holding the spontaneous firing rate in ``responses.csv``.
SPONTANEOUS_ROW = "spontaneous firing rate"
#: Common synonyms accepted by :meth:`OdorEncoder.odor_index` (alias -> Hallem name).
ODOR_ALIASES: Dict[str, str] = {
    "isoamyl acetate": "isopentyl acetate",
    "amyl acetate": "pentyl acetate",
    "2-phenylethanol": "phenethyl alcohol",
    "phenylethyl alcohol": "phenethyl alcohol",
    "3-methylbutanol": "3-methyl-butanol",
    "isoamyl alcohol": "3-methyl-butanol",
}
#: Attractive food odors put first by :meth:`OdorEncoder.default_task_odors` when strong enough.
PREFERRED_TASK_ODORS = ("isopentyl acetate", "ethyl acetate")
ENCODINGS = ("rate", "poisson")
#: First odor of each chemical class in the bundled table (which follows the class
#: order of Hallem & Carlson 2006, Table S1); every odor up to the next start belongs to it.
CHEMICAL_CLASS_STARTS = (
    ("amine", "ammonium hydroxide"), ("lactone", "gamma-butyrolactone"), ("acid", "methanoic acid"),
    ("sulfur compound", "3-methylthio-1-propanol"), ("terpene", "terpinolene"), ("aldehyde", "acetaldehyde"),
    ("ketone", "acetone"), ("aromatic", "phenethyl alcohol"), ("alcohol", "methanol"), ("ester", "methyl acetate"),
)


def hallem_carlson_dir() -> Path:
    """Directory of the bundled Hallem & Carlson 2006 table."""
    import connectome

    return Path(connectome.__file__).parent / "data" / "hallem_carlson_2006"


@dataclass
class HallemCarlson:
    """The Hallem & Carlson 2006 odor x receptor table.

    ``responses[i, j]``: change of the firing rate (spikes/s) of receptor ``j``'s
    ORN to odor ``i`` at 10^-2 dilution; ``spontaneous[j]``: its spontaneous
    rate (spikes/s); ``receptor_glomerulus``: receptor -> glomerulus name as in
    ``receptors.csv`` (``"A+B"`` when one receptor maps to two glomeruli).
    """

    odors: List[str]
    receptors: List[str]
    responses: np.ndarray
    spontaneous: np.ndarray
    receptor_glomerulus: Dict[str, str]

    def __post_init__(self) -> None:
        self.responses = np.asarray(self.responses, dtype=np.float64)
        self.spontaneous = np.asarray(self.spontaneous, dtype=np.float64).reshape(-1)
        n_o, n_r = len(self.odors), len(self.receptors)
        if self.responses.shape != (n_o, n_r):
            raise DataError(f"Hallem table: responses have shape {self.responses.shape}, expected ({n_o}, {n_r})")
        if self.spontaneous.shape != (n_r,):
            raise DataError(f"Hallem table: spontaneous has shape {self.spontaneous.shape}, expected ({n_r},)")
        if not (np.all(np.isfinite(self.responses)) and np.all(np.isfinite(self.spontaneous))):
            raise DataError("Hallem table: non-finite response values")
        if np.any(self.spontaneous < 0):
            raise DataError("Hallem table: negative spontaneous rate")
        if len(set(self.odors)) != n_o:
            raise DataError("Hallem table: duplicate odor names")
        missing = [r for r in self.receptors if r not in self.receptor_glomerulus]
        if missing:
            raise DataError(f"Hallem table: receptors without a glomerulus: {missing}")

    def glomerulus_receptors(self) -> Dict[str, List[str]]:
        """Glomerulus -> receptors feeding it (splits ``"A+B"`` mappings)."""
        out: Dict[str, List[str]] = {}
        for rec in self.receptors:
            for glom in self.receptor_glomerulus[rec].split("+"):
                out.setdefault(glom.strip(), []).append(rec)
        return out


def _read_csv(path: Path) -> List[List[str]]:
    if not path.is_file():
        raise DataError(f"missing odor data file: {path}")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [row for row in csv.reader(fh) if row and any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read odor data file {path}: {exc}") from exc
    if len(rows) < 2:
        raise DataError(f"odor data file {path} has no data rows")
    return rows


def load_hallem_carlson(directory: Union[str, Path, None] = None) -> HallemCarlson:
    """Load the Hallem & Carlson 2006 table (``responses.csv`` + ``receptors.csv``).

    ``directory`` defaults to the bundled copy. Missing or malformed files raise
    :class:`~connectome.errors.DataError` naming the file.
    """
    d = Path(directory) if directory is not None else hallem_carlson_dir()
    resp_path, rec_path = d / "responses.csv", d / "receptors.csv"

    rec_rows = _read_csv(rec_path)
    if [c.strip() for c in rec_rows[0][:2]] != ["receptor", "glomerulus"]:
        raise DataError(f"{rec_path}: header must be 'receptor,glomerulus', got {rec_rows[0]}")
    receptor_glomerulus: Dict[str, str] = {}
    for i, row in enumerate(rec_rows[1:], start=2):
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{rec_path}: line {i} is malformed: {row}")
        receptor_glomerulus[row[0].strip()] = row[1].strip()

    rows = _read_csv(resp_path)
    header = [c.strip() for c in rows[0]]
    if header[:3] != ["odor", "cas", "inchikey"] or len(header) < 4:
        raise DataError(f"{resp_path}: header must start with 'odor,cas,inchikey' followed by receptors")
    receptors = header[3:]
    odors: List[str] = []
    values: List[List[float]] = []
    spontaneous: Optional[List[float]] = None
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"{resp_path}: line {i} has {len(row)} fields, expected {len(header)}")
        try:
            vals = [float(v) for v in row[3:]]
        except ValueError as exc:
            raise DataError(f"{resp_path}: line {i}: non-numeric response ({exc})") from exc
        name = row[0].strip()
        if name == SPONTANEOUS_ROW or row[2].strip() == "SFR":
            spontaneous = vals
        else:
            odors.append(name)
            values.append(vals)
    if spontaneous is None:
        raise DataError(f"{resp_path}: no '{SPONTANEOUS_ROW}' row")
    if not odors:
        raise DataError(f"{resp_path}: no odor rows")
    try:
        return HallemCarlson(
            odors=odors,
            receptors=receptors,
            responses=np.array(values),
            spontaneous=np.array(spontaneous),
            receptor_glomerulus=receptor_glomerulus,
        )
    except DataError as exc:
        raise DataError(f"{resp_path}: {exc}") from exc


def chemical_classes(data: Optional[HallemCarlson] = None) -> Dict[str, str]:
    """Odor -> chemical class (see :data:`CHEMICAL_CLASS_STARTS`); ``"unclassified"`` for
    odors before the first class start (or in a table without these names)."""
    data = data if data is not None else load_hallem_carlson()
    starts = {name: cls for cls, name in CHEMICAL_CLASS_STARTS}
    out, current = {}, "unclassified"
    for name in data.odors:
        current = starts.get(name, current)
        out[name] = current
    return out


def well_driving_odors(data: Optional[HallemCarlson] = None, strong_hz: float = 50.0,
                       min_receptors: int = 2) -> List[str]:
    """Odors that raise at least ``min_receptors`` receptors' rates by ``strong_hz`` or more
    (table order). With the defaults 67 of the 110 Hallem & Carlson odors."""
    data = data if data is not None else load_hallem_carlson()
    strong = (data.responses >= strong_hz).sum(axis=1)
    return [o for o, n in zip(data.odors, strong) if n >= min_receptors]


def held_out_split(seed: int = 0, fraction: float = 1.0 / 3.0, keep: Sequence[str] = PREFERRED_TASK_ODORS,
                   data: Optional[HallemCarlson] = None, **well_driving) -> Dict[str, List[str]]:
    """Split the well-driving odors into ``train`` and ``held_out`` (both in table order).

    Rule (reproducible): ``ceil(fraction * N)`` of the ``N`` well-driving odors are
    held out, stratified by chemical class: each class gets ``floor(fraction * n)``
    of its ``n`` odors, the rest goes one by one to the classes with the largest
    remainders (ties: class name). Within a class the held-out odors are the first
    of a permutation drawn with ``numpy.random.default_rng(seed)`` (classes in name
    order, members in table order). ``keep`` odors (the attractive food odors)
    always stay in training.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    data = data if data is not None else load_hallem_carlson()
    odors = well_driving_odors(data, **well_driving)
    classes = chemical_classes(data)
    keep_set = {data.odors[OdorEncoder._lookup(k, data.odors)] for k in keep if k}
    members: Dict[str, List[str]] = {}
    for o in odors:
        if o not in keep_set:
            members.setdefault(classes[o], []).append(o)
    target = math.ceil(fraction * len(odors))
    quota = {c: math.floor(fraction * len(m)) for c, m in members.items()}
    rest = sorted(members, key=lambda c: (-(fraction * len(members[c]) - quota[c]), c))
    i = 0
    while sum(quota.values()) < target and i < 10 * len(rest):
        c = rest[i % len(rest)]
        if quota[c] < len(members[c]):
            quota[c] += 1
        i += 1
    rng = np.random.default_rng(int(seed))
    held = set()
    for c in sorted(members):
        perm = rng.permutation(len(members[c]))
        held.update(members[c][j] for j in perm[:quota[c]])
    return {"train": [o for o in odors if o not in held], "held_out": [o for o in odors if o in held]}


class OdorEncoder(nn.Module):
    """Maps (odor, concentration) to ORN firing rates and ORN input currents.

    Args:
        glomeruli: glomerulus of each ORN neuron, in ORN-layer order.
        dt_ms: simulation step (default :data:`~dmn_neuro.simulation.semantics.DEFAULT_DT_MS`).
        encoding: ``'rate'`` (deterministic expected current) or ``'poisson'``.
        current_per_hz: charge per input spike in normalised ORN membrane units
            (see the module docstring).
        default_spontaneous_hz: rate of ORNs whose glomerulus has no Hallem receptor.
        odors: subset (and order) of Hallem odors to encode; ``None`` = all, in
            file order (so indices equal :func:`load_hallem_carlson` indices).
        hill_k: if given, concentration passes a Hill function with half
            saturation ``hill_k`` normalised so that ``f(1) = 1``.
        seed: seed of the Poisson sampler used when :meth:`currents` gets no generator.
        adaptation_tau_ms: time constant of ORN adaptation / gain control (see the
            module docstring); ``None`` (default) = no adaptation.
        adaptation_floor: ``K_a``, in units of the reference concentration.
        adaptation_level: ``L_a``, the concentration (relative to the reference) an
            ORN adapted to a steady odor reports.
        data: a preloaded :class:`HallemCarlson` (default: the bundled table).

    Buffers: ``response`` [n_odors, n_orn] (Hz change) and ``spontaneous`` [n_orn] (Hz).
    """

    def __init__(
        self,
        glomeruli: Sequence[str],
        dt_ms: float = DEFAULT_DT_MS,
        encoding: str = "rate",
        current_per_hz: float = 1.0,
        default_spontaneous_hz: float = 10.0,
        odors: Optional[Sequence[str]] = None,
        hill_k: Optional[float] = None,
        seed: Optional[int] = None,
        data: Optional[HallemCarlson] = None,
        adaptation_tau_ms: Optional[float] = None,
        adaptation_floor: float = 0.01,
        adaptation_level: float = 1.0,
    ) -> None:
        super().__init__()
        if isinstance(glomeruli, str):
            raise ValueError("glomeruli must be a sequence of glomerulus names, not one string")
        glomeruli = [str(g).strip() for g in glomeruli]
        if not glomeruli:
            raise ValueError("glomeruli is empty: the ORN layer needs at least one neuron")
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown encoding {encoding!r}; choose one of {ENCODINGS}")
        if not dt_ms > 0:
            raise ValueError(f"dt_ms must be positive, got {dt_ms}")
        if not (np.isfinite(current_per_hz) and current_per_hz > 0):
            raise ValueError(f"current_per_hz must be positive and finite, got {current_per_hz}")
        if not (np.isfinite(default_spontaneous_hz) and default_spontaneous_hz >= 0):
            raise ValueError(f"default_spontaneous_hz must be >= 0, got {default_spontaneous_hz}")
        if hill_k is not None and not (np.isfinite(hill_k) and hill_k > 0):
            raise ValueError(f"hill_k must be positive, got {hill_k}")
        self.data = data if data is not None else load_hallem_carlson()
        self.glomeruli: List[str] = glomeruli
        self.dt_ms = float(dt_ms)
        self.encoding = encoding
        self.current_per_hz = float(current_per_hz)
        self.default_spontaneous_hz = float(default_spontaneous_hz)
        self.hill_k = None if hill_k is None else float(hill_k)
        if adaptation_tau_ms is not None and not (np.isfinite(adaptation_tau_ms) and adaptation_tau_ms > 0):
            raise ValueError(f"adaptation_tau_ms must be positive, got {adaptation_tau_ms}")
        if not (np.isfinite(adaptation_floor) and adaptation_floor > 0):
            raise ValueError(f"adaptation_floor must be positive, got {adaptation_floor}")
        self.adaptation_tau_ms = None if adaptation_tau_ms is None else float(adaptation_tau_ms)
        self.adaptation_floor = float(adaptation_floor)
        if not (np.isfinite(adaptation_level) and adaptation_level > 0):
            raise ValueError(f"adaptation_level must be positive, got {adaptation_level}")
        self.adaptation_level = float(adaptation_level)
        self.seed = seed
        self._generators: Dict[str, torch.Generator] = {}

        all_odors = self.data.odors
        if odors is None:
            odor_rows = list(range(len(all_odors)))
        else:
            odor_rows = [self._lookup(name, all_odors) for name in odors]
            if len(set(odor_rows)) != len(odor_rows):
                raise ValueError(f"duplicate odors in {list(odors)}")
        self.odors: List[str] = [all_odors[i] for i in odor_rows]

        rec_index = {r: j for j, r in enumerate(self.data.receptors)}
        glom_recs = self.data.glomerulus_receptors()
        n_orn = len(glomeruli)
        response = np.zeros((len(odor_rows), n_orn))
        spontaneous = np.full(n_orn, self.default_spontaneous_hz)
        covered = set()
        for k, glom in enumerate(glomeruli):
            recs = glom_recs.get(glom)
            if not recs:
                continue
            covered.add(glom)
            cols = [rec_index[r] for r in recs]
            response[:, k] = self.data.responses[np.ix_(odor_rows, cols)].sum(axis=1)
            spontaneous[k] = self.data.spontaneous[cols].mean()
        uncovered = sorted(set(glomeruli) - covered)
        if uncovered:
            logger.debug("glomeruli without Hallem receptor data (spontaneous only): %s", uncovered)
        if not covered:
            logger.warning("no ORN glomerulus has Hallem data; every odor gives the spontaneous rate")
        self.covered_glomeruli = sorted(covered)
        self.register_buffer("response", torch.tensor(response, dtype=torch.float32))
        self.register_buffer("spontaneous", torch.tensor(spontaneous, dtype=torch.float32))

    # ------------------------------------------------------------------ names
    @property
    def n_orn(self) -> int:
        return len(self.glomeruli)

    @property
    def n_odors(self) -> int:
        return len(self.odors)

    @staticmethod
    def _lookup(name: str, odors: Sequence[str]) -> int:
        key = " ".join(str(name).split()).lower()
        key = ODOR_ALIASES.get(key, key)
        lowered = [o.lower() for o in odors]
        if key in lowered:
            return lowered.index(key)
        close = difflib.get_close_matches(key, lowered, n=4, cutoff=0.6)
        hint = f"; close matches: {', '.join(odors[lowered.index(c)] for c in close)}" if close else ""
        raise DataError(f"unknown odor {name!r} (not in the Hallem & Carlson 2006 set used here){hint}")

    def odor_index(self, name: str) -> int:
        """Index of an odor (case-insensitive; common synonyms such as 'isoamyl acetate' accepted)."""
        return self._lookup(name, self.odors)

    def add_mixture(self, names: Sequence[str]) -> str:
        """Add a mixture of ``names`` as one more odor; returns its name (``"a + b"``).

        Its response is the sum of the components' response changes (each
        component at the episode's concentration); see the module docstring.
        """
        if isinstance(names, str) or len(names) < 2:
            raise ValueError(f"a mixture needs at least two odor names, got {names!r}")
        rows = [self.odor_index(n) for n in names]
        if len(set(rows)) != len(rows):
            raise ValueError(f"duplicate odors in the mixture {list(names)}")
        name = " + ".join(self.odors[i] for i in rows)
        if name.lower() in [o.lower() for o in self.odors]:
            return name
        mix = self.response[rows].sum(dim=0, keepdim=True)
        self.response = torch.cat([self.response, mix], dim=0)
        self.odors.append(name)
        return name

    def odor_score(self) -> np.ndarray:
        """Summed positive response change (Hz) of each odor over the distinct covered glomeruli."""
        seen, cols = set(), []
        for k, g in enumerate(self.glomeruli):
            if g not in seen:
                seen.add(g)
                cols.append(k)
        resp = self.response.detach().cpu().numpy()[:, cols]
        return np.clip(resp, 0.0, None).sum(axis=1)

    def default_task_odors(self, n: int = 4) -> List[str]:
        """A short list of odors that excite many receptors strongly, chosen by data.

        Odors are ranked by :meth:`odor_score`; the attractive food odors
        ``isopentyl acetate`` (isoamyl acetate) and ``ethyl acetate`` come first
        when present and scoring at least the median, the rest is filled from
        the top of the ranking.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        score = self.odor_score()
        median = float(np.median(score))
        chosen: List[str] = []
        for name in PREFERRED_TASK_ODORS:
            if name in self.odors and score[self.odors.index(name)] >= median and score[self.odors.index(name)] > 0:
                chosen.append(name)
        for i in np.argsort(-score, kind="stable"):
            if len(chosen) >= n:
                break
            if self.odors[i] not in chosen and score[i] > 0:
                chosen.append(self.odors[i])
        return chosen[:n]

    # --------------------------------------------------------------- encoding
    def concentration_gain(self, concentration: torch.Tensor) -> torch.Tensor:
        """``f(c)``: identity, or the Hill function normalised to ``f(1) = 1``."""
        c = torch.clamp(concentration, min=0.0)
        if self.hill_k is None:
            return c
        return c * (1.0 + self.hill_k) / (c + self.hill_k)

    @property
    def adapting(self) -> bool:
        """True when the encoder adapts (``adaptation_tau_ms`` set)."""
        return self.adaptation_tau_ms is not None

    @staticmethod
    def _level_of(gain: torch.Tensor, sources: bool) -> torch.Tensor:
        """The level an adapting encoder tracks, ``[B]``: ``f(c)`` summed over sources
        (last axis when ``sources``), averaged over antennae (the axis after batch)."""
        g = gain.sum(-1) if sources else gain
        return g if g.dim() == 1 else g.mean(-1)

    def adaptation_step(self, level: Optional[torch.Tensor], concentration: torch.Tensor) -> Optional[torch.Tensor]:
        """Next adaptation level ``[B]`` after a step at ``concentration [B, k]`` (k antennae;
        ``[B, k, m]``: m sources, whose ``f(c)`` add);
        ``level=None`` starts adapted to this concentration. ``None`` if not adapting."""
        if not self.adapting:
            return None
        now = self._level_of(self.concentration_gain(concentration), sources=concentration.dim() == 3)
        if level is None:
            return now
        d = math.exp(-self.dt_ms / self.adaptation_tau_ms)
        return d * level + (1.0 - d) * now

    def rates(self, odor_index: torch.Tensor, concentration: torch.Tensor,
              level: Optional[torch.Tensor] = None) -> torch.Tensor:
        """ORN firing rates (Hz).

        Args:
            odor_index: LongTensor [B] of odor indices (into :attr:`odors`), or
                [B, m]: m sources per episode, whose response changes add.
            concentration: [B] or [B, k] (e.g. k = 2 antennae), relative to 10^-2;
                with m sources [B, m] or [B, k, m].
            level: adaptation level ``[B]`` (:meth:`adaptation_step`) of an
                adapting encoder; ``None`` = adapted to ``concentration`` (steady state).

        Returns:
            [B, n_orn] for a [B] (or [B, m]) concentration, [B, k, n_orn] for [B, k] (or [B, k, m]).
        """
        odor_index = torch.as_tensor(odor_index, device=self.response.device).long()
        if odor_index.dim() not in (1, 2):
            raise ValueError(f"odor_index must be [B] or [B, m], got shape {tuple(odor_index.shape)}")
        if odor_index.numel() and (int(odor_index.min()) < 0 or int(odor_index.max()) >= self.n_odors):
            raise ValueError(f"odor_index out of range [0, {self.n_odors})")
        concentration = torch.as_tensor(concentration)
        m = odor_index.shape[1:]  # () or (m,)
        if concentration.dim() - len(m) not in (1, 2) or concentration.shape[0] != odor_index.shape[0] \
                or tuple(concentration.shape[concentration.dim() - len(m):]) != tuple(m):
            raise ValueError(f"concentration must be [B] or [B, k] (+ [m] sources) with B={odor_index.shape[0]}"
                             f"{', m=' + str(m[0]) if m else ''}, got {tuple(concentration.shape)}")
        dtype = concentration.dtype if concentration.is_floating_point() else torch.float32
        resp = self.response.to(device=concentration.device, dtype=dtype)[odor_index.to(concentration.device)]
        spont = self.spontaneous.to(device=concentration.device, dtype=dtype)
        gain = self.concentration_gain(concentration.to(dtype))
        if self.adapting:
            if level is None:
                level = self._level_of(gain, sources=bool(m))
            level = torch.as_tensor(level, device=gain.device, dtype=dtype)
            if level.shape != gain.shape[:1]:
                raise ValueError(f"level must be [B={gain.shape[0]}], got {tuple(level.shape)}")
            scale = self.adaptation_level / (level + self.adaptation_floor)
            gain = gain * scale.view(-1, *([1] * (gain.dim() - 1)))
        if m:  # sources add: spontaneous + sum_m f(c_m) response_m  (resp [B, m, n])
            out = spont + torch.einsum("bm,bmn->bn" if gain.dim() == 2 else "bkm,bmn->bkn", gain, resp)
        elif concentration.dim() == 1:
            out = spont + gain[:, None] * resp
        else:
            out = spont + gain[:, :, None] * resp[:, None, :]
        return torch.clamp(out, min=0.0)

    def _generator_for(self, device: torch.device) -> Optional[torch.Generator]:
        if self.seed is None:
            return None
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(int(self.seed))
        return self._generators[key]

    def currents(self, rates_hz: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """ORN input current for one step (normalised membrane units), same shape as ``rates_hz``.

        ``'rate'``: ``rates_hz * dt_s * current_per_hz``.  ``'poisson'``:
        ``Bernoulli(rates_hz * dt_s) * current_per_hz`` drawn with ``generator``
        (default: the encoder's own generator seeded with ``seed``, else torch's
        global RNG), with a straight-through gradient of the expectation.
        """
        p = rates_hz * (self.dt_ms * 1e-3)
        if self.encoding == "rate":
            return p * self.current_per_hz
        p = torch.clamp(p, 0.0, 1.0)
        gen = generator if generator is not None else self._generator_for(p.device)
        u = torch.rand(p.shape, generator=gen, device=p.device, dtype=p.dtype)
        spikes = (u < p.detach()).to(p.dtype)
        return (spikes + (p - p.detach())) * self.current_per_hz

    def forward(
        self,
        odor_index: torch.Tensor,
        concentration: torch.Tensor,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """``currents(rates(odor_index, concentration))``."""
        return self.currents(self.rates(odor_index, concentration), generator=generator)


def static_odor_input(
    encoder: OdorEncoder,
    odor_names: Sequence[str],
    T: int,
    concentration: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> np.ndarray:
    """Open-loop ORN input ``[T, B, n_orn]`` (float32), one episode per odor name.

    The concentration is constant over time; ``'rate'`` encoding repeats the same
    current every step, ``'poisson'`` draws fresh input spikes every step.
    """
    if isinstance(odor_names, str):
        odor_names = [odor_names]
    if int(T) < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    if not odor_names:
        raise ValueError("odor_names is empty")
    idx = torch.tensor([encoder.odor_index(n) for n in odor_names], dtype=torch.long)
    conc = torch.full((len(idx),), float(concentration))
    with torch.no_grad():
        rates = encoder.rates(idx.to(encoder.response.device), conc.to(encoder.response.device))
        if encoder.encoding == "rate":
            x = encoder.currents(rates).unsqueeze(0).expand(int(T), -1, -1)
        else:
            x = torch.stack([encoder.currents(rates, generator=generator) for _ in range(int(T))])
    return x.detach().cpu().numpy().astype(np.float32)


__all__ = [
    "HallemCarlson",
    "load_hallem_carlson",
    "hallem_carlson_dir",
    "OdorEncoder",
    "static_odor_input",
    "ODOR_ALIASES",
    "chemical_classes",
    "well_driving_odors",
    "held_out_split",
]
