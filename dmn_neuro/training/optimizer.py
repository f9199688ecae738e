"""BPTT training of the olfactory circuit in the closed-loop odor arena.

Determinism: the randomness of training episode ``k`` (source positions, start
poses, odor identities, Poisson input) comes from a generator seeded with
``(config.seed, k)`` alone, so a run resumed from a checkpoint continues
exactly as the uninterrupted run would have.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from dmn_neuro.training import checkpoint as ckpt
from dmn_neuro.environment.agent import NavigationAgent, Rollout
from dmn_neuro.training.config import TrainingConfig, resolve_device
from dmn_neuro.errors import CheckpointError, TrainingError

logger = logging.getLogger(__name__)

TRAIN_STREAM = 0
EVAL_STREAM = 1
#: Validation episodes (model selection during training) come from their own
#: stream so they never overlap the held-out evaluation episodes.
VALIDATION_STREAM = 2
VALIDATION_SEED = 2024
#: Episodes run in the NeuroMechFly body (``dmn-neuro embody``).
EMBODY_STREAM = 3


def held_out_declaration(config) -> Dict[str, Any]:
    """What a checkpoint trained with ``config`` never saw (stored in every checkpoint's ``extra``)."""
    env = config.environment
    return {
        "episode_streams": {"training": TRAIN_STREAM, "evaluate": EVAL_STREAM, "validation": VALIDATION_STREAM,
                            "embody": EMBODY_STREAM},
        "episodes": "each episode's sources, starts and noise are drawn from (seed, episode, stream); training "
                    "draws only the training stream, model selection only the validation stream, so evaluate and "
                    "embody episodes are held out",
        "training_seed": int(config.seed), "validation_seed": VALIDATION_SEED,
        "validation_episodes": int(config.eval_episodes),
        "selection": "checkpoints/best: highest validation success, ties by smaller final distance"
                     if config.eval_episodes else "checkpoints/best: lowest training loss (no validation episodes)",
        "train_odors": list(env.train_odors), "held_out_odors": list(env.held_out_odors),
    }


def episode_generator(seed: int, episode: int, stream: int = TRAIN_STREAM) -> torch.Generator:
    """CPU generator for one episode, a pure function of (seed, episode, stream)."""
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + int(episode) * 7919 + stream * 104_729) % (2**63 - 1))
    return g


def default_current_per_hz(circuit) -> float:
    """ORN input gain: a 1 kHz rate for 1 s charges 3 thresholds (rate encoding)."""
    return 3.0 * float(circuit.cells[circuit.input_population].threshold.detach().mean())


def build_components(config: TrainingConfig, circuit=None, device=None):
    """Circuit, encoder, arena, agent and loss from a config (the CLI and tests use this).

    Each comes from its config section: the circuit from ``connectome`` and
    ``circuit``, encoder, arena and agent from ``environment``, the loss from ``loss``.
    """
    from dmn_neuro.environment.arena import OdorArena
    from dmn_neuro.simulation.mechanism import DifferentiableOlfactoryCircuit
    from dmn_neuro.training.loss_functions import CombinedLoss
    from dmn_neuro.environment.odors import OdorEncoder

    device = device or resolve_device(config.device)
    cc, env = config.circuit, config.environment
    if circuit is None:
        circuit = DifferentiableOlfactoryCircuit.from_connectome(
            source=config.connectome.source, source_options=config.connectome.resolved_source_options(),
            variant=config.connectome.variant, dt_ms=cc.dt_ms,
            learnable_tau=cc.learnable_tau, learnable_threshold=cc.learnable_threshold,
            surrogate=cc.surrogate, surrogate_slope=cc.surrogate_slope,
            projection_gains=cc.projection_gains, engine=cc.engine, bias=cc.bias,
            threshold_jitter=cc.threshold_jitter, seed=config.seed,
        )
    circuit = circuit.to(device)
    enc_kw: Dict[str, Any] = {"dt_ms": cc.dt_ms, "encoding": env.encoding, "hill_k": env.hill_k,
                              "adaptation_tau_ms": env.adaptation_tau_ms, "adaptation_floor": env.adaptation_floor,
                              "adaptation_level": env.adaptation_level}
    # Default input gain: 3 ORN thresholds per 1000 Hz (see README, "Odor input").
    enc_kw["current_per_hz"] = env.current_per_hz or default_current_per_hz(circuit)
    encoder = OdorEncoder(circuit.orn_glomeruli, odors=list(env.odors) or None, **enc_kw).to(device)
    if env.task == "choice":
        from dmn_neuro.environment.choice import ChoiceArena

        arena = ChoiceArena(env.arena_config(), env.choice, dt_ms=cc.dt_ms, encoder=encoder)
    else:
        arena = OdorArena(env.arena_config(), dt_ms=cc.dt_ms, encoder=encoder)
    agent = NavigationAgent(circuit, encoder, arena, env.contralateral_fraction, env.crossed_motor)
    lc = config.loss
    loss_fn = CombinedLoss(
        navigation_weight=lc.navigation_weight, energy_weight=lc.energy_weight,
        sparsity_weight=lc.sparsity_weight, activity_weight=lc.activity_weight,
        goal_position=tuple(arena.config.goal_mm), kc_sparsity_target=lc.kc_sparsity_target, dt_ms=cc.dt_ms,
        log_distance_weight=lc.log_distance_weight,
    )
    return circuit, encoder, arena, agent, loss_fn


