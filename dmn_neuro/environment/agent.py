"""Closed loop: the two-hemisphere fly in the odor arena.

Model assumption (documented in the README): the bundled connectome is one
hemisphere. The fly carries two mirror copies of it with *shared* weights; the
left copy is fed by the left antenna and the right copy by the right antenna
(plus an optional ``contralateral_fraction`` of the other antenna). The copies
are stacked along the batch axis (rows ``0..B-1`` left, ``B..2B-1`` right), so
one circuit call steps both.

Motor output is *crossed* by default (``crossed_motor=True``): the left
hemisphere's DNs drive the arena's right motor command and vice versa, so the
fly turns towards the side whose DNs are less active. With shared weights this
is what lets one circuit both steer towards an odor and stop at it: odor that
suppresses the tonic DN drive on the stronger side turns the fly towards it,
and suppression on both sides (at the source) stops it. ``crossed_motor=False``
gives ipsilateral control, with which the mirrored circuit can approach a
source but not stay at it (see tests/test_arena.py).
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Sequence

import torch
from torch import nn


class Rollout(NamedTuple):
    """One batch of closed-loop episodes.

    A named tuple (``ro.positions``, unpacking, ``ro[0]``) that can also be read
    as a mapping by field name, as in the design document:
    ``ro["positions"]``, ``ro.keys()``, ``dict(ro)``.
    """

    positions: torch.Tensor  # [T+1, B, 3]
    velocities: torch.Tensor  # [T, B, 3]
    activations: Dict[str, torch.Tensor]  # population -> spikes [T, 2B, n]
    source: torch.Tensor  # [B, 3]
    start: torch.Tensor  # [B, 3]
    odor: torch.Tensor  # [B]; [B, m] with m sources (choice task: target, distractor)
    concentration: torch.Tensor  # [T, B, 2]; [T, B, 2, m] with m sources

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self._fields:
                raise KeyError(key)
            return getattr(self, key)
        return tuple.__getitem__(self, key)

    def keys(self):
        """Field names, so ``dict(rollout)`` and ``**rollout`` give the mapping."""
        return self._fields

    def episode(self, i: int = 0) -> "Rollout":
        """Episode ``i`` without the batch axis: positions ``[T+1, 3]``, velocities
        ``[T, 3]``, source/start ``[3]``, odor a 0-d tensor, concentration ``[T, 2]``
        and each population's spikes ``[T, 2, n]`` (left, right hemisphere)."""
        B = int(self.positions.shape[1])
        if not -B <= i < B:
            raise IndexError(f"episode {i} out of range for a batch of {B}")
        i %= B
        return Rollout(
            positions=self.positions[:, i], velocities=self.velocities[:, i],
            activations={n: s[:, [i, B + i]] for n, s in self.activations.items()},
            source=self.source[i], start=self.start[i], odor=self.odor[i], concentration=self.concentration[:, i],
        )


#: ``"blocked"``: the circuit advances in skewed blocks on the engine between
#: arena updates (:mod:`dmn_neuro.simulation.engine.closed_loop`; same spikes);
#: ``"stepped"``: one :meth:`DifferentiableOlfactoryCircuit.step` per time step;
#: ``"auto"``: blocked where it applies (fused engine, no stepper, no truncated
#: BPTT, a circuit the blocked loop reproduces), stepped otherwise.
CLOSED_LOOPS = ("auto", "blocked", "stepped")


def _detach_tuple(t):
    return type(t)(*[(x.detach() if isinstance(x, torch.Tensor) else x) for x in t])


