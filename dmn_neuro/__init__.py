"""dmn-neuro: connectome-constrained spiking circuits of the fly olfactory system.

Importing this package has no side effects; the CLI sets up logging and devices.
"""
__version__ = "0.1.0"