class DMNTrainer:
    """Trains a circuit by BPTT through the closed loop.

    Args:
        circuit: the :class:`DifferentiableOlfactoryCircuit` to train.
        loss_fn: a :class:`~dmn_neuro.training.loss_functions.CombinedLoss`.
        config: :class:`TrainingConfig`.
        environment: the :class:`~dmn_neuro.environment.arena.OdorArena` (built from the config if omitted).
        encoder: the :class:`~dmn_neuro.environment.odors.OdorEncoder` (built from the config if omitted).
    """

    def __init__(self, circuit, loss_fn, config: TrainingConfig, environment=None, encoder=None) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        if environment is None or encoder is None:
            _, enc, env, _, _ = build_components(config, circuit=circuit, device=self.device)
            environment = environment or env
            encoder = encoder or enc
        self.circuit = circuit.to(self.device)
        self.loss_fn = loss_fn
        self.environment = environment
        self.encoder = encoder
        self.agent = NavigationAgent(self.circuit, encoder, environment, config.environment.contralateral_fraction,
                                     config.environment.crossed_motor)
        self.optimizer = self._make_optimizer()
        self.episode = 0
        self.loss_history: List[Dict[str, float]] = []
        self.best_loss = math.inf
        self.best_score = None
        self.last_good_path: Optional[Path] = None

    def learning_rate_at(self, episode: int) -> float:
        """Learning rate of ``episode``: constant, or cosine-decayed to
        ``lr_final_fraction`` of the initial rate over ``num_episodes``. A pure
        function of the episode index, so resumed runs follow the same schedule."""
        opt = self.config.optimisation
        lr = opt.learning_rate
        if opt.lr_schedule == "constant" or self.config.num_episodes <= 1:
            return lr
        frac = min(max(episode / (self.config.num_episodes - 1), 0.0), 1.0)
        lo = opt.lr_final_fraction
        return lr * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * frac)))

    def _make_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.circuit.parameters() if p.requires_grad]
        lr = self.config.optimisation.learning_rate
        if self.config.optimisation.optimizer == "adam":
            return torch.optim.Adam(params, lr=lr)
        if self.config.optimisation.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
        return torch.optim.SGD(params, lr=lr, momentum=0.9)

    # -- rollouts ------------------------------------------------------------
    def rollout_episode(
        self, episode_length: Optional[int] = None, batch_size: Optional[int] = None, seed: Optional[int] = None,
        episode: Optional[int] = None, stream: int = EVAL_STREAM, odor_removed: bool = False, grad: bool = False,
    ) -> Rollout:
        """Simulate arena episodes (no gradient unless ``grad``).

        Returns a :class:`~dmn_neuro.environment.agent.Rollout`, readable by
        attribute or by key: ``ro.positions`` is ``ro["positions"]``. With
        ``batch_size`` it holds that many episodes (``[T+1, B, 3]`` positions,
        ``[T, B, 3]`` velocities); without, one episode without the batch axis
        (``[T+1, 3]`` / ``[T, 3]``: the design document's single trajectory).
        """
        T = int(episode_length or self.config.episode_length_steps)
        B = 1 if batch_size is None else int(batch_size)
        g = episode_generator(self.config.seed if seed is None else seed, self.episode if episode is None else episode, stream)
        with torch.set_grad_enabled(grad):
            ro = self.agent.rollout(B, T, g, device=self.device, odor_removed=odor_removed,
                                    tbptt_window=self.config.optimisation.tbptt_window if grad else None)
        return ro if batch_size is not None else ro.episode(0)

    def compute_loss(self, ro: Rollout) -> Dict[str, torch.Tensor]:
        return self.loss_fn(ro.positions[1:], ro.velocities, ro.activations, goal=ro.source, start_positions=ro.start)

    # -- training ------------------------------------------------------------
    def train_episode(
        self, num_episodes: int = 1, out_dir: Optional[os.PathLike] = None,
        progress: Optional[Callable[[Dict[str, float]], None]] = None,
    ) -> List[Dict[str, float]]:
        """Run ``num_episodes`` optimiser steps; returns their loss records.

        With ``out_dir``: appends per-episode metrics to ``metrics.jsonl`` and
        writes ``checkpoints/last`` every ``checkpoint_every`` episodes and
        ``checkpoints/best`` on improvement. A NaN/Inf loss or gradient stops
        training with :class:`TrainingError`; the last good checkpoint stays.
        """
        out = Path(out_dir) if out_dir is not None else None
        records: List[Dict[str, float]] = []
        for _ in range(int(num_episodes)):
            t0 = time.perf_counter()
            self.circuit.train()
            ro = self.rollout_episode(batch_size=self.config.batch_size, episode=self.episode, stream=TRAIN_STREAM,
                                      grad=True)
            terms = self.compute_loss(ro)
            total = terms["total"]
            if not torch.isfinite(total):
                raise TrainingError(self._nan_message("loss", self.episode))
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            grads = [p.grad for p in self.circuit.parameters() if p.grad is not None]
            if any(not torch.all(torch.isfinite(g)) for g in grads):
                raise TrainingError(self._nan_message("gradient", self.episode))
            if self.config.optimisation.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.circuit.parameters(), self.config.optimisation.grad_clip)
            for group in self.optimizer.param_groups:
                group["lr"] = self.learning_rate_at(self.episode)
            self.optimizer.step()
            self.circuit.check_finite()
            rec = {k: float(v.detach()) for k, v in terms.items()}
            with torch.no_grad():
                d_final = (ro.positions[-1, :, :2] - ro.source[:, :2]).norm(dim=-1)
                rec["final_distance_mm"] = float(d_final.mean())
                rec["success_rate"] = float((d_final <= self.environment.success_radius).float().mean())
                rec["kc_sparsity"] = float(self.loss_fn.kc_population_sparsity(ro.activations["KC"]))
            rec["episode"] = self.episode
            rec["seconds"] = time.perf_counter() - t0
            self.episode += 1
            self.loss_history.append({"episode": rec["episode"], "total": rec["total"]})
            records.append(rec)
            if progress is not None:
                progress(rec)
            validate = self.config.eval_episodes > 0 and self.episode % self.config.checkpoint_every == 0
            if validate:
                val = self.evaluate(self.config.eval_episodes, seed=VALIDATION_SEED, stream=VALIDATION_STREAM)
                rec["val_success_rate"] = val["success_rate"]
                rec["val_final_distance_mm"] = val["final_distance_to_goal_mean"]
            if out is not None:
                self._log_metrics(out, rec)
                # Best = highest validation success (ties: smaller final distance);
                # without validation, lowest training loss.
                score = (-rec["val_success_rate"], rec["val_final_distance_mm"]) if validate else None
                if validate and (self.best_score is None or score < self.best_score):
                    self.best_score = score
                    self.save_checkpoint(out / "checkpoints" / "best", metrics={"validation": val})
                elif not self.config.eval_episodes and rec["total"] < self.best_loss:
                    self.best_loss = rec["total"]
                    self.save_checkpoint(out / "checkpoints" / "best")
                if self.episode % self.config.checkpoint_every == 0:
                    self.save_checkpoint(out / "checkpoints" / "last")
        return records

    def _nan_message(self, what: str, episode: int) -> str:
        where = f"; last good checkpoint: {self.last_good_path}" if self.last_good_path else ""
        return f"training stopped: {what} became NaN/Inf at episode {episode}{where}"

    @staticmethod
    def _log_metrics(out: Path, rec: Dict[str, float]) -> None:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    # -- checkpoints ---------------------------------------------------------
    def save_checkpoint(self, path: os.PathLike, metrics: Optional[Dict[str, Any]] = None) -> Path:
        """Save model, optimiser, episode counter, loss history and RNG state.

        A directory of safetensors + JSON files, or for a path ending in ``.pt``
        (``trainer.save_checkpoint("best_model.pt")``) one file holding the same
        files (see :mod:`dmn_neuro.training.checkpoint`); both load with
        :meth:`load_checkpoint` and :func:`~dmn_neuro.training.checkpoint.load_circuit`.
        """
        rng = {"torch_cpu": torch.get_rng_state()}
        p = ckpt.save_checkpoint(path, self.circuit, self.config, self.episode, self.optimizer,
                                 self.loss_history, metrics, rng,
                                 extra={"best_loss": self.best_loss, "best_score": self.best_score,
                                        "held_out": held_out_declaration(self.config)})
        self.last_good_path = p
        return p

    def load_checkpoint(self, path: os.PathLike) -> None:
        """Restore model, optimiser, episode counter, loss history and RNG state."""
        circuit, ck = ckpt.load_circuit(path, device=self.device, engine=self.circuit.engine)
        # --init-from / --resume of another circuit (another source, other options):
        # say what differs instead of failing deep inside load_state_dict.
        diff = ckpt.structure_difference(circuit.structure, self.circuit.structure)
        if diff is not None:
            raise CheckpointError(f"checkpoint {path} is not the configured circuit: {diff}")
        try:
            self.circuit.load_state_dict(circuit.state_dict())
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint {path} does not fit the configured circuit "
                                  f"({str(exc).splitlines()[0]})") from None
        ckpt.restore_optimizer(self.optimizer, ck)
        meta = ck["meta"]
        self.episode = int(meta.get("episode", 0))
        self.loss_history = list(meta.get("loss_history", []))
        self.best_loss = float(meta.get("extra", {}).get("best_loss", math.inf))
        bs = meta.get("extra", {}).get("best_score")
        self.best_score = tuple(bs) if bs is not None else None
        if ck.get("rng") and "torch_cpu" in ck["rng"]:
            torch.set_rng_state(ck["rng"]["torch_cpu"])
        self.last_good_path = Path(path)

    # -- evaluation ----------------------------------------------------------
    def evaluate(self, n_episodes: int = 50, seed: int = 12345, odor_removed: bool = False,
                 episode_length: Optional[int] = None, batch_size: int = 25, stream: int = EVAL_STREAM) -> Dict[str, Any]:
        """Held-out episodes (stream EVAL, a seed not used in training)."""
        was_training = self.circuit.training
        try:
            return evaluate_agent(self.agent, self.config, n_episodes, seed, odor_removed, episode_length, batch_size,
                                  device=self.device, stream=stream)
        finally:
            self.circuit.train(was_training)


