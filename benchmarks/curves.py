"""Reading a measured curve between its points: one interpolation for every benchmark table
that puts a peer's figure beside ours at our size."""

from __future__ import annotations

import math


def interpolate(x: float, points: list[tuple[float, float]], *, log_x: bool = False,
                log_y: bool = False) -> float | None:
    """``y`` at ``x`` from ``(x, y)`` points, piecewise linear in ``(log x if log_x, log y if
    log_y)``; None outside the points. Ratios and byte counts are read on a log scale, KL (which
    grows geometrically) with ``log_y``."""
    fx = math.log if log_x else float
    fy, gy = (math.log, math.exp) if log_y else (float, float)
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            f = (fx(x) - fx(x0)) / (fx(x1) - fx(x0)) if x1 > x0 else 0.0
            return gy(fy(y0) + f * (fy(y1) - fy(y0)))
    return None
