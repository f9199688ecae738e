"""What a circuit hands to the engine: named parameters of populations and projections.

:class:`PopulationParams` and :class:`ProjectionParams` are the engine's
contract (:meth:`dmn_neuro.simulation.mechanism.DifferentiableOlfactoryCircuit.population_params`
and ``projection_weights`` return them). Mappings with the same keys
(``{"name": ..., "beta": ...}``) are accepted too and converted once, at the
boundary, by :func:`as_population` / :func:`as_projection`; nothing inside the
engine reads a string-keyed dict.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional, Tuple, Union

import torch

from dmn_neuro.errors import ConfigError
from dmn_neuro.simulation import semantics

if (semantics.SYNAPTIC_DELAY_STEPS != 1 or semantics.RESET_MODE != "zero"
        or semantics.SPIKE_CONDITION != "v > threshold"):  # pragma: no cover - guard
    raise ImportError("dmn_neuro.simulation.engine (and dmn_neuro.simulation.engine.kernels) implement a one-step synaptic delay, "
                      "zero reset and the strict spike condition v > threshold only")


class PopulationParams(NamedTuple):
    """One LIF population: ``beta`` 0-d decay, ``threshold`` ``[n]``, optional
    tonic ``bias`` ``[n]`` added to the current every step."""

    name: str
    beta: Any
    threshold: Any
    bias: Optional[torch.Tensor] = None


class ProjectionParams(NamedTuple):
    """One projection ``pre -> post`` (one-step synaptic delay).

    * ``weight``: ``[n_post, n_pre]`` effective signed weight (dense);
    * ``sparse``: optional :class:`~dmn_neuro.simulation.engine.sparse.SparseStructure`
      of the nonzeros (then the projection runs as CSR);
    * ``values``: optional ``[nnz]`` effective weights in the structure's CSR
      order (then ``weight`` may be ``None``);
    * ``grad_mask``: optional bool ``[n_post, n_pre]`` -- the weight is
      structurally zero outside it (synapse mask), so its gradient is computed
      only inside (zero outside).
    """

    pre: str
    post: str
    weight: Optional[torch.Tensor] = None
    sparse: Any = None
    values: Optional[torch.Tensor] = None
    grad_mask: Optional[torch.Tensor] = None


class PopulationState(NamedTuple):
    """State of one population between steps: post-reset membrane and last spikes, ``[B, n]``."""

    mem: torch.Tensor
    spikes: torch.Tensor


PopulationLike = Union[PopulationParams, Mapping[str, Any]]
ProjectionLike = Union[ProjectionParams, Mapping[str, Any]]


def as_population(p: PopulationLike) -> PopulationParams:
    """:class:`PopulationParams` from itself or a mapping with the same keys."""
    if isinstance(p, PopulationParams):
        return p
    if not isinstance(p, Mapping):
        raise ConfigError(f"population must be a PopulationParams (or a mapping), got {type(p).__name__}")
    name = p.get("name")
    if "threshold" not in p or "beta" not in p:
        raise ConfigError(f"population {name!r} needs 'beta' and 'threshold'")
    return PopulationParams(name, p["beta"], p["threshold"], p.get("bias"))


def as_projection(q: ProjectionLike) -> ProjectionParams:
    """:class:`ProjectionParams` from itself or a mapping with the same keys."""
    if isinstance(q, ProjectionParams):
        return q
    if not isinstance(q, Mapping):
        raise ConfigError(f"projection must be a ProjectionParams (or a mapping), got {type(q).__name__}")
    return ProjectionParams(q.get("pre"), q.get("post"), q.get("weight"), q.get("sparse"), q.get("values"),
                            q.get("grad_mask"))


def as_param(value, like: torch.Tensor, shape: Optional[Tuple[int, ...]] = None, what: str = "") -> torch.Tensor:
    """``value`` as a tensor on the device/dtype of ``like`` (expanded from 0-d to ``shape``)."""
    t = torch.as_tensor(value, device=like.device)
    if t.dtype != like.dtype:
        t = t.to(like.dtype)
    if shape is not None and tuple(t.shape) != shape:
        if t.ndim == 0:
            t = t.expand(shape)
        else:
            raise ConfigError(f"{what}: expected shape {list(shape)}, got {list(t.shape)}")
    return t
