"""Lesions at evaluation time, without retraining.

A lesion removes the *outgoing* synapses of the lesioned neurons (their
columns of every projection they send, mask set to False, so the weight is
exactly 0): the neurons still integrate and spike, but nothing downstream sees
it. For what follows in the circuit this is the same as silencing them, and it
leaves the rest of the circuit's dynamics untouched. The lesioned circuit is a
copy; the loaded one is not modified.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from dmn_neuro.errors import DMNError

LESION_METHOD = ("outgoing synapses removed (mask off, weight exactly 0) for the lesioned neurons in every projection "
                 "they send; they still spike, nobody downstream receives it; evaluated without retraining")


def lesioned(circuit, population: str, neurons: Optional[Sequence[int]] = None):
    """A copy of ``circuit`` with the outgoing synapses of ``neurons`` of ``population`` removed (all if ``None``)."""
    if population not in circuit.population_names:
        raise DMNError(f"lesion: unknown population {population!r}; known: {', '.join(circuit.population_names)}")
    out = copy.deepcopy(circuit)
    n = circuit.structure.layer_sizes[population]
    idx = torch.arange(n) if neurons is None else torch.as_tensor(list(neurons), dtype=torch.long)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise DMNError(f"lesion: neuron index out of range for {population} ({n} neurons)")
    with torch.no_grad():
        for a, b in out.projection_pairs:
            if a == population:
                out.weight(a, b).mask[:, idx.to(out.weight(a, b).mask.device)] = False
    return out


def lesion_plan(circuit, mbon_transmitters: Sequence[str]) -> List[Tuple[str, str, Optional[List[int]]]]:
    """``(name, population, neurons)`` of the default lesions: APL, each MBON
    transmitter class, each MBON cell type."""
    plan: List[Tuple[str, str, Optional[List[int]]]] = []
    if "APL" in circuit.population_names:
        plan.append(("APL", "APL", None))
    if "MBON" in circuit.population_names:
        for t in sorted(set(mbon_transmitters)):
            plan.append((f"MBON:{t}", "MBON", [i for i, x in enumerate(mbon_transmitters) if x == t]))
        types = list(circuit.structure.cell_types.get("MBON", []))
        for t in sorted(set(types)):
            plan.append((f"MBON type {t}", "MBON", [i for i, x in enumerate(types) if x == t]))
    return plan


def evaluate_lesions(circuit, cfg, plan, episodes: int, steps: Optional[int], seed: int = 12345,
                     progress: Optional[Callable[[str], None]] = None, keep_intact_rollouts: bool = False
                     ) -> Dict[str, Any]:
    """Held-out success and final distance of the intact circuit and of each lesion in ``plan``.

    Every condition runs the same episodes (same seed: paired comparison).
    With ``keep_intact_rollouts`` the intact circuit's rollouts are returned
    under ``"_rollouts"`` (for the trajectory manifold).
    """
    from dmn_neuro.training.optimizer import build_components, evaluate_agent

    cpu = torch.device("cpu")

    def run(c, rollouts=False):
        _, _, _, agent, _ = build_components(cfg, circuit=c.float(), device=cpu)
        return evaluate_agent(agent, cfg, episodes, seed, episode_length=steps, device=cpu,
                              return_rollouts=rollouts)

    intact = run(circuit, keep_intact_rollouts)
    rollouts = intact.pop("rollouts", None)
    if progress:
        progress("intact")
    out: Dict[str, Any] = {"method": LESION_METHOD, "episodes": int(episodes), "seed": int(seed),
                           "episode_length_steps": int(intact["episode_length_steps"]),
                           "intact": _summary(intact, None), "lesions": {}}
    for name, pop, neurons in plan:
        res = run(lesioned(circuit, pop, neurons))
        entry = _summary(res, intact)
        entry.update({"population": pop, "n_neurons": int(circuit.structure.layer_sizes[pop] if neurons is None
                                                          else len(neurons))})
        out["lesions"][name] = entry
        if progress:
            progress(name)
    if rollouts is not None:
        out["_rollouts"] = rollouts
    return out


def _summary(res: Dict[str, Any], intact: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    s = {"success_rate": float(res["success_rate"]), "final_distance_mm": float(res["final_distance_to_goal_mean"]),
         "mean_distance_mm": float(res["mean_distance_to_goal_mean"]), "kc_sparsity": float(res["kc_sparsity"])}
    if intact is not None:
        s["delta_success"] = s["success_rate"] - float(intact["success_rate"])
        s["delta_final_distance_mm"] = s["final_distance_mm"] - float(intact["final_distance_to_goal_mean"])
    return s


def headline(lesions: Dict[str, Any]) -> Dict[str, float]:
    """Success of the intact circuit and of the non-cell-type lesions (for the summary line)."""
    out = {"intact": lesions["intact"]["success_rate"]}
    out.update({k: v["success_rate"] for k, v in lesions["lesions"].items() if not k.startswith("MBON type ")})
    return out