def evaluate_agent(agent: NavigationAgent, config: TrainingConfig, n_episodes: int = 50, seed: int = 12345,
                   odor_removed: bool = False, episode_length: Optional[int] = None, batch_size: int = 25,
                   device=None, return_rollouts: bool = False, stream: int = EVAL_STREAM,
                   stepper=None, return_start_states: bool = False) -> Dict[str, Any]:
    """Success and distances over ``n_episodes`` episodes of ``stream`` (chunks of
    ``batch_size``, each from its own seeded generator). ``stepper`` replaces the
    circuit in the loop (e.g. the Loihi fixed-point emulator). In the choice task
    success is a correct choice, and ``choice`` holds the correct / wrong / none
    rates (:func:`~dmn_neuro.environment.choice.choice_metrics`). ``return_rollouts`` /
    ``return_start_states`` add each chunk's :class:`Rollout` / start :class:`EnvState` (its drawn conditions)."""
    from dmn_neuro.training.loss_functions import TrajectoryAnalyzer

    T = int(episode_length or config.episode_length_steps)
    analyzer = TrajectoryAnalyzer()
    radius = agent.arena.success_radius
    finals, means, succ, sparsity, rollouts, starts, codes = [], [], [], [], [], [], []
    choices = getattr(agent.arena, "choices", None)  # the choice task: which source each episode ended at
    done, chunk = 0, 0
    agent.circuit.eval()
    while done < n_episodes:
        b = min(batch_size, n_episodes - done)
        g = episode_generator(seed, chunk, stream)
        with torch.no_grad():
            # the same draws as rollout's own reset; kept to read the distractor positions
            env = agent.arena.reset(b, generator=g, device=device or next(agent.circuit.parameters()).device)
            ro = agent.rollout(b, T, g, device=device, odor_removed=odor_removed, stepper=stepper, env_state=env)
        if choices is not None:
            codes.append(choices(ro.positions[-1], env))
        m = analyzer.compute_trajectory_metrics(ro.positions, ro.velocities, ro.source, success_radius_mm=radius,
                                                dt_ms=config.circuit.dt_ms)
        finals.append(np.atleast_1d(np.asarray(m["final_distance_to_goal"], dtype=float)))
        means.append(np.atleast_1d(np.asarray(m["mean_distance_to_goal"], dtype=float)))
        succ.append(np.atleast_1d(np.asarray(m["success"], dtype=float)))
        sparsity.append(float(agent_loss_sparsity(ro)))
        if return_rollouts:
            rollouts.append(ro)
        if return_start_states:
            starts.append(env)
        done += b
        chunk += 1
    finals_a, succ_a = np.concatenate(finals), np.concatenate(succ)
    out = {
        "n_episodes": int(n_episodes), "seed": int(seed), "odor_removed": bool(odor_removed), "episode_length_steps": T,
        "success_radius_mm": float(radius), "success_rate": float(succ_a.mean()),
        "final_distance_to_goal_mean": float(finals_a.mean()),
        "mean_distance_to_goal_mean": float(np.concatenate(means).mean()),
        "kc_sparsity": float(np.mean(sparsity)), "kc_sparsity_target": float(config.loss.kc_sparsity_target),
    }
    if codes:
        from dmn_neuro.environment.choice import choice_metrics

        out["choice"] = choice_metrics(torch.cat(codes))  # correct_rate == success_rate
    if return_rollouts:
        out["rollouts"] = rollouts
    if return_start_states:
        out["start_states"] = starts
    return out


