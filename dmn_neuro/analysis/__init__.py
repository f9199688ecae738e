"""What a trained circuit does and how it relates to the wiring: open-loop
recordings, closed-loop success with the circuit or a stand-in for it, learned
weights vs synapse counts, KC odor coding, lesions without retraining, activity
manifolds (``dmn-neuro analyze``), and the figures and JSON written next to results.

Names are imported on first use.
"""
from connectome.lazy import lazy_exports

_EXPORTS = {
    "run_open_loop": "dmn_neuro.analysis.recording",
    "run_checkpoint": "dmn_neuro.analysis.recording",
    "load_input_array": "dmn_neuro.analysis.recording",
    "save_spikes": "dmn_neuro.analysis.recording",
    "odor_input": "dmn_neuro.analysis.recording",
    "verification_input": "dmn_neuro.analysis.recording",
    "default_odors": "dmn_neuro.analysis.recording",
    "closed_loop_success": "dmn_neuro.analysis.recording",
    "loss_curves": "dmn_neuro.analysis.plots",
    "trajectories": "dmn_neuro.analysis.plots",
    "trajectories_before_after": "dmn_neuro.analysis.plots",
    "write_json": "dmn_neuro.analysis.plots",
    "analyze_checkpoint": "dmn_neuro.analysis.analyze",
    "lesioned": "dmn_neuro.analysis.lesions",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
