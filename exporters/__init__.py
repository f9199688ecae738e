"""Exporters of trained dmn-neuro circuits: NIR, Lava (float and Loihi fixed point), and verification."""
