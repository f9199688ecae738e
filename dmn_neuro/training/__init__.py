"""Stage 3 and 4 -- what the circuit should learn and how: the losses, BPTT
training in the closed loop, the nested configuration, checkpoints (safetensors
+ JSON, never pickle) and quantisation-aware fine-tuning for Loihi.

Names are imported on first use.
"""
from connectome.lazy import lazy_exports

_EXPORTS = {
    "CombinedLoss": "dmn_neuro.training.loss_functions",
    "TrajectoryAnalyzer": "dmn_neuro.training.loss_functions",
    "kc_population_sparsity": "dmn_neuro.training.loss_functions",
    "DMNTrainer": "dmn_neuro.training.optimizer",
    "build_components": "dmn_neuro.training.optimizer",
    "evaluate_agent": "dmn_neuro.training.optimizer",
    "TrainingConfig": "dmn_neuro.training.config",
    "ConnectomeConfig": "dmn_neuro.training.config",
    "CircuitConfig": "dmn_neuro.training.config",
    "EnvironmentConfig": "dmn_neuro.training.config",
    "LossConfig": "dmn_neuro.training.config",
    "OptimisationConfig": "dmn_neuro.training.config",
    "save_checkpoint": "dmn_neuro.training.checkpoint",
    "load_circuit": "dmn_neuro.training.checkpoint",
    "snap_circuit_to_grid": "dmn_neuro.training.qat",
    "qat_finetune": "dmn_neuro.training.qat",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
