"""The trained circuit in the NeuroMechFly body (flygym-gymnasium; ``make embody-env``).

``calibration``: measure the body's speed and turning rate per descending drive
and its odor-sensor geometry, the table the arena's motor model takes;
``body``: the body behind the arena's interface; ``run``: episodes of a trained
checkpoint in the body (``dmn-neuro embody``).
"""
from connectome.lazy import lazy_exports

_EXPORTS = {
    "BodyArena": "dmn_neuro.embodiment.body",
    "make_body": "dmn_neuro.embodiment.body",
    "calibrate": "dmn_neuro.embodiment.calibration",
    "load_calibration": "dmn_neuro.embodiment.calibration",
    "compare": "dmn_neuro.embodiment.calibration",
    "embody": "dmn_neuro.embodiment.run",
    "run_episode": "dmn_neuro.embodiment.run",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
