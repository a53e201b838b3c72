"""Measurement tools of ditcache: speed and FLOPs benchmarks, quality metrics, sweeps, the reference models."""
