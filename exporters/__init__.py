"""Exporters of trained dmn-neuro circuits, and the proof that they do what the model did.

* :mod:`.nir_export` / :mod:`.nir_import` -- NIR graphs (written by us) and an
  independent executor that reads only the NIR file;
* :mod:`.lava_export` / :mod:`.lava_runner` -- Lava process graphs, float and
  Loihi 2 fixed point, run in the isolated Python 3.10 worker (:mod:`.lava_worker`);
* :mod:`.netx` -- lava-dl netx HDF5 of the fixed-point export;
* :mod:`.verify` / :mod:`.report` -- run an export in its simulator, compare
  spikes with the trained model, pass/fail with per-target tolerances.

Names are imported on first use.
"""
from connectome.lazy import lazy_exports

_EXPORTS = {
    "export_nir": "exporters.nir_export",
    "run_nir": "exporters.nir_import",
    "nir_to_spec": "exporters.nir_import",
    "export_lava": "exporters.lava_export",
    "run_lava": "exporters.lava_runner",
    "write_netx": "exporters.netx",
    "run_target": "exporters.verify",
    "verify_spikes": "exporters.verify",
    "verify_nir": "exporters.verify",
    "tolerance_for": "exporters.verify",
    "VerificationResult": "exporters.verify",
    "format_table": "exporters.report",
    "write_report": "exporters.report",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
