"""The choice task's generalisation gradient: choice accuracy against distractor-target similarity.

For every declared distractor of a choice checkpoint -- the held-out ones and
the training ones, marked as such -- the same ``episodes`` evaluation-stream
episodes (seed ``seed``: the same geometries and start poses for every
distractor, a stream never used in training or validation) are run with that
distractor in every episode. Per distractor: its similarity to the target
(:func:`~dmn_neuro.environment.choice.odor_similarity`, the Pearson correlation
of the two odors' Hallem & Carlson response vectors over the 24 receptors),
the correct / wrong / none rates and the accuracy among episodes that chose.
The summary's headline is the mean correct rate over held-out distractors with
similarity below ``threshold`` (0.8), the acceptance measure of the task.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional

import numpy as np

from dmn_neuro.errors import ConfigError

SIMILARITY = ("Pearson correlation of the two odors' Hallem & Carlson 2006 response vectors "
              "(spike-rate changes at the 10^-2 dilution) over the 24 receptors")
THRESHOLD = 0.8
ACCEPTANCE = 0.75


def with_distractor(cfg, name: str):
    """``cfg`` (a choice config) with ``name`` the distractor of every episode (held-out declaration dropped:
    this arena is for evaluation only)."""
    env = cfg.environment
    if env.task != "choice":
        raise ConfigError(f"--distractor needs a choice-task checkpoint; this one's task is {env.task!r}")
    choice = dataclasses.replace(env.choice, distractors=(name,), held_out_distractors=())
    return cfg.with_values(environment=dataclasses.replace(env, choice=choice))


def _mean(rows, key):
    vals = [r[key] for r in rows if r[key] is not None]
    return float(np.mean(vals)) if vals else None


def _summary(rows) -> Dict[str, Any]:
    return {"n_odors": len(rows), "odors": [r["odor"] for r in rows],
            **{f"mean_{k}": _mean(rows, k) for k in ("correct_rate", "wrong_rate", "none_rate",
                                                      "accuracy_among_chosen")}}


def choice_gradient(agent, cfg, episodes: int = 50, seed: int = 12345, episode_length: Optional[int] = None,
                    device=None, progress: Callable[[str, Dict[str, Any]], None] = lambda odor, row: None,
                    threshold: float = THRESHOLD, batch_size: int = 25) -> Dict[str, Any]:
    """Run the gradient for ``agent`` (built from the choice config ``cfg``); returns the JSON-safe result.
    Episodes run in chunks of ``batch_size`` (the chunk size picks the episodes: chunk ``k`` draws from
    ``episode_generator(seed, k, EVAL_STREAM)``); the default is ``evaluate``'s, so that
    ``dmn-neuro evaluate CKPT --distractor NAME`` reproduces a row."""
    from dmn_neuro.environment.choice import ChoiceArena, odor_similarity
    from dmn_neuro.environment.odors import load_hallem_carlson
    from dmn_neuro.training.optimizer import EVAL_STREAM, evaluate_agent

    env = cfg.environment
    if env.task != "choice":
        raise ConfigError(f"--choice-gradient needs a choice-task checkpoint; this one's task is {env.task!r}")
    choice, base = env.choice, agent.arena
    data = load_hallem_carlson()
    rows = []
    try:
        for held_out, names in ((True, choice.held_out_distractors), (False, choice.distractors)):
            for name in names:
                fixed = dataclasses.replace(choice, distractors=(name,), held_out_distractors=())
                agent.arena = ChoiceArena(base.config, fixed, dt_ms=base.dt_ms, encoder=agent.encoder)
                res = evaluate_agent(agent, cfg, episodes, seed=seed, episode_length=episode_length, device=device,
                                     stream=EVAL_STREAM, batch_size=batch_size)
                row = {"odor": name, "similarity": odor_similarity(choice.target_odor, name, data),
                       "held_out": held_out, **res["choice"]}
                rows.append(row)
                progress(name, row)
    finally:
        agent.arena = base
    held = [r for r in rows if r["held_out"]]
    below = [r for r in held if r["similarity"] < threshold]
    headline = _mean(below, "correct_rate")
    return {
        "target_odor": choice.target_odor, "similarity_definition": SIMILARITY, "similarity_threshold": threshold,
        "episodes_per_distractor": int(episodes), "seed": int(seed), "batch_size": int(batch_size),
        "stream": "evaluation (held-out episodes)",
        "episode_length_steps": int(episode_length or cfg.episode_length_steps),
        "success_radius_mm": float(base.success_radius),
        "choice_definition": "target: final position within the success radius of the target; distractor: within "
                             "it of the distractor; none: neither" + (
                                 " (stop_at_source, the trap rule: the fly stops at the first source whose radius "
                                 "it enters)" if base.config.stop_at_source else ""),
        "stop_at_source": bool(base.config.stop_at_source),
        "distractors": rows,
        "summary": {"held_out_below_threshold": _summary(below), "held_out_all": _summary(held),
                    "training_below_threshold": _summary([r for r in rows if not r["held_out"]
                                                          and r["similarity"] < threshold]),
                    "training_all": _summary([r for r in rows if not r["held_out"]])},
        "acceptance": {"criterion": f"mean correct rate >= {ACCEPTANCE} over held-out distractors with "
                                    f"similarity < {threshold}",
                       "mean_correct_rate": headline, "passed": bool(headline is not None and headline >= ACCEPTANCE)},
    }


__all__ = ["choice_gradient", "with_distractor", "SIMILARITY", "THRESHOLD", "ACCEPTANCE"]
