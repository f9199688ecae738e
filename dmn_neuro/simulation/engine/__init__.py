"""Fused, memory-lean BPTT engine with the semantics of :mod:`dmn_neuro.simulation.semantics`.

The per-step path (:func:`dmn_neuro.simulation.neurons.lif_step`, stepped by
:func:`run_reference`) builds autograd nodes per population per step and keeps
every state. The engine computes the same spikes (bit for bit) and the same
gradients (to float rounding) with fewer, larger operations:

* :func:`lif_scan` -- the LIF recurrence of one population over all ``T``
  steps as ONE autograd node with a hand-written backward (the linear reverse
  recurrence of the detached zero reset; :mod:`.scans`).
* :func:`run_layered` -- a whole circuit (:mod:`.runner`): populations are
  grouped into strongly connected components of the projection graph
  (:mod:`.grouping`). Projections between components are feed-forward: with
  the one-step synaptic delay the current of every step is ONE matmul over
  all ``T*B`` rows of the shifted presynaptic spikes (:mod:`.projections`).
  Only a true recurrence (KC <-> APL) is stepped, inside one scan whose
  backward is the coupled reverse recurrence; on the CPU in float32 its steps
  run in C, one call per time chunk, with the torch loop's rounding
  (:mod:`.group_kernel`).
* on the CPU in float32, feed-forward projections with a sparse weight run
  through the event-driven C kernels of :mod:`.kernels` (forward bit-identical
  to the GEMM) and are computed inside the scan of the larger population's
  group, so neither the ``[T, B, n_KC]`` KC input current nor the gradient
  w.r.t. the KC spikes ever exists as a whole tensor.
* sparse projections (:class:`SparseStructure`, :mod:`.sparse`): CSR forward
  SpMM, input gradient through the CSR of ``W^T``, weight gradient only on the
  nonzeros; event-driven forward inside stepped recurrences.
* gradient checkpointing over time segments (``checkpoint_every``).

Contract (what the circuit hands in; :mod:`.contract`): a sequence of
:class:`PopulationParams` ``(name, beta 0-d, threshold [n], bias [n] or None)``
and a sequence of :class:`ProjectionParams` ``(pre, post, weight [n_post,
n_pre], sparse, values [nnz], grad_mask)``. Mappings with the same keys are
accepted and converted at the boundary.

When a projection has a ``sparse`` structure but no ``values``, the values
are gathered from the dense ``weight`` at the structure's nonzeros, so
gradients reach the dense raw parameter unchanged (zero outside the mask, as
with the dense path). At whole-brain scale, where no dense matrix can exist,
pass ``values`` computed from a per-edge raw parameter instead. Set
``DMN_NEURO_KERNELS=0`` to use plain torch instead of the C kernels.

Summation order of the input current (it decides float rounding, hence exact
spike equality): external input ``x`` first, then projections from other
components in list order, then projections inside the component in list order.
:func:`run_reference` and :func:`dmn_neuro.simulation.spec.simulate` sum in list order,
which is the same for the usual ORN, PN, KC, APL, MBON, DN ordering.
"""
from __future__ import annotations

from dmn_neuro.simulation.engine.contract import PopulationParams, PopulationState, ProjectionParams
from dmn_neuro.simulation.engine.grouping import strongly_connected_groups
from dmn_neuro.simulation.engine.runner import run_layered, run_layered_with_state, run_reference
from dmn_neuro.simulation.engine.scans import lif_scan, lif_scan_with_state
from dmn_neuro.simulation.engine.sparse import SparseStructure
from dmn_neuro.simulation.neurons import lif_step

__all__ = [
    "PopulationParams",
    "PopulationState",
    "ProjectionParams",
    "SparseStructure",
    "lif_scan",
    "lif_scan_with_state",
    "lif_step",
    "run_layered",
    "run_layered_with_state",
    "run_reference",
    "strongly_connected_groups",
]
