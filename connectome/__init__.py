"""Connectome data layer of dmn-neuro: real fly olfactory wiring, offline by default."""
