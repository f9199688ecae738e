"""The task: real odors (Hallem & Carlson ORN responses), the differentiable odor
arena, and the closed loop that couples the two-hemisphere fly to it.

Names are imported on first use.
"""
from connectome.lazy import lazy_exports

_EXPORTS = {
    "OdorEncoder": "dmn_neuro.environment.odors",
    "HallemCarlson": "dmn_neuro.environment.odors",
    "load_hallem_carlson": "dmn_neuro.environment.odors",
    "static_odor_input": "dmn_neuro.environment.odors",
    "ArenaConfig": "dmn_neuro.environment.arena",
    "OdorArena": "dmn_neuro.environment.arena",
    "EnvState": "dmn_neuro.environment.arena",
    "NavigationAgent": "dmn_neuro.environment.agent",
    "Rollout": "dmn_neuro.environment.agent",
    "MotorTable": "dmn_neuro.environment.motor",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
