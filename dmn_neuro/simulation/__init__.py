"""Stage 2 -- the neural mechanism: one definition of the dynamics and every simulator of it.

* :mod:`.semantics` -- dt, decay, threshold, reset and delay (the single source of truth);
* :mod:`.neurons` -- the one torch LIF step (:func:`lif_step`), the surrogate, :class:`LIFCell`;
* :mod:`.mechanism` -- :class:`DifferentiableOlfactoryCircuit`, the connectome-constrained circuit;
* :mod:`.engine` -- the fused BPTT engine (same spikes, fewer and larger operations);
* :mod:`.spec` -- :class:`CircuitSpec` and the NumPy float simulator every exporter is checked against;
* :mod:`.fixed_point` -- Loihi 2 integer arithmetic (quantisation, emulators) used by QAT and the exporters.

Names are imported on first use.
"""
from connectome.lazy import lazy_exports

_EXPORTS = {
    "NeuronSemantics": "dmn_neuro.simulation.semantics",
    "tau_to_beta": "dmn_neuro.simulation.semantics",
    "beta_to_tau": "dmn_neuro.simulation.semantics",
    "DEFAULT_DT_MS": "dmn_neuro.simulation.semantics",
    "LIFCell": "dmn_neuro.simulation.neurons",
    "lif_step": "dmn_neuro.simulation.neurons",
    "Surrogate": "dmn_neuro.simulation.neurons",
    "SURROGATES": "dmn_neuro.simulation.neurons",
    "DEFAULT_SURROGATE": "dmn_neuro.simulation.neurons",
    "DEFAULT_SURROGATE_SLOPE": "dmn_neuro.simulation.neurons",
    "DifferentiableOlfactoryCircuit": "dmn_neuro.simulation.mechanism",
    "CircuitState": "dmn_neuro.simulation.mechanism",
    "CircuitStructure": "dmn_neuro.simulation.mechanism",
    "POPULATION_ORDER": "dmn_neuro.simulation.mechanism",
    "CircuitSpec": "dmn_neuro.simulation.spec",
    "PopulationSpec": "dmn_neuro.simulation.spec",
    "ProjectionSpec": "dmn_neuro.simulation.spec",
    "simulate": "dmn_neuro.simulation.spec",
    "FixedPointSpec": "dmn_neuro.simulation.fixed_point",
    "FixedPointStepper": "dmn_neuro.simulation.fixed_point",
    "quantize": "dmn_neuro.simulation.fixed_point",
    "simulate_fixed": "dmn_neuro.simulation.fixed_point",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
