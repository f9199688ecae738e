"""The differentiable olfactory circuit: ORN -> PN -> KC (<-> APL) -> MBON -> DN.

One hemisphere of the fly's olfactory pathway, built from connectome data:
masked, sign-constrained (Dale's law) projections whose magnitudes are
learned, LIF populations (snnTorch ``Leaky``) with one learnable decay per
population and one learnable threshold per neuron. The dynamics are those of
:mod:`dmn_neuro.simulation.semantics` (1-step delay per synaptic hop, zero reset).

Two execution paths with identical semantics:

* ``engine="snntorch"`` -- the reference: one :class:`~dmn_neuro.simulation.neurons.LIFCell`
  call per population per step;
* ``engine="fused"`` -- :mod:`dmn_neuro.simulation.engine` (layer-wise GEMMs, fused LIF
  scans with hand-written backward); the default where it is available.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from connectome.adjacency_matrix import ConstrainedWeight, as_bool_mask

from dmn_neuro.simulation import semantics
from dmn_neuro.errors import ConfigError, DMNError
from dmn_neuro.simulation.neurons import DEFAULT_SURROGATE, DEFAULT_SURROGATE_SLOPE, LIFCell
from dmn_neuro.simulation.spec import CircuitSpec, PopulationSpec, ProjectionSpec

logger = logging.getLogger(__name__)

POPULATION_ORDER: Tuple[str, ...] = ("ORN", "PN", "KC", "APL", "MBON", "DN")
#: Projections the circuit uses when both ends are present (pre, post).
CIRCUIT_PROJECTIONS: Tuple[Tuple[str, str], ...] = (
    ("ORN", "PN"), ("PN", "KC"), ("KC", "APL"), ("APL", "KC"), ("KC", "MBON"), ("MBON", "DN"),
)
ENGINES = ("snntorch", "fused")
#: Projections initialised from absolute synapse counts (``gain`` per unit of
#: log1p(count)) instead of fan-in normalisation: a KC needs several coincident
#: PN inputs to fire, and KCs with few claws get less drive (sparse coding).
UNNORMALISED_PROJECTIONS = frozenset({"PN->KC"})
#: *Model* projections (no synapse data) initialised E/I-balanced: per
#: postsynaptic neuron the inhibitory magnitudes are scaled so that they sum
#: to the excitatory ones. The untrained MBON->DN readout thus has no built-in
#: preference for or against odor; training sets the balance.
BALANCED_PROJECTIONS = frozenset({"MBON->DN"})
#: Populations with a learnable tonic drive (per-neuron bias current, in
#: thresholds per step at init). DNs fire tonically (the fly walks); odor
#: input modulates that drive. Lava: ``bias_mant``; NIR: ``v_leak``.
DEFAULT_BIAS: Dict[str, float] = {"DN": 0.5}
#: Relative spread of initial thresholds (uniform +-fraction, seeded); none by
#: default (Poisson input already desynchronises the ORNs).
DEFAULT_THRESHOLD_JITTER: Dict[str, float] = {}

#: Per-population physiology (tau_ms, threshold_mv, rest_mv) used when
#: connectome/cell_types.yaml does not give a value.
FALLBACK_NEURON_PARAMS: Dict[str, Tuple[float, float, float]] = {
    "ORN": (10.0, -45.0, -60.0), "PN": (15.0, -45.0, -60.0), "KC": (8.0, -45.0, -60.0),
    "APL": (50.0, -45.0, -60.0), "MBON": (15.0, -45.0, -60.0), "DN": (20.0, -45.0, -60.0),
}
#: Total input drive per postsynaptic neuron after fan-in normalisation, in
#: units of that neuron's threshold (the initial operating point; learned).
DEFAULT_PROJECTION_GAINS: Dict[str, float] = {
    "ORN->PN": 3.0, "PN->KC": 0.07, "KC->APL": 40.0, "APL->KC": 3.0, "KC->MBON": 50.0, "MBON->DN": 4.0,
}


class CircuitState(NamedTuple):
    """Explicit state of one circuit step: membranes and last step's spikes."""

    mem: Dict[str, torch.Tensor]
    spikes: Dict[str, torch.Tensor]


