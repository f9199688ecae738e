"""Re-export of the shared user-facing error types (see :mod:`connectome.errors`)."""
from connectome.errors import ConfigError, DataError, DMNError


class CheckpointError(DMNError):
    """A checkpoint is missing, corrupt or incompatible."""


class TrainingError(DMNError):
    """Training diverged (NaN/Inf) or cannot continue."""


class ExportError(DMNError):
    """An export or verification cannot be carried out."""


__all__ = ["DMNError", "DataError", "ConfigError", "CheckpointError", "TrainingError", "ExportError"]
