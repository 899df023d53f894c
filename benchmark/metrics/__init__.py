"""Quality metrics computed on generated images."""

from benchmark.metrics.frechet import FrechetDistance, FrechetResult

__all__ = ["FrechetDistance", "FrechetResult"]
