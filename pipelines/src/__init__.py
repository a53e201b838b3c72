"""Pipelines with caching built in: ``ToCaPipeline``, and the OpenSora 1.2 pipeline ditcache ships."""

from .opensora import OpenSoraPipeline, export
from .toca_pipeline import SUPPORTED_PIPELINES, ToCaPipeline

__all__ = ["ToCaPipeline", "SUPPORTED_PIPELINES", "OpenSoraPipeline", "export"]
