"""The L² dead-zone transform: pruning and quantization as one rounding (Shi et al., ICCV 2023).

One tensor gets two positive scalars, the *edge* ``e`` and the *step* ``s``. The transform

    T(w) = w / (2e)                             if |w| <= e
    T(w) = sign(w) * (0.5 + (|w| - e) / s)      otherwise

maps the dead zone ``|w| <= e`` onto ``[-0.5, 0.5]`` (which rounds to level 0: that is the pruning)
and the rest onto a uniform grid of step ``s``. Level ``n != 0`` reconstructs to
``sign(n) * (e + (|n| - 0.5) * s)``, the centre of its interval. Training sees
``T^-1(round(T(w)))`` with a straight-through round, so the gradient reaches ``w``, ``e`` and ``s``.

:func:`dequantize_levels` is the single reconstruction rule used by the L² evaluation and by the
``quant`` codec's decoder (float64 on the CPU, rounded once to the dtype), which is why decoding a
file reproduces exactly the weights whose accuracy was reported.
"""

from __future__ import annotations

from mlcompress.codecs.quant.uniform import element_slices, flat_view
from mlcompress.lazy import torch


def transform(w: torch.Tensor, edge: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """T(w): continuous level coordinate (before rounding)."""
    a = w.abs()
    inside = w / (2 * edge)
    outside = torch.sign(w) * (0.5 + (a - edge) / step)
    return torch.where(a <= edge, inside, outside)


def inverse(c: torch.Tensor, edge: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """T^-1(c) on continuous coordinates (piecewise linear, continuous at |c| = 0.5)."""
    a = c.abs()
    inside = 2 * edge * c
    outside = torch.sign(c) * (edge + (a - 0.5) * step)
    return torch.where(a <= 0.5, inside, outside)


def round_ste(c: torch.Tensor) -> torch.Tensor:
    """round(c) in the forward pass, identity in the backward pass (straight-through)."""
    return c + (torch.round(c) - c).detach()


def fake_quantize(w: torch.Tensor, edge: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_hat, c)``: the dequantized weights used in training and the pre-rounding coordinate.

    The inverse is evaluated on the straight-through-rounded coordinate; its branch is chosen by
    the rounded value, so a dead-zone weight reconstructs to exactly 0 in the forward pass while
    its gradient still flows (``d w_hat / d w = 1`` inside the dead zone).
    """
    c = transform(w, edge, step)
    return inverse(round_ste(c), edge, step), c


def levels(w: torch.Tensor, edge: float | torch.Tensor, step: float | torch.Tensor,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """Hard integer levels ``round(T(w))`` on the CPU (what the codec stores), int64 unless
    ``dtype`` says otherwise (the codec asks for int32 and gets a ValueError if one is wider).

    Computed in float64 from the float32 values of ``edge``/``step`` so encoder and evaluation
    agree on every boundary case; a block of elements at a time (elementwise, so the same bits).
    """
    e = torch.as_tensor(edge, dtype=torch.float32).to(torch.float64)
    s = torch.as_tensor(step, dtype=torch.float32).to(torch.float64)
    flat = flat_view(w)
    dtype = torch.int64 if dtype is None else dtype
    out = torch.empty(flat.numel(), dtype=dtype)
    bound = torch.iinfo(dtype).max
    for sl in element_slices(flat.numel()):
        n = torch.round(transform(flat[sl].to(torch.float64), e, s)).to(torch.int64)
        if dtype != torch.int64 and n.numel() and int(n.abs().max()) > bound:
            raise ValueError(f"L² levels must fit in {dtype}")
        out[sl] = n
    return out.reshape(w.shape)


def dequantize_levels(
    n: torch.Tensor, edge: float, step: float, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Level ``n`` -> ``sign(n) (e + (|n| - 0.5) s)`` and 0 -> 0, in float64, rounded to ``dtype``.

    ``edge`` and ``step`` are taken at float32 precision, the precision the file stores.
    """
    flat = flat_view(n)
    out = torch.empty(flat.numel(), dtype=torch.float32 if dtype is None else dtype)
    for sl in element_slices(flat.numel()):
        out[sl] = dequantize_slice(flat[sl], edge, step, out.dtype)
    return out.reshape(torch.as_tensor(n).shape)


def dequantize_slice(n: torch.Tensor, edge: float, step: float, dtype: torch.dtype) -> torch.Tensor:
    """:func:`dequantize_levels` of a few levels (the codec's decoder calls it per slice)."""
    e = float(torch.tensor(edge, dtype=torch.float32))
    s = float(torch.tensor(step, dtype=torch.float32))
    n64 = torch.as_tensor(n).to("cpu", torch.float64)
    a = n64.abs()
    out = torch.sign(n64) * (e + (a - 0.5) * s)
    return torch.where(a == 0, torch.zeros_like(out), out).to(dtype)


def initial_edge_step(w: torch.Tensor) -> tuple[float, float]:
    """The paper's initialisation: ``e = s = (max - min) / 256`` (an ~8-bit grid, tiny dead zone)."""
    span = float(w.detach().max() - w.detach().min()) if w.numel() else 0.0
    v = span / 256 if span > 0 else 1e-3
    return v, v