@dataclass
class CircuitStructure:
    """Everything about the wiring that a checkpoint must hold to rebuild the circuit."""

    layer_sizes: Dict[str, int]
    projections: List[Tuple[str, str]]
    provenance: Dict[str, str]
    cell_types: Dict[str, List[str]]
    root_ids: Dict[str, List[int]]
    glomeruli: Dict[str, List[str]] = field(default_factory=dict)
    source: str = "unknown"
    version: str = "unknown"
    #: The reader options the connectome was loaded with (``from_connectome``'s
    #: ``source_options``); ``None`` when the circuit was built from data directly.
    #: With ``source`` they let a checkpoint's wiring be rebuilt and compared.
    source_options: Optional[Dict[str, object]] = None
    #: Projections (``"PRE->POST"``) whose mask or weights the caller supplied
    #: (``masks=`` / ``weights=``): their masks may drop connectome synapses
    #: (ablations) but never add any.
    user_masks: List[str] = field(default_factory=list)
    #: Content hashes of the masks and sign vectors, written by
    #: :func:`dmn_neuro.training.checkpoint.save_checkpoint` (empty until saved).
    hashes: Dict[str, object] = field(default_factory=dict)

    def to_json(self) -> Dict[str, object]:
        out = {
            "layer_sizes": self.layer_sizes, "projections": [list(p) for p in self.projections],
            "provenance": self.provenance, "cell_types": self.cell_types, "root_ids": self.root_ids,
            "glomeruli": self.glomeruli, "source": self.source, "version": self.version,
        }
        if self.source_options is not None:
            out["source_options"] = self.source_options
        if self.user_masks:
            out["user_masks"] = list(self.user_masks)
        if self.hashes:
            out["hashes"] = self.hashes
        return out

    @classmethod
    def from_json(cls, d: Dict[str, object]) -> "CircuitStructure":
        try:
            return cls(
                layer_sizes={k: int(v) for k, v in d["layer_sizes"].items()},
                projections=[tuple(p) for p in d["projections"]],
                provenance=dict(d["provenance"]), cell_types={k: list(v) for k, v in d["cell_types"].items()},
                root_ids={k: [int(i) for i in v] for k, v in d["root_ids"].items()},
                glomeruli={k: list(v) for k, v in d.get("glomeruli", {}).items()},
                source=str(d.get("source", "unknown")), version=str(d.get("version", "unknown")),
                source_options=None if d.get("source_options") is None else dict(d["source_options"]),
                user_masks=[str(k) for k in d.get("user_masks", [])],
                hashes=dict(d.get("hashes", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DMNError(f"circuit structure in checkpoint is malformed: {exc!r}") from None


def _json_able(value) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _neuron_params(layers: Sequence[str]) -> Dict[str, Tuple[float, float, float]]:
    """(tau_ms, threshold_mv, rest_mv) per layer from connectome/cell_types.yaml."""
    out = dict(FALLBACK_NEURON_PARAMS)
    try:
        from connectome.config import load_cell_types
    except ImportError:  # pragma: no cover - config module is part of the package
        return out
    cfg = load_cell_types()
    for layer in layers:
        p = cfg.neuron_params(layer)
        out[layer] = (float(p.tau_m_ms), float(p.threshold_mv), float(p.rest_mv))
    return out


def _balance_ei(w: ConstrainedWeight) -> None:
    """Scale each row's inhibitory magnitudes so that they sum to its excitatory ones."""
    with torch.no_grad():
        mag = w.magnitude()
        inh = (w.sign < 0)[None, :] & w.mask
        exc_sum = torch.where(inh, torch.zeros_like(mag), mag).sum(1, keepdim=True)
        inh_sum = torch.where(inh, mag, torch.zeros_like(mag)).sum(1, keepdim=True)
        scale = torch.where(inh_sum > 0, exc_sum / inh_sum.clamp_min(1e-12), torch.ones_like(inh_sum))
        mag = torch.where(inh, mag * scale, mag)
        w.raw.copy_(torch.where(w.mask, torch.log(torch.expm1(mag.clamp_min(1e-6))), w.raw))


def _projection_mapping(given: Mapping[object, object], projections, what: str) -> Dict[Tuple[str, str], object]:
    """``{'mask_orn_pn' | 'orn_pn' | 'ORN->PN' | ('ORN', 'PN'): value}`` -> ``{('ORN', 'PN'): value}``."""
    known = {(a, b) for a, b in projections}
    out: Dict[Tuple[str, str], object] = {}
    for key, value in given.items():
        if isinstance(key, tuple) and len(key) == 2:
            pair = (str(key[0]).upper(), str(key[1]).upper())
        else:
            text = str(key)
            for prefix in ("mask_", "weights_", "w_"):
                if text.lower().startswith(prefix):
                    text = text[len(prefix):]
            parts = text.split("->") if "->" in text else text.split("_")
            pair = tuple(x.strip().upper() for x in parts) if len(parts) == 2 else None
        if pair not in known:
            raise ConfigError(f"{what}: {key!r} names no projection of this circuit; "
                              f"known: {', '.join(f'{a}->{b}' for a, b in projections)}")
        if pair in out:
            raise ConfigError(f"{what}: projection {pair[0]}->{pair[1]} given twice")
        out[pair] = value
    return out


def _given_weight(value, data, pre: str, post: str, shape: Tuple[int, int]) -> ConstrainedWeight:
    """A user-supplied weight as a :class:`ConstrainedWeight` of the right shape."""
    if isinstance(value, ConstrainedWeight):
        w = value
    else:
        eff = torch.as_tensor(value)
        if data is None:
            raise ConfigError(f"weights for {pre}->{post}: a plain tensor needs connectivity_data for the Dale signs")
        if eff.dim() != 2 or not eff.is_floating_point():
            raise ConfigError(f"weights for {pre}->{post} must be a float [n_post, n_pre] tensor, got {tuple(eff.shape)}")
        sign = torch.as_tensor(data.presynaptic_sign(pre), dtype=eff.dtype)
        if eff.shape[1] == sign.numel() and bool(((eff * sign[None, :]) < 0).any()):
            raise ConfigError(f"weights for {pre}->{post} violate Dale's law (an entry's sign differs from its "
                              "presynaptic neuron's transmitter sign)")
        w = ConstrainedWeight(eff.abs().detach(), sign, eff != 0)
    if tuple(w.shape) != shape:
        raise ConfigError(f"weights for {pre}->{post} have shape {tuple(w.shape)}, expected {shape} (n_post, n_pre)")
    return w


def _apply_mask(w: ConstrainedWeight, mask, key: str) -> None:
    m = torch.as_tensor(mask, device=w.mask.device)
    if tuple(m.shape) != tuple(w.mask.shape):
        raise ConfigError(f"masks: {key} has shape {tuple(m.shape)}, expected {tuple(w.mask.shape)}")
    w.mask.copy_(as_bool_mask(m, f"masks: {key}"))


class DifferentiableOlfactoryCircuit(nn.Module):
    """Connectome-constrained spiking circuit of one hemisphere.

    Args:
        connectivity_data: an ``OlfactoryCircuitData`` from
            :meth:`connectome.fetch_data.FlyWireConnectome.fetch_olfactory_circuit`
            (or ``None`` together with ``structure`` when restoring a checkpoint).
        dt_ms: simulation step.
        learnable_tau, learnable_threshold: what training may change besides weights.
        surrogate, surrogate_slope: surrogate gradient of the spike.
        projection_gains: initial total drive per postsynaptic neuron, in
            thresholds, per ``"PRE->POST"`` (defaults :data:`DEFAULT_PROJECTION_GAINS`).
        neuron_params: ``{layer: (tau_ms, threshold_mv, rest_mv)}`` overrides.
        engine: ``"fused"`` (default) or ``"snntorch"`` (reference).
        device: where the parameters live.
        weights_orn_pn, weights_pn_kc, weights_kc_mbon, weights_mbon_dn, weights:
            weights to use instead of the connectome-derived initialisation
            (the design document's spelling; ``weights`` takes any projection,
            keyed like ``masks``). A :class:`ConstrainedWeight` (what
            ``create_weight_matrix(..., learnable=True)`` returns) is used as
            it is, so training updates that very object; a tensor of effective
            weights ``[n_post, n_pre]`` is wrapped with the data's Dale signs.
        masks: synapse masks ``[n_post, n_pre]`` per projection, keyed
            ``'mask_orn_pn'``, ``'orn_pn'``, ``'ORN->PN'`` or ``('ORN', 'PN')``;
            a given mask replaces the projection's mask (weights off it are 0
            and get no gradient).
        learnable: ``False`` freezes every weight (decays and thresholds
            follow ``learnable_tau`` / ``learnable_threshold``).
    """

    def __init__(
        self,
        connectivity_data=None,
        dt_ms: float = semantics.DEFAULT_DT_MS,
        learnable_tau: bool = True,
        learnable_threshold: bool = True,
        surrogate: str = DEFAULT_SURROGATE,
        surrogate_slope: float = DEFAULT_SURROGATE_SLOPE,
        projection_gains: Optional[Dict[str, float]] = None,
        neuron_params: Optional[Dict[str, Tuple[float, float, float]]] = None,
        engine: str = "fused",
        device: Optional[torch.device | str] = None,
        structure: Optional[CircuitStructure] = None,
        init: str = "log",
        bias: Optional[Dict[str, float]] = None,
        threshold_jitter: Optional[Dict[str, float]] = None,
        seed: int = 0,
        weights_orn_pn=None,
        weights_pn_kc=None,
        weights_kc_mbon=None,
        weights_mbon_dn=None,
        weights: Optional[Mapping[object, object]] = None,
        masks: Optional[Mapping[object, object]] = None,
        learnable: bool = True,
    ) -> None:
        super().__init__()
        if engine not in ENGINES:
            raise ConfigError(f"unknown engine {engine!r}; choose one of {ENGINES}")
        self.engine = engine
        self.semantics = semantics.NeuronSemantics(dt_ms=dt_ms)
        self.surrogate = surrogate
        self.surrogate_slope = float(surrogate_slope)
        gains = dict(DEFAULT_PROJECTION_GAINS)
        for key, val in (projection_gains or {}).items():
            if key not in gains:
                raise ConfigError(f"unknown projection {key!r} in projection_gains; known: {sorted(gains)}")
            gains[key] = float(val)
        if structure is None:
            if connectivity_data is None:
                raise ConfigError("DifferentiableOlfactoryCircuit needs connectivity_data (or a structure)")
            structure = self._structure_from_data(connectivity_data)
        self.structure = structure
        layers = [p for p in POPULATION_ORDER if p in structure.layer_sizes]
        for required in ("ORN", "DN"):
            if required not in layers:
                raise ConfigError(f"circuit needs layer {required}; data has {layers}")
        self.population_names: List[str] = layers
        params = _neuron_params(layers)
        params.update(neuron_params or {})
        self.neuron_params = {k: params[k] for k in layers}
        self.cells = nn.ModuleDict()
        for name in layers:
            tau, thr_mv, rest_mv = params[name]
            self.cells[name] = LIFCell(
                structure.layer_sizes[name], tau_ms=tau, threshold_mv=thr_mv, rest_mv=rest_mv, learnable_tau=learnable_tau,
                learnable_threshold=learnable_threshold, dt_ms=dt_ms, surrogate=surrogate,
                slope=surrogate_slope, device=device, name=name,
            )
        # Heterogeneous initial thresholds (relative jitter, seeded): identical
        # neurons driven by the same deterministic input would fire in lockstep.
        self.threshold_jitter = dict(DEFAULT_THRESHOLD_JITTER if threshold_jitter is None else threshold_jitter)
        self.seed = int(seed)
        if connectivity_data is not None:
            gen = torch.Generator().manual_seed(self.seed)
            for name, frac in self.threshold_jitter.items():
                if name not in layers:
                    raise ConfigError(f"threshold_jitter given for unknown population {name!r}; known: {layers}")
                cell = self.cells[name]
                u = torch.rand(cell.n_neurons, generator=gen, dtype=torch.float64) * 2 - 1
                with torch.no_grad():
                    thr = cell.threshold.double().cpu() * (1 + float(frac) * u)
                    cell.raw_threshold.copy_(torch.log(torch.expm1(thr)).to(cell.raw_threshold))
        self.bias_init = dict(DEFAULT_BIAS if bias is None else bias)
        self.biases = nn.ParameterDict()
        for name, b in self.bias_init.items():
            if name not in layers:
                raise ConfigError(f"bias given for unknown population {name!r}; known: {layers}")
            thr = self.cells[name].threshold.detach()
            self.biases[name] = nn.Parameter((float(b) * thr).to(device) if device is not None else float(b) * thr)
        self.weights = nn.ModuleDict()
        given_w = _projection_mapping(
            {**{k: v for k, v in (("ORN->PN", weights_orn_pn), ("PN->KC", weights_pn_kc),
                                   ("KC->MBON", weights_kc_mbon), ("MBON->DN", weights_mbon_dn)) if v is not None},
             **dict(weights or {})}, structure.projections, "weights")
        given_m = _projection_mapping(masks or {}, structure.projections, "masks")
        for pre, post in structure.projections:
            key = f"{pre}->{post}"
            n_pre, n_post = structure.layer_sizes[pre], structure.layer_sizes[post]
            if (pre, post) in given_w:
                w = _given_weight(given_w[(pre, post)], connectivity_data, pre, post, (n_post, n_pre))
            elif connectivity_data is not None:
                from connectome.adjacency_matrix import AdjacencyMatrixGenerator

                thr_post = semantics.normalise_threshold(params[post][1], params[post][2])
                w, _mask = AdjacencyMatrixGenerator().create_weight_matrix(
                    connectivity_data, pre, post, normalize=key not in UNNORMALISED_PROJECTIONS,
                    learnable=True, init=init,
                    gain=gains.get(key, 1.0) * thr_post,
                )
                if key in BALANCED_PROJECTIONS:
                    _balance_ei(w)
            else:  # placeholder, filled by load_state_dict
                w = ConstrainedWeight(torch.zeros(n_post, n_pre), torch.ones(n_pre), torch.zeros(n_post, n_pre, dtype=torch.bool))
            if (pre, post) in given_m:
                _apply_mask(w, given_m[(pre, post)], key)
            if ((pre, post) in given_w or (pre, post) in given_m) and key not in structure.user_masks:
                structure.user_masks.append(key)
            if not learnable:
                w.raw.requires_grad_(False)
            self.weights[self._wkey(pre, post)] = w.to(device) if device is not None else w
        self.projection_pairs: List[Tuple[str, str]] = list(structure.projections)
        self.input_population = "ORN"
        self.output_population = "DN"

    # -- construction helpers ------------------------------------------------
    @staticmethod
    def _wkey(pre: str, post: str) -> str:
        return f"{pre}_to_{post}"

    @staticmethod
    def _structure_from_data(data) -> CircuitStructure:
        sizes = {k: int(v) for k, v in data.layer_sizes.items() if k in POPULATION_ORDER and int(v) > 0}
        projections = [(a, b) for a, b in CIRCUIT_PROJECTIONS if a in sizes and b in sizes]
        prov = {f"{a}->{b}": str(data.provenance(a, b)) for a, b in projections}
        cell_types, root_ids, glomeruli = {}, {}, {}
        for layer in sizes:
            neurons = data.layer_neurons(layer)
            cell_types[layer] = [str(n.cell_type) for n in neurons]
            root_ids[layer] = [int(n.id) for n in neurons]
            glomeruli[layer] = [str(getattr(n, "glomerulus", "") or "") for n in neurons]
        return CircuitStructure(sizes, projections, prov, cell_types, root_ids, glomeruli,
                                source=str(data.source), version=str(data.version))

    @classmethod
    def from_connectome(
        cls, source: str = "flywire_v783_mb", cache_dir=None, use_cache: bool = True,
        source_options: Optional[Dict[str, object]] = None, variant: Optional[Dict[str, object]] = None,
        **kwargs,
    ) -> "DifferentiableOlfactoryCircuit":
        """Build the circuit from a connectome source (bundled FlyWire v783 by default).

        ``source_options`` go to the source as given (each source accepts its own,
        ``connectome.sources.SOURCES[name].options``); ``None`` means the source's
        own defaults, not training's (``ConnectomeConfig.resolved_source_options``).
        ``variant`` (:mod:`connectome.variants`) rewires the data first; its label
        becomes part of ``structure.version``.
        """
        from connectome.fetch_data import FlyWireConnectome
        from connectome.variants import apply_variant

        data = FlyWireConnectome(use_cache=use_cache, cache_dir=cache_dir).fetch_olfactory_circuit(
            include_layers=list(POPULATION_ORDER), source=source, **(source_options or {}),
        )
        data = apply_variant(data, variant)
        circuit = cls(data, **kwargs)
        # What a checkpoint needs to rebuild this wiring and check it (JSON-able options
        # only: a cave client_factory cannot be stored, and cave is not rebuilt offline).
        circuit.structure.source_options = {k: v for k, v in sorted((source_options or {}).items())
                                            if _json_able(v)}
        return circuit

    # -- views used by the engine, exporters and losses ----------------------
    def weight(self, pre: str, post: str) -> ConstrainedWeight:
        return self.weights[self._wkey(pre, post)]

    def bias(self, name: str) -> Optional[torch.Tensor]:
        """Tonic drive ``[n]`` of a population, or ``None``."""
        return self.biases[name] if name in self.biases else None

    def population_params(self) -> List["PopulationParams"]:
        """The populations as the engine takes them (decay, thresholds, tonic drive)."""
        from dmn_neuro.simulation.engine import PopulationParams

        return [PopulationParams(n, self.cells[n].beta, self.cells[n].threshold, self.bias(n))
                for n in self.population_names]

    def projection_weights(self) -> List["ProjectionParams"]:
        """The projections as the engine takes them (effective weight, synapse mask)."""
        from dmn_neuro.simulation.engine import ProjectionParams

        return [ProjectionParams(a, b, weight=self.weight(a, b)(), grad_mask=self.weight(a, b).mask)
                for a, b in self.projection_pairs]

    @property
    def n_orn(self) -> int:
        return self.structure.layer_sizes["ORN"]

    @property
    def n_dn(self) -> int:
        return self.structure.layer_sizes["DN"]

    @property
    def orn_glomeruli(self) -> List[str]:
        return list(self.structure.glomeruli.get("ORN", []))

    def check_finite(self) -> None:
        """Raise a one-line error if any parameter is NaN/Inf (e.g. after a bad update)."""
        for name, p in self.named_parameters():
            if not torch.all(torch.isfinite(p)):
                raise DMNError(f"parameter {name} contains NaN/Inf")

    # -- dynamics ------------------------------------------------------------
    def init_state(self, batch_size: int, like: Optional[torch.Tensor] = None) -> CircuitState:
        ref = like if like is not None else next(self.parameters())
        z = {n: torch.zeros(batch_size, self.structure.layer_sizes[n], device=ref.device, dtype=ref.dtype)
             for n in self.population_names}
        return CircuitState(mem=dict(z), spikes={k: v.clone() for k, v in z.items()})

    def step_parameters(self) -> Dict[str, object]:
        """Parameters resolved once per rollout (weights, decays, thresholds)."""
        return {
            "beta": {n: self.cells[n].beta for n in self.population_names},
            "threshold": {n: self.cells[n].threshold for n in self.population_names},
            "weight_t": {(a, b): self.weight(a, b)().t() for a, b in self.projection_pairs},
        }

    def step(self, x_t: torch.Tensor, state: CircuitState, params: Optional[Dict[str, object]] = None) -> Tuple[Dict[str, torch.Tensor], CircuitState]:
        """One step of all populations. ``x_t``: ORN input current ``[B, n_orn]``.

        Each projection reads the presynaptic spikes of the previous step
        (``state.spikes``), as :mod:`dmn_neuro.simulation.semantics` prescribes;
        every population steps through :meth:`LIFCell.forward
        <dmn_neuro.simulation.neurons.LIFCell.forward>`, i.e. the one
        :func:`~dmn_neuro.simulation.neurons.lif_step`, whatever ``self.engine``
        (which only chooses how :meth:`forward` runs a whole input).
        """
        p = params if params is not None else self.step_parameters()
        currents = {n: None for n in self.population_names}
        currents[self.input_population] = x_t
        for (pre, post), wt in p["weight_t"].items():
            c = state.spikes[pre] @ wt
            currents[post] = c if currents[post] is None else currents[post] + c
        new_mem, new_spk = {}, {}
        for n in self.population_names:
            cur = currents[n] if currents[n] is not None else torch.zeros_like(state.mem[n])
            if n in self.biases:
                cur = cur + self.biases[n]
            s, v = self.cells[n](cur, state.mem[n], beta=p["beta"][n], threshold=p["threshold"][n])
            new_mem[n], new_spk[n] = v, s
        return new_spk, CircuitState(new_mem, new_spk)

    def closed_loop_runner(self, batch_size: int, steps: int, like: Optional[torch.Tensor] = None):
        """A :class:`~dmn_neuro.simulation.engine.closed_loop.SkewedLoop` that advances
        this circuit in blocks between arena updates with the spikes of :meth:`step`
        (bit for bit), or ``None`` where it cannot (then step per step). The
        parameters are resolved once, as :meth:`step_parameters` does."""
        from dmn_neuro.simulation.engine.closed_loop import SkewedLoop

        ref = like if like is not None else next(self.parameters())
        return SkewedLoop.build(
            self.population_params(), self.projection_weights(), self.input_population, self.output_population,
            rows=int(batch_size), steps=int(steps), like=ref, surrogate=self.surrogate, slope=self.surrogate_slope,
        )

    def forward(self, odor_input: torch.Tensor, return_activations: bool = True, engine: Optional[str] = None):
        """Open-loop run on ORN input currents ``[T, B, n_orn]``.

        ``engine`` (default ``self.engine``): ``"fused"`` runs
        :func:`dmn_neuro.simulation.engine.run_layered`, ``"snntorch"`` the
        per-step reference (:meth:`step` in a loop). Returns the DN spikes
        ``[T, B, n_dn]``, and with ``return_activations`` a dict ``{"spikes":
        {population: [T,B,n]}, "membranes": {population: [T,B,n] post-reset
        membranes}}``.
        """
        if odor_input.ndim != 3 or odor_input.shape[-1] != self.n_orn:
            raise ConfigError(f"odor_input must be [T, batch, {self.n_orn}], got {list(odor_input.shape)}")
        engine = engine or self.engine
        if engine not in ENGINES:
            raise ConfigError(f"unknown engine {engine!r}; choose one of {ENGINES}")
        run = self._run_fused if engine == "fused" else self._run_stepped
        spikes, mems = run(odor_input, return_activations)
        dn = spikes[self.output_population]
        if not return_activations:
            return dn
        return dn, {"spikes": spikes, "membranes": mems}

    def _run_fused(self, odor_input: torch.Tensor, record_membrane: bool):
        """``(spikes, membranes)`` by population through the fused engine."""
        from dmn_neuro.simulation.engine import run_layered

        out = run_layered(
            odor_input, self.population_params(), self.projection_weights(),
            surrogate=self.surrogate, slope=self.surrogate_slope, input_population=self.input_population,
            record_membrane=record_membrane,
        )
        spikes = {n: out[n] for n in self.population_names}
        mems = {n: out[n + "_mem"] for n in self.population_names if n + "_mem" in out}
        return spikes, mems

    def _run_stepped(self, odor_input: torch.Tensor, record_membrane: bool):
        """``(spikes, membranes)`` by population, one :meth:`step` at a time."""
        state = self.init_state(odor_input.shape[1], like=odor_input)
        params = self.step_parameters()
        rec_s = {n: [] for n in self.population_names}
        rec_v = {n: [] for n in self.population_names}
        for x_t in odor_input.unbind(0):
            spk, state = self.step(x_t, state, params)
            for n in self.population_names:
                rec_s[n].append(spk[n])
                rec_v[n].append(state.mem[n])
        spikes = {n: torch.stack(v) for n, v in rec_s.items()}
        mems = {n: torch.stack(v) for n, v in rec_v.items()}
        return spikes, mems

    # -- export --------------------------------------------------------------
    def to_spec(self, metadata: Optional[Dict[str, object]] = None) -> CircuitSpec:
        """Framework-neutral description with the learned parameters (float64)."""
        with torch.no_grad():
            pops = []
            for n in self.population_names:
                cell = self.cells[n]
                pops.append(PopulationSpec(
                    name=n, n=cell.n_neurons, beta=float(cell.beta.double().cpu()),
                    threshold=cell.threshold.double().cpu().numpy(),
                    bias=None if self.bias(n) is None else self.bias(n).double().cpu().numpy(),
                    cell_types=self.structure.cell_types.get(n, [n] * cell.n_neurons),
                    root_ids=np.asarray(self.structure.root_ids.get(n, [-1] * cell.n_neurons), dtype=np.int64),
                    provenance="model" if n in ("ORN", "DN") else self.structure.source,
                ))
            projs = [
                ProjectionSpec(pre=a, post=b, weight=self.weight(a, b)().double().cpu().numpy(),
                               provenance=self.structure.provenance.get(f"{a}->{b}", "model"))
                for a, b in self.projection_pairs
            ]
        meta = {"dataset": self.structure.source, "version": self.structure.version,
                "orn_glomeruli": self.orn_glomeruli, "surrogate": self.surrogate}
        meta.update(metadata or {})
        return CircuitSpec(pops, projs, self.semantics, self.input_population, self.output_population, meta)

    def config_dict(self) -> Dict[str, object]:
        """Constructor arguments needed to rebuild this circuit (checkpoint JSON)."""
        return {
            "dt_ms": self.semantics.dt_ms, "surrogate": self.surrogate, "surrogate_slope": self.surrogate_slope,
            "engine": self.engine, "neuron_params": {k: list(v) for k, v in self.neuron_params.items()},
            "bias": self.bias_init, "threshold_jitter": self.threshold_jitter, "seed": self.seed,
            "learnable_tau": isinstance(self.cells[self.population_names[0]].raw_beta, nn.Parameter),
            "learnable_threshold": isinstance(self.cells[self.population_names[0]].raw_threshold, nn.Parameter),
        }
