"""Quality metrics computed on generated images."""

from benchmark.metrics.frechet import FrechetDistance, FrechetResult
from benchmark.metrics.kid import KernelDistance, KernelDistanceResult

__all__ = ["FrechetDistance", "FrechetResult", "KernelDistance", "KernelDistanceResult"]
