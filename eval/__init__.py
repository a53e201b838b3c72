"""Measurement tools of ditcache: speed and FLOPs benchmarks (quality metrics come later)."""
