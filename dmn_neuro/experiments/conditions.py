"""How far a navigator generalises: held-out episodes under each standard condition.

:func:`condition_table` evaluates one checkpoint on held-out episodes (the
evaluation stream, never used in training or model selection) under

* ``training``: the checkpoint's own training conditions (its training odors and ranges);
* ``held-out odor``: each odor the checkpoint declares held out, one at a time;
* ``concentration``: peak x0.25, x0.5, x2, x4 of the reference (training odors);
* ``plume``: each plume type; ``wind``: still air and 5 mm/s;
* controls: ``odor removed`` and ``untrained`` (the same config's initial
  circuit, rebuilt from its seed exactly as ``dmn-neuro train`` builds it).

Each condition fixes one factor and keeps the training distribution for the
others (``dmn-neuro evaluate`` flags, :func:`evaluation_config`).
:func:`write_condition_table` writes ``conditions.json``, ``conditions.md`` and
``conditions.png`` (success = at the source at the end; reached = within the radius at any
time, the approach without the stop); the JSON also scores the result against the approach
task's acceptance levels (issue 12) without changing anything it measured.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

CONCENTRATIONS = (0.25, 0.5, 2.0, 4.0)
PLUMES = ("exponential", "gaussian", "inverse_square")
WINDS = (0.0, 5.0)
#: acceptance levels of the approach task (success rates)
TARGETS = {"training": 0.80, "held_out_odors_mean": 0.70, "each_concentration": 0.70, "each_plume": 0.70,
           "odor_removed_max": 0.05, "untrained_max": 0.10}


def evaluation_config(cfg, odors=(), concentration=None, plume=None, plume_length=None, wind=None,
                      start_distance=None, distractor=None, start_heading=None, stop_at_source=None):
    """``cfg`` with its arena fixed to the given conditions (each ``None``/empty keeps the checkpoint's).

    Returns ``(config, mixture)``: ``mixture`` is the tuple of odors to mix (the
    caller adds it to the encoder) or ``()``. A named odor replaces the training
    set and the held-out declaration (this arena is for evaluation only); the
    encoder then covers every Hallem odor (it has no learned parameters, so its
    odor table does not change the model). The success radius stays the
    checkpoint's when the start distance changes.
    """
    arena = cfg.environment.arena_config()
    changes = {}
    mixture = ()
    if odors:
        changes.update(odors=(odors[0],), held_out_odors=())
        mixture = tuple(odors) if len(odors) > 1 else ()
    if concentration is not None:
        changes.update(peak_concentration=float(concentration), concentration_range=None)
    if plume is not None:
        changes.update(plume=plume, plumes=())
    if plume_length is not None:
        changes.update(plume_sigma_mm=float(plume_length), plume_d0_mm=float(plume_length),
                       plume_length_range_mm=None)
    if wind is not None:
        changes.update(wind=(float(wind), 0.0), wind_speed_range=None)
    if start_distance is not None:
        changes.update(start_distance_mm=tuple(start_distance), success_radius_mm=arena.success_radius)
    if start_heading is not None:
        changes.update(start_heading_offset_deg=float(start_heading))
    if stop_at_source is not None:
        changes.update(stop_at_source=bool(stop_at_source))
    if distractor:
        from dmn_neuro.experiments.choice_gradient import with_distractor

        cfg = with_distractor(cfg, distractor)
    if not changes:
        return cfg, mixture
    env = dataclasses.replace(cfg.environment, arena=dataclasses.replace(arena, **changes),
                              odors=() if odors else cfg.environment.odors)
    return cfg.with_values(environment=env), mixture


def standard_conditions(held_out_odors) -> List[Tuple[str, str, Dict[str, Any]]]:
    """``(name, group, evaluation_config kwargs + odor_removed)`` of every row."""
    rows = [("training conditions", "training", {})]
    rows += [(f"held-out odor: {o}", "held-out odor", {"odors": (o,)}) for o in held_out_odors]
    rows += [(f"concentration x{c:g}", "concentration", {"concentration": c}) for c in CONCENTRATIONS]
    rows += [(f"plume: {p}", "plume", {"plume": p}) for p in PLUMES]
    rows += [(f"wind {w:g} mm/s", "wind", {"wind": w}) for w in WINDS]
    rows += [("odor removed", "control", {"odor_removed": True}), ("untrained", "control", {"untrained": True})]
    return rows


def condition_table(checkpoint: os.PathLike, episodes: int = 50, seed: int = 12345, device: str = "cpu",
                    progress: Optional[Callable[[Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Success and final distance of ``checkpoint`` under every standard condition;
    ``progress(row)`` is called after each condition."""
    import torch

    from dmn_neuro.experiments.evaluation import locomotion_metrics
    from dmn_neuro.training.checkpoint import load_circuit
    from dmn_neuro.training.config import TrainingConfig, resolve_device
    from dmn_neuro.training.optimizer import build_components, evaluate_agent

    dev = resolve_device(device)
    circuit, ck = load_circuit(checkpoint, device=dev)
    cfg = TrainingConfig.from_dict(ck["meta"]["config"]).replace(device=device)
    if cfg.environment.task != "approach":
        from connectome.errors import ConfigError

        raise ConfigError(f"the condition table is for approach-task checkpoints; this one's task is "
                          f"{cfg.environment.task!r} (use --choice-gradient)")
    held = list(cfg.environment.held_out_odors)
    rows = []
    for name, group, kw in standard_conditions(held):
        kw = dict(kw)
        removed = kw.pop("odor_removed", False)
        untrained = kw.pop("untrained", False)
        ccfg, _ = evaluation_config(cfg, **kw)
        model = circuit
        if untrained:
            torch.manual_seed(cfg.seed)  # as `dmn-neuro train` does before building the circuit
            model = build_components(ccfg, device=dev)[0]
        _, _, arena, agent, _ = build_components(ccfg, circuit=model, device=dev)
        res = evaluate_agent(agent, ccfg, episodes, seed=seed, odor_removed=removed, device=dev, return_rollouts=True)
        loco = locomotion_metrics(res.pop("rollouts"), arena.success_radius, ccfg.circuit.dt_ms)
        rows.append({"condition": name, "group": group, "success_rate": res["success_rate"],
                     "reached_rate": loco["reached_goal_fraction"], "mean_speed_mm_s": loco["mean_speed_mm_s"],
                     "final_distance_mm": res["final_distance_to_goal_mean"], "kc_sparsity": res["kc_sparsity"],
                     "n_episodes": res["n_episodes"], "conditions": {**arena.config.conditions(), "odor_removed": removed}})
        if progress is not None:
            progress(rows[-1])
    return {"checkpoint": str(checkpoint), "episodes_per_condition": int(episodes), "seed": int(seed),
            "train_odors": list(cfg.environment.train_odors), "held_out_odors": held, "rows": rows,
            "acceptance": acceptance(rows)}


def acceptance(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Each acceptance line of the approach task: measured value, target, met."""
    by = {r["condition"]: r["success_rate"] for r in rows}
    group = lambda g: [r["success_rate"] for r in rows if r["group"] == g]  # noqa: E731
    out: Dict[str, Any] = {}

    def line(key, value, target, at_least=True):
        if value is None:
            return
        out[key] = {"value": float(value), "target": target, "met": bool(value >= target if at_least else value <= target)}

    line("training", by.get("training conditions"), TARGETS["training"])
    held = group("held-out odor")
    line("held_out_odors_mean", float(np.mean(held)) if held else None, TARGETS["held_out_odors_mean"])
    conc = group("concentration")
    line("each_concentration_min", min(conc) if conc else None, TARGETS["each_concentration"])
    plumes = group("plume")
    line("each_plume_min", min(plumes) if plumes else None, TARGETS["each_plume"])
    line("odor_removed", by.get("odor removed"), TARGETS["odor_removed_max"], at_least=False)
    line("untrained", by.get("untrained"), TARGETS["untrained_max"], at_least=False)
    return out


def markdown(table: Dict[str, Any]) -> str:
    lines = [f"Held-out episodes: {table['episodes_per_condition']} per condition, evaluation stream seed "
             f"{table['seed']} (never used in training or model selection). Checkpoint: `{table['checkpoint']}`.", "",
             "Success = within the success radius of the source at the end of the episode; reached = within it "
             "at any time.", "",
             "| condition | success | reached | final distance (mm) |", "|---|---|---|---|"]
    for r in table["rows"]:
        lines.append(f"| {r['condition']} | {r['success_rate']:.0%} | {r['reached_rate']:.0%} | "
                     f"{r['final_distance_mm']:.1f} |")
    lines += ["", "| acceptance line | measured | target | met |", "|---|---|---|---|"]
    for k, v in table["acceptance"].items():
        sign = "<=" if k in ("odor_removed", "untrained") else ">="
        lines.append(f"| {k} | {v['value']:.0%} | {sign} {v['target']:.0%} | {'yes' if v['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def write_condition_table(table: Dict[str, Any], out_dir: os.PathLike, title: Optional[str] = None) -> Path:
    """``conditions.json``, ``conditions.md`` and ``conditions.png`` in ``out_dir`` (atomic writes)."""
    from connectome.atomic import write_text
    from dmn_neuro.analysis import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots.write_json(out / "conditions.json", table)
    write_text(out / "conditions.md", markdown(table))
    plots.condition_table(table, out / "conditions.png", title=title)
    return out


__all__ = ["evaluation_config", "condition_table", "write_condition_table", "standard_conditions", "acceptance", "markdown",
           "CONCENTRATIONS", "PLUMES", "WINDS", "TARGETS"]
