"""``dmn-neuro embody CKPT``: a trained checkpoint's episodes in the NeuroMechFly body.

Each episode is drawn by the checkpoint's own arena (``reset`` on the generator
of ``(seed, episode, EMBODY_STREAM)``: a stream that training, validation and
``evaluate`` never use, so these source and start positions are held out), then
run twice:

* in the **body** (:class:`~dmn_neuro.embodiment.body.BodyArena`), through
  :meth:`NavigationAgent.rollout` (the stepped loop of evaluation: same encoder,
  same circuit step, same motor filter and drive map), ending when the thorax
  comes within the success radius or at the time limit;
* in the **arena** on the same start, source and noise draws, for comparison.

Success = within the success radius of the source at any step before the time
limit (both runs).  Episodes run in a local process pool, one body each.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from dmn_neuro.errors import DMNError
from dmn_neuro.training.optimizer import EMBODY_STREAM

EMBODY_SEED = 777


def _setup(checkpoint):
    from dmn_neuro.training.checkpoint import load_circuit
    from dmn_neuro.training.config import TrainingConfig
    from dmn_neuro.training.optimizer import build_components

    circuit, ck = load_circuit(checkpoint, device=torch.device("cpu"))
    cfg = TrainingConfig.from_dict(ck["meta"]["config"]).replace(device="cpu")
    if cfg.environment.task != "approach":
        raise DMNError(f"embody runs the approach task; {checkpoint} was trained on {cfg.environment.task!r}")
    _, _, arena, agent, _ = build_components(cfg, circuit=circuit, device=torch.device("cpu"))
    agent.circuit.eval()
    return cfg, arena, agent


def bearing_offset_deg(start, source, heading: float) -> float:
    """The start heading minus the bearing to the source, wrapped to (-180, 180] degrees."""
    bearing = math.atan2(source[1] - start[1], source[0] - start[0])
    off = math.degrees(heading - bearing) % 360.0
    return off - 360.0 if off > 180.0 else off


#: |start heading - bearing to the source| bins of the per-bearing breakdown (degrees)
BEARING_BINS = ((0.0, 60.0), (60.0, 120.0), (120.0, 180.0))


def _reached_at(positions: np.ndarray, source: np.ndarray, radius: float, dt_ms: float) -> Optional[float]:
    d = np.linalg.norm(positions[:, :2] - source[:2], axis=1)
    hit = np.nonzero(d <= radius)[0]
    return None if hit.size == 0 else float(hit[0] * dt_ms)


def run_episode(job) -> Dict:
    """One episode in the body and in the arena (a process-pool job)."""
    from dmn_neuro.embodiment.body import BodyArena
    from dmn_neuro.training.optimizer import episode_generator

    checkpoint, calibration, i, seed, steps, odor_removed, sensors, video = job
    torch.set_num_threads(1)
    cfg, arena, agent = _setup(checkpoint)
    T = int(steps or cfg.episode_length_steps)
    radius = arena.success_radius
    dt_ms = cfg.circuit.dt_ms
    g = episode_generator(seed, i, EMBODY_STREAM)
    env = arena.reset(1, generator=g)
    state = g.get_state()
    out: Dict = {"episode": i, "source": env.source[0].tolist(), "start": env.pos[0].tolist(),
                 "start_heading": float(env.heading[0]),
                 "start_bearing_offset_deg": bearing_offset_deg(env.pos[0].tolist(), env.source[0].tolist(),
                                                                float(env.heading[0]))}
    with torch.no_grad():
        ro = agent.rollout(1, T, g, env_state=env, closed_loop="stepped", odor_removed=odor_removed)
    arena_pos = ro.positions[:, 0].double().numpy()
    src = env.source[0].double().numpy()
    t_arena = _reached_at(arena_pos, src, radius, dt_ms)
    out["arena"] = {"success": t_arena is not None, "time_to_goal_ms": t_arena,
                    "final_distance_mm": float(np.linalg.norm(arena_pos[-1, :2] - src[:2]))}
    body = BodyArena(arena, calibration, sensors=sensors, video=video)
    g.set_state(state)  # the body's episode gets the arena episode's noise draws
    benv = body.start(env)
    agent.arena = body

    def reached(e):
        return float(torch.linalg.vector_norm(e.pos[0, :2] - e.source[0, :2])) <= radius

    wall = time.perf_counter()
    with torch.no_grad():
        bro = agent.rollout(1, T, g, env_state=benv, closed_loop="stepped", odor_removed=odor_removed, until=reached)
    wall = time.perf_counter() - wall
    pos = bro.positions[:, 0].double().numpy()
    t_body = _reached_at(pos, src, radius, dt_ms)
    sim_s = (pos.shape[0] - 1) * dt_ms * 1e-3
    out["body"] = {"success": t_body is not None, "time_to_goal_ms": t_body,
                   "final_distance_mm": float(np.linalg.norm(pos[-1, :2] - src[:2])),
                   "start_distance_mm": float(np.linalg.norm(pos[0, :2] - src[:2])),
                   "simulated_s": sim_s, "wall_s": wall, "physics_wall_s": body.wall_physics_s,
                   "simulated_s_per_wall_s": sim_s / wall if wall > 0 else None}
    out["body_positions"] = pos[:, :2].tolist()
    out["arena_positions"] = arena_pos[:, :2].tolist()
    out["mean_concentration"] = float(bro.concentration.double().mean())
    if video:
        body.save_video(video)
        out["video"] = str(video)
    return out


def _summary(eps: List[Dict], which: str) -> Dict:
    r = [e[which] for e in eps]
    ttg = [x["time_to_goal_ms"] for x in r if x["time_to_goal_ms"] is not None]
    fd = np.array([x["final_distance_mm"] for x in r])
    s = {"success_rate": float(np.mean([x["success"] for x in r])), "n_success": int(sum(x["success"] for x in r)),
         "final_distance_mm_mean": float(fd.mean()), "final_distance_mm_median": float(np.median(fd)),
         "final_distances_mm": fd.tolist(), "time_to_goal_ms_mean": float(np.mean(ttg)) if ttg else None}
    s["by_start_bearing"] = []
    for lo, hi in BEARING_BINS:  # the last bin includes 180
        hit = [x["success"] for x, e in zip(r, eps) if lo <= abs(e["start_bearing_offset_deg"]) < hi + (hi == 180.0)]
        s["by_start_bearing"].append({"abs_offset_deg": [lo, hi], "n": len(hit), "n_success": int(sum(hit))})
    if which == "body":
        sim = sum(x["simulated_s"] for x in r)
        wall = sum(x["wall_s"] for x in r)
        s.update(simulated_s=sim, wall_s=wall, simulated_s_per_wall_s=sim / wall if wall > 0 else None,
                 wall_s_per_simulated_s=wall / sim if sim > 0 else None)
    return s


def embody(checkpoint, calibration_path, episodes: int, out_dir, seed: int = EMBODY_SEED, steps: Optional[int] = None,
           odor_removed: bool = False, sensors: str = "auto", video: bool = False, workers: int = 2,
           progress: Optional[Callable[[int, int], None]] = None) -> Dict:
    """Run ``episodes`` episodes; write ``embody.json``, ``trajectories.png`` (and the video) to ``out_dir``."""
    from connectome.atomic import write_text
    from dmn_neuro.embodiment.body import BodyArena, map_bodies, require_flygym, trained_sensors
    from dmn_neuro.embodiment.calibration import load_calibration

    if episodes < 1:
        raise DMNError(f"--episodes must be >= 1, got {episodes}")
    calibration = load_calibration(calibration_path)
    cfg, arena, _ = _setup(checkpoint)  # validates the checkpoint before any body runs
    # refuses checkpoints the body cannot run; resolves --sensors auto
    sensors = BodyArena(arena, calibration, sensors=sensors).sensors
    trained = trained_sensors(calibration, arena.config)
    require_flygym()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(str(checkpoint), calibration, i, seed, steps, odor_removed, sensors, None) for i in range(episodes)]
    t0 = time.perf_counter()
    eps: List[Dict] = map_bodies(run_episode, jobs, workers, progress)
    report = {
        "checkpoint": str(checkpoint), "calibration": str(calibration_path), "episodes": episodes, "seed": seed,
        "episode_stream": EMBODY_STREAM, "held_out": "start and source positions drawn from an episode stream "
        "(seed, episode, stream 3) that training, validation and evaluate never use",
        "odor_removed": odor_removed, "sensors": sensors, "trained_sensors": trained, "time_limit_s": (steps or cfg.episode_length_steps)
        * cfg.circuit.dt_ms * 1e-3, "success_radius_mm": arena.success_radius,
        "success": "within the success radius at any step before the time limit",
        "body": _summary(eps, "body"), "arena_same_starts": _summary(eps, "arena"),
        "wall_s_total": time.perf_counter() - t0,
        "per_episode": [{k: v for k, v in e.items() if not k.endswith("_positions")} for e in eps],
    }
    if video:
        best = next((e for e in eps if e["body"]["success"]), eps[0])
        vpath = out_dir / f"episode_{best['episode']}.mp4"
        tmp = out_dir / f".episode_{best['episode']}.tmp.mp4"
        run_episode((str(checkpoint), calibration, best["episode"], seed, steps, odor_removed, sensors, tmp))
        tmp.replace(vpath)
        report["video"] = {"path": vpath.name, "episode": best["episode"], "body_success": best["body"]["success"]}
    plot_runs(eps, arena.success_radius, out_dir / "trajectories.png",
              title=f"{Path(checkpoint).name} in the body ({'odor removed' if odor_removed else 'odor'})")
    write_text(out_dir / "embody.json", json.dumps(report, indent=1))
    return report


def plot_runs(eps: List[Dict], radius: float, path, title: str = "") -> None:
    """Top view: each episode's body path (solid) and arena path (dotted) with its source."""
    from matplotlib.patches import Circle

    from dmn_neuro.analysis.plots import _plt, _save

    plt = _plt()
    n = len(eps)
    cols = min(5, n)
    rows = int(math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for ax, e in zip(axes.ravel(), eps):
        b, a, s = np.array(e["body_positions"]), np.array(e["arena_positions"]), e["source"]
        ax.plot(a[:, 0], a[:, 1], ":", color="0.5", lw=1)
        ax.plot(b[:, 0], b[:, 1], "-", color="C2" if e["body"]["success"] else "C3", lw=1.2)
        ax.plot(b[0, 0], b[0, 1], "o", color="k", ms=3)
        ax.add_patch(Circle((s[0], s[1]), radius, fill=False, ls="--", lw=0.7))
        ax.plot(s[0], s[1], "*", color="gold", ms=9, markeredgecolor="k", markeredgewidth=0.4)
        ax.set_aspect("equal")
        ax.set_title(f"ep {e['episode']} ({e['start_bearing_offset_deg']:+.0f} deg): "
                     f"body {'hit' if e['body']['success'] else 'miss'}, "
                     f"arena {'hit' if e['arena']['success'] else 'miss'}", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.suptitle(f"{title}  (solid: body, green = reached; dotted: arena, same start; "
                 f"start heading - bearing to the source in brackets)", fontsize=9)
    _save(fig, Path(path))


__all__ = ["EMBODY_SEED", "EMBODY_STREAM", "bearing_offset_deg", "embody", "plot_runs", "run_episode"]
