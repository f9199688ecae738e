"""Circuit planning: validate what the circuit hands in and group its populations.

Populations are grouped into the strongly connected components of the
projection graph (:func:`strongly_connected_groups`, iterative Tarjan, then a
topological order of the condensation). Projections between components are
feed-forward (one delayed matmul over the whole time axis); only projections
inside a component are stepped.
"""
from __future__ import annotations

import heapq
from typing import Dict, List, NamedTuple, Sequence, Tuple

import torch

from dmn_neuro.errors import ConfigError
from dmn_neuro.simulation.engine.contract import (
    PopulationLike, PopulationParams, ProjectionLike, ProjectionParams, as_population, as_projection,
)
from dmn_neuro.simulation.engine.sparse import SparseStructure

__all__ = ["strongly_connected_groups"]


def strongly_connected_groups(names: Sequence[str], edges: Sequence[Tuple[str, str]]) -> List[List[str]]:
    """Strongly connected components of the projection graph in a topological
    order (ties broken by the order of ``names``); members keep ``names`` order."""
    index = {n: i for i, n in enumerate(names)}
    succ: Dict[str, List[str]] = {n: [] for n in names}
    for pre, post in edges:
        succ[pre].append(post)
    # Tarjan (iterative)
    counter = [0]
    low: Dict[str, int] = {}
    num: Dict[str, int] = {}
    stack: List[str] = []
    on_stack = set()
    comp_of: Dict[str, int] = {}
    comps: List[List[str]] = []
    for root in names:
        if root in num:
            continue
        work = [(root, iter(succ[root]))]
        num[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            advanced = False
            for nxt in it:
                if nxt not in num:
                    num[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(succ[nxt])))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], num[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == num[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp_of[w] = len(comps)
                    comp.append(w)
                    if w == node:
                        break
                comps.append(sorted(comp, key=index.__getitem__))
    # condensation, Kahn with ties by first member index
    n_c = len(comps)
    indeg = [0] * n_c
    csucc: List[set] = [set() for _ in range(n_c)]
    for pre, post in edges:
        a, b = comp_of[pre], comp_of[post]
        if a != b and b not in csucc[a]:
            csucc[a].add(b)
            indeg[b] += 1
    ready = sorted((index[comps[c][0]], c) for c in range(n_c) if indeg[c] == 0)
    order: List[List[str]] = []
    heapq.heapify(ready)
    while ready:
        _, c = heapq.heappop(ready)
        order.append(comps[c])
        for d in csucc[c]:
            indeg[d] -= 1
            if indeg[d] == 0:
                heapq.heappush(ready, (index[comps[d][0]], d))
    return order


class _Circuit(NamedTuple):
    """A validated circuit: populations by name, projections (dense ones with
    ``weight``, sparse ones with ``sparse`` and ``values``) and the groups."""

    names: List[str]
    sizes: Dict[str, int]
    pops: Dict[str, PopulationParams]
    projs: List[ProjectionParams]
    groups: List[List[str]]


def _prepare(x: torch.Tensor, populations: Sequence[PopulationLike], projections: Sequence[ProjectionLike],
             input_population: str) -> _Circuit:
    """Validate the contract (one-line ConfigErrors) and group the populations."""
    if x.ndim != 3:
        raise ConfigError(f"input x must be [T, batch, n_input], got shape {list(x.shape)}")
    names = []
    pops: Dict[str, PopulationParams] = {}
    sizes: Dict[str, int] = {}
    for p in map(as_population, populations):
        name = p.name
        if name in pops:
            raise ConfigError(f"duplicate population {name!r}")
        thr = torch.as_tensor(p.threshold)
        if thr.ndim != 1:
            raise ConfigError(f"population {name!r}: threshold must be [n], got shape {list(thr.shape)}")
        if torch.as_tensor(p.beta).numel() != 1:
            raise ConfigError(f"population {name!r}: beta must be a scalar (one decay per population)")
        names.append(name)
        pops[name] = p
        sizes[name] = int(thr.shape[0])
    if input_population not in pops:
        raise ConfigError(f"input population {input_population!r} not among {names}")
    if x.shape[2] != sizes[input_population]:
        raise ConfigError(f"input x has {x.shape[2]} channels but {input_population} has {sizes[input_population]} neurons")
    projs: List[ProjectionParams] = []
    for q in map(as_projection, projections):
        pre, post = q.pre, q.post
        for end in (pre, post):
            if end not in pops:
                raise ConfigError(f"projection {pre}->{post}: unknown population {end!r}; known: {names}")
        st, weight, values = q.sparse, q.weight, q.values
        if st is not None:
            if not isinstance(st, SparseStructure):
                raise ConfigError(f"projection {pre}->{post}: 'sparse' must be a SparseStructure")
            if st.shape != (sizes[post], sizes[pre]):
                raise ConfigError(f"projection {pre}->{post}: sparse structure {list(st.shape)}, expected {[sizes[post], sizes[pre]]}")
            if st.device != x.device:
                st = st.to(x.device)
            if values is None:
                if weight is None:
                    raise ConfigError(f"projection {pre}->{post}: sparse projection needs 'values' or a dense 'weight'")
                values = st.gather(weight)
            if values.shape != (st.nnz,):
                raise ConfigError(f"projection {pre}->{post}: values has shape {list(values.shape)}, expected [{st.nnz}]")
            projs.append(ProjectionParams(pre, post, None, st, values.to(x.dtype)))
        else:
            if weight is None:
                raise ConfigError(f"projection {pre}->{post}: missing 'weight'")
            if tuple(weight.shape) != (sizes[post], sizes[pre]):
                raise ConfigError(f"type mismatch: {pre}->{post}: weight {list(weight.shape)}, expected {[sizes[post], sizes[pre]]}")
            grad_mask = q.grad_mask
            if grad_mask is not None:
                grad_mask = torch.as_tensor(grad_mask)
                if grad_mask.dtype != torch.bool or tuple(grad_mask.shape) != tuple(weight.shape):
                    raise ConfigError(f"projection {pre}->{post}: grad_mask must be a bool tensor of shape "
                                      f"{list(weight.shape)}, got {grad_mask.dtype} {list(grad_mask.shape)}")
                grad_mask = grad_mask.to(weight.device)
            projs.append(ProjectionParams(pre, post, weight.to(x.dtype), None, None, grad_mask))
    groups = strongly_connected_groups(names, [(q.pre, q.post) for q in projs])
    return _Circuit(names, sizes, pops, projs, groups)
