"""Byzantine-robust replacements of the mean over clients, per tensor: Flower's coordinate-wise median
(Yin et al. 2018) and trimmed mean (``trim`` of each tail cut), unweighted, in float64."""

from __future__ import annotations

import numpy as np
from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg

AGGREGATIONS = ("mean", "median", "trimmed-mean")


def check_aggregation(aggregation: str, trim: float) -> None:
    if aggregation not in AGGREGATIONS or not 0 <= trim < 0.5:
        raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)} and trim in [0, 0.5), got {aggregation!r}, {trim}")


def robust_mean(values: list[np.ndarray], aggregation: str, trim: float = 0.2) -> np.ndarray:
    """The coordinate-wise ``median`` or ``trimmed-mean`` of the clients' ``values`` (same shape)."""
    check_aggregation(aggregation, trim)
    if aggregation == "mean":
        raise ValueError("robust_mean takes median or trimmed-mean; the plain mean is the caller's (weighted) own")
    results = [([v.astype(np.float64)], 1) for v in values]
    return np.asarray((aggregate_median(results) if aggregation == "median" else aggregate_trimmed_avg(results, trim))[0])
