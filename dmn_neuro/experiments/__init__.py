"""Experiments and their unit, the training run: a run directory (locked,
resumable, with metrics, checkpoints, summaries and figures) is what
``dmn-neuro train`` makes and what an experiment grid is made of
(:mod:`~dmn_neuro.experiments.spec` the experiment file,
:mod:`~dmn_neuro.experiments.grid` running it on a process pool or Ray,
:mod:`~dmn_neuro.experiments.evaluation` each cell's evaluations,
:mod:`~dmn_neuro.experiments.conditions` one model under every standard condition,
:mod:`~dmn_neuro.experiments.report` the statistics).

Names are imported on first use.
"""
from connectome.lazy import lazy_exports

_EXPORTS = {
    "train_run": "dmn_neuro.experiments.run",
    "run_lock": "dmn_neuro.experiments.run",
    "read_metrics": "dmn_neuro.experiments.run",
    "truncate_metrics": "dmn_neuro.experiments.run",
    "config_differences": "dmn_neuro.experiments.run",
    "load_spec": "dmn_neuro.experiments.spec",
    "run_experiment": "dmn_neuro.experiments.grid",
    "write_report": "dmn_neuro.experiments.report",
    "evaluation_config": "dmn_neuro.experiments.conditions",
    "condition_table": "dmn_neuro.experiments.conditions",
    "write_condition_table": "dmn_neuro.experiments.conditions",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