def agent_loss_sparsity(ro: Rollout) -> float:
    from dmn_neuro.training.loss_functions import kc_population_sparsity

    return float(kc_population_sparsity(ro.activations["KC"]))


# -- first training loop: ``python -m dmn_neuro.training.optimizer`` ---------------------
#: A config small enough to train in seconds on a CPU (the bundled FlyWire
#: mushroom body; 60 steps of 2 ms, batch 2). Behaviour only: a handful of
#: episodes does not teach the circuit to navigate.
FIRST_RUN_CONFIG = dict(
    episode_length_steps=60, batch_size=2, seed=0, device="cpu", checkpoint_every=1000,
    circuit={"dt_ms": 2.0, "projection_gains": {"ORN->PN": 3.0, "KC->MBON": 50.0}, "bias": {"DN": 0.5}},
    environment={"encoding": "poisson"},
)


def main(argv: Optional[List[str]] = None) -> Path:
    """Run a short first training loop with a progress bar; returns the checkpoint path."""
    import argparse

    from tqdm import tqdm

    p = argparse.ArgumentParser(
        prog="python -m dmn_neuro.training.optimizer",
        description="First training loop: a few BPTT episodes of a tiny config on the bundled connectome. "
                    "Writes OUT/metrics.jsonl and OUT/checkpoints/{best,last}.")
    p.add_argument("--episodes", type=int, default=5, help="training episodes (optimiser steps) [5]")
    p.add_argument("--out", type=Path, default=Path("dmn_first_run"), help="run directory [./dmn_first_run]")
    p.add_argument("--steps", type=int, default=None, help="episode length in steps [60]")
    p.add_argument("--batch-size", type=int, default=None, help="arena episodes per optimiser step [2]")
    p.add_argument("--config", type=Path, default=None, help="TrainingConfig YAML instead of the tiny built-in one")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    args = p.parse_args(argv)
    if args.episodes < 1:
        p.error(f"--episodes must be >= 1, got {args.episodes}")
    if args.threads:
        torch.set_num_threads(args.threads)
    base = TrainingConfig.from_yaml(args.config) if args.config else TrainingConfig(**FIRST_RUN_CONFIG)
    cfg = base.replace(num_episodes=args.episodes, episode_length_steps=args.steps, batch_size=args.batch_size)
    torch.manual_seed(cfg.seed)
    circuit, encoder, arena, _agent, loss_fn = build_components(cfg)
    trainer = DMNTrainer(circuit, loss_fn, cfg, environment=arena, encoder=encoder)
    out = Path(args.out)
    if (out / "metrics.jsonl").exists():
        p.error(f"{out} already holds a run; choose another --out")
    with tqdm(total=cfg.num_episodes, desc="training", unit="episode") as bar:
        def progress(rec: Dict[str, float]) -> None:
            bar.set_postfix(loss=f"{rec['total']:.3f}", success=f"{rec['success_rate']:.2f}")
            bar.update(1)

        trainer.train_episode(cfg.num_episodes, out_dir=out, progress=progress)
    path = trainer.save_checkpoint(out / "checkpoints" / "last")
    print(f"wrote checkpoint {path} (episode {trainer.episode}); evaluate it with: "
          f"python -m dmn_neuro.cli evaluate {path}")
    return path


if __name__ == "__main__":  # pragma: no cover - exercised as a subprocess in the tests
    main()
