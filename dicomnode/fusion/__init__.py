"""Fusion: volumes from series, geometry, fusers (classical and learned), metrics. Pure computation."""