class NavigationAgent(nn.Module):
    """Couples a :class:`DifferentiableOlfactoryCircuit`, an :class:`OdorEncoder`
    and an :class:`OdorArena` into a differentiable closed loop."""

    def __init__(self, circuit, encoder, arena, contralateral_fraction: float = 0.0, crossed_motor: bool = True,
                 closed_loop: str = "auto") -> None:
        super().__init__()
        self.circuit = circuit
        self.encoder = encoder
        self.arena = arena
        self.contralateral_fraction = float(contralateral_fraction)
        self.crossed_motor = bool(crossed_motor)
        if closed_loop not in CLOSED_LOOPS:
            raise ValueError(f"closed_loop must be one of {CLOSED_LOOPS}, got {closed_loop!r}")
        #: how :meth:`rollout` runs the circuit (see there); "auto" by default
        self.closed_loop = closed_loop

    def sensory_input(self, env_state, generator: Optional[torch.Generator], odor_removed: bool = False,
                      level: Optional[torch.Tensor] = None):
        """ORN input currents for both hemispheres ``[2B, n_orn]``, the antenna
        concentrations ``[B, 2]`` and the encoder's next adaptation level ``[B]``
        (``None`` for a non-adapting encoder; pass it back in at the next step,
        ``None`` at the first step = adapted to the start)."""
        conc = self.arena.concentration(env_state)  # [B, 2] (left, right), [B, 2, m] for m sources (choice task)
        if odor_removed:
            conc = torch.zeros_like(conc)
        f = self.contralateral_fraction
        if f:
            conc = (1 - f) * conc + f * conc.flip(1)
        if self.encoder.adapting and level is None:
            level = self.encoder.adaptation_step(None, conc)
        both = torch.cat([conc[:, 0], conc[:, 1]], dim=0)
        odor = torch.cat([env_state.odor, env_state.odor], dim=0)
        rates = self.encoder.rates(odor, both, None if level is None else torch.cat([level, level]))
        return self.encoder.currents(rates, generator), conc, self.encoder.adaptation_step(level, conc)

    def rollout(
        self, batch_size: int, steps: int, generator: torch.Generator, *,
        device: Optional[torch.device] = None, odor_removed: bool = False,
        record: Sequence[str] = ("KC", "MBON", "DN"), tbptt_window: Optional[int] = None,
        env_state=None, stepper=None, closed_loop: Optional[str] = None, until=None,
    ) -> Rollout:
        """Run ``steps`` closed-loop steps for ``batch_size`` episodes.

        ``stepper``: optional replacement of the circuit (e.g. the Loihi fixed
        point emulator) with ``init_state(batch)`` and ``step(state, x_t) ->
        (spikes dict, state)``; used by ``dmn-neuro verify`` in closed loop.
        ``closed_loop`` (default ``self.closed_loop``): ``"blocked"``,
        ``"stepped"`` or ``"auto"`` (:data:`CLOSED_LOOPS`); both give the same
        spikes and trajectories, the blocked loop several times faster.
        ``until``: optional ``until(env_state) -> bool`` checked after each step
        of the stepped loop; the rollout ends early (fewer steps) when it holds
        (the embodied runs stop at the source).
        """
        mode = self.closed_loop if closed_loop is None else closed_loop
        if mode not in CLOSED_LOOPS:
            raise ValueError(f"closed_loop must be one of {CLOSED_LOOPS}, got {mode!r}")
        device = device or next(self.circuit.parameters()).device
        env = env_state if env_state is not None else self.arena.reset(batch_size, generator=generator, device=device)
        start = env.pos
        runner = None
        if mode != "stepped" and until is None and stepper is None and not tbptt_window and steps > 0 and (
                mode == "blocked" or getattr(self.circuit, "engine", None) == "fused"):
            build = getattr(self.circuit, "closed_loop_runner", None)
            runner = build(2 * batch_size, steps, like=env.pos) if build is not None else None
        if mode == "blocked" and runner is None:
            raise ValueError("closed_loop='blocked' needs the circuit's engine runner, no stepper and no tbptt_window")
        if runner is not None:
            return self._rollout_blocked(runner, env, start, batch_size, steps, generator, device, odor_removed, record)
        if stepper is None:
            cstate = self.circuit.init_state(2 * batch_size, like=env.pos)
            params = self.circuit.step_parameters()
        else:
            cstate = stepper.init_state(2 * batch_size)
        noise_gen = None
        if self.encoder.encoding == "poisson":
            noise_gen = torch.Generator(device=device)
            noise_gen.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator).item()))
        positions, velocities, concs = [env.pos], [], []
        rec = {n: [] for n in record}
        level = None
        for t in range(steps):
            if tbptt_window and t > 0 and t % tbptt_window == 0:
                cstate = _detach_tuple(type(cstate)({k: v.detach() for k, v in cstate.mem.items()},
                                                    {k: v.detach() for k, v in cstate.spikes.items()}))
                env = _detach_tuple(env)
                level = None if level is None else level.detach()
            x, conc, level = self.sensory_input(env, noise_gen, odor_removed, level)
            if stepper is None:
                spk, cstate = self.circuit.step(x, cstate, params)
            else:
                spk, cstate = stepper.step(cstate, x.double())
                spk = {k: v.to(x.dtype) for k, v in spk.items()}
            dn = spk[self.circuit.output_population]
            left, right = dn[:batch_size], dn[batch_size:]
            env, vel = self.arena.step(env, right, left) if self.crossed_motor else self.arena.step(env, left, right)
            positions.append(env.pos)
            velocities.append(vel)
            concs.append(conc)
            for n in record:
                rec[n].append(spk[n])
            if until is not None and until(env):
                break
        return Rollout(
            positions=torch.stack(positions), velocities=torch.stack(velocities),
            activations={n: torch.stack(v) for n, v in rec.items()}, source=env.source, start=start,
            odor=env.odor, concentration=torch.stack(concs),
        )

    def _rollout_blocked(self, runner, env, start, batch_size, steps, generator, device, odor_removed, record):
        """:meth:`rollout` with the circuit advanced in skewed blocks (same spikes, same
        random draws in the same order: the arena and the encoder still step once
        per time step, only the circuit runs ``runner.block`` steps per call)."""
        noise_gen = None
        if self.encoder.encoding == "poisson":
            noise_gen = torch.Generator(device=device)
            noise_gen.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator).item()))
        out = self.circuit.output_population
        positions, velocities, concs = [env.pos], [], []

        def arena_step(env, t):
            dn = runner.step_spikes(out, t)
            left, right = dn[:batch_size], dn[batch_size:]
            env, vel = self.arena.step(env, right, left) if self.crossed_motor else self.arena.step(env, left, right)
            positions.append(env.pos)
            velocities.append(vel)
            return env

        runner.advance(None)  # the steps of the downstream groups that need no input yet
        t, level = 0, None
        while t < steps:
            hi = min(steps, t + runner.block)
            xs = []
            for s in range(t, hi):
                if s > 0:
                    env = arena_step(env, s - 1)
                x, conc, level = self.sensory_input(env, noise_gen, odor_removed, level)
                xs.append(x)
                concs.append(conc)
            runner.advance(torch.stack(xs))
            t = hi
        env = arena_step(env, steps - 1)
        return Rollout(
            positions=torch.stack(positions), velocities=torch.stack(velocities),
            activations={n: runner.spikes(n) for n in record}, source=env.source, start=start,
            odor=env.odor, concentration=torch.stack(concs),
        )
