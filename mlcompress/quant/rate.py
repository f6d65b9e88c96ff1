"""Rate control for entropy-constrained quantization: tensor steps for a target file size.

How the steps of the tensors relate (``allocation``):

* ``equal``: every tensor gets the same step. With the squared weight error as the objective
  this is the optimal allocation (at high rate each weight's error is ``step**2/12`` whatever
  its tensor, and a finer step costs every weight the same ``-log2`` bits; equal slopes mean
  equal steps). It is NNC's single quantization parameter.
* ``norm``: each tensor's step is proportional to its Frobenius norm
  ``||W|| = rms * sqrt(numel)``. This minimises the summed *relative* output error of the layers,
  ``sum_l step_l**2 / rms_l**2``, at a given total rate ``sum_l numel_l * log2(1/step_l)``: the
  Lagrangian gives ``step_l**2 ∝ numel_l * rms_l**2``. Every layer's output noise counts the
  same whatever its size, so small layers (the first convolution, the classifier) get fine
  steps that cost few bytes, and the big layers that hold the bytes get coarse ones. Measured
  on two LeNet-5s at 25x: +0.53/+0.36 points against +2.13/+0.87 for ``equal``
  (docs/quantize.md).

* ``auto`` (default): ``equal`` for a network whose layers read a normalized residual stream
  (a transformer: it has LayerNorm/RMSNorm parameters and no BatchNorm running statistics),
  ``norm`` otherwise. Why: ``norm`` counts each layer's error relative to that layer's own
  output, which is what reaches the output of a plain chain of layers (a CNN, an MLP; with
  BatchNorm the output scale of a layer is divided out, which is relative error again). In a
  pre-normalized transformer every layer reads unit-scale inputs and adds its output into one
  shared stream, so what reaches the logits is each layer's *absolute* error, the same per
  weight whatever the layer: the squared-error optimum, ``equal``. Measured on two GPT-2s and
  two LeNet-5s each way in docs/quantize.md.

* ``hessian`` (needs ``--task``): each tensor's step from its mean Fisher diagonal on the task's
  calibration inputs (:mod:`mlcompress.quant.sensitivity`), ``step_t ∝ mean(F_t)**-0.5``. With
  uniform rounding noise the expected KL to the original of tensor ``t`` is
  ``½ step_t**2/12 Σ_{i∈t} F_i``, and its rate falls by ``log2 step_t`` bits per weight; the
  Lagrangian of the summed KL at a total rate ``Σ_t numel_t log2(1/step_t)`` gives
  ``step_t**2 mean(F_t) = const``: the same ``equal`` argument with each weight's squared error
  weighted by its sensitivity. A tensor the output does not depend on (``mean(F_t) = 0``) gets
  the coarsest step any other tensor gets. With ``--per-channel``/``--group-size`` the groups
  inside each tensor get their steps from their own mean Fisher diagonals too
  (:func:`group_step_factors`).

``--step S`` gives the step of the tensor with the largest norm (every tensor's with
``equal``; the least sensitive tensor's with ``hessian``); ``--target-ratio R`` searches it.

The search bisects the step on a log scale against the payload size estimated from histograms
(:func:`mlcompress.codecs.quant.step.estimated_payload_bytes`), with the rest of the file (header,
tensors stored losslessly) measured once from a real file; a real file is then written for that
step and, if it misses the target by more than 1% (small tensors, whose frequency-table entries
come and go with the step), the search goes on by bisection on real files around it, keeping the
closest. The reported ratio is always the written file's.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping

import torch

from mlcompress.codecs.quant.rdo import DEFAULT_LAMBDA
from mlcompress.codecs.quant.step import check_step, estimated_payload_bytes, group_sizes, rms_factors, step_quantize
from mlcompress.codecs.quant.uniform import GroupLayout
from mlcompress.errors import UsageError
from mlcompress.lazy import numpy as np
from mlcompress.options import ALLOCATIONS, check_target_ratio
from mlcompress.quant.plan import FileSize, Plan, quantizable_names

SEARCH_ITERATIONS = 40
#: Real-file trials when the estimate misses: widening the bracket, then bisecting in it.
REAL_BRACKET_STEPS, REAL_BISECTIONS = 8, 12
#: How close the written file must come to the target before the search stops.
TOLERANCE = 0.01


def check_allocation(allocation: str) -> None:
    if allocation not in ALLOCATIONS:
        raise UsageError(f"unknown step allocation {allocation!r}", hint=f"use one of: {', '.join(ALLOCATIONS)}")


#: Parameter names of normalization layers that scale a layer's *input* (LayerNorm, RMSNorm and
#: their usual spellings: GPT-2's ``ln_1``/``ln_f``, BERT's ``LayerNorm``, Llama's
#: ``input_layernorm``/``post_attention_layernorm``/``norm``).
_NORM_NAME = re.compile(r"(^|\.)(ln(_\w+)?|\w*layer_?norm\w*|\w*_norm|norm\d*|rms_?norm\w*)\.weight$", re.IGNORECASE)


def resolve_allocation(tensors: Mapping[str, torch.Tensor], allocation: str) -> str:
    """The concrete allocation ``auto`` stands for on these tensors (others unchanged)."""
    check_allocation(allocation)
    if allocation != "auto":
        return allocation
    names = list(tensors)
    has_batchnorm = any(n.endswith(".running_mean") for n in names)
    has_norm = any(_NORM_NAME.search(n) and len(tensors[n].shape) == 1 for n in names)
    return "equal" if has_norm and not has_batchnorm else "norm"


def step_factors(tensors: Mapping[str, torch.Tensor], allocation: str = "auto",
                 select: Callable[[str], bool] | None = None,
                 sensitivity: Mapping[str, float] | None = None) -> dict[str, float]:
    """Each quantized tensor's step relative to the given ``--step`` (the largest is 1): the
    :func:`~mlcompress.quant.plan.quantizable_names`, narrowed by ``select``. ``hessian`` needs
    ``sensitivity``, each tensor's mean Fisher diagonal
    (:func:`mlcompress.quant.sensitivity.tensor_sensitivity`)."""
    allocation = resolve_allocation(tensors, allocation)
    names = quantizable_names(tensors, select)
    if allocation == "equal":
        return {n: 1.0 for n in names}
    if allocation == "hessian":
        if sensitivity is None or any(n not in sensitivity for n in names):
            raise UsageError("allocation 'hessian' needs the mean Fisher diagonal of every quantized tensor",
                             hint="compute it with mlcompress.quant.sensitivity.tensor_sensitivity")
        # step ∝ mean(F)**-0.5: the largest step belongs to the least sensitive tensor.
        scale = {n: sensitivity[n] ** -0.5 for n in names if sensitivity[n] > 0}
    else:
        scale = {n: float(torch.linalg.vector_norm(tensors[n].detach().double())) for n in names}
        scale = {n: v for n, v in scale.items() if v > 0}
    top = max(scale.values(), default=0.0)
    return {n: (scale[n] / top if n in scale and top > 0 else 1.0) for n in names}


def fisher_group_factors(group_fisher: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Group steps relative to the tensor step by the tensor rule one level down,
    ``(mean(F_g) / mean(F_t))**-0.5``: the expected KL of group ``g`` is ``numel_g Δ_g²
    mean(F_g)/24`` and its rate falls by ``log2 Δ_g`` bits per weight, so at a given rate the
    summed KL is least when ``Δ_g² mean(F_g)`` is one constant. ``mean(F_t)`` is the
    size-weighted mean of the groups' (``sizes``), so the tensor's own step stays the
    per-tensor rule's. A group the output does not depend on gets the coarsest factor of the
    others, a tensor with no sensitive group 1 throughout (the convention for tensors)."""
    fisher = np.asarray(group_fisher, dtype=np.float64).reshape(-1)
    whole = float(np.sum(fisher * sizes) / np.sum(sizes)) if sizes.size else 0.0
    positive = fisher > 0
    if whole <= 0 or not positive.any():
        return np.ones_like(fisher)
    rel = np.ones_like(fisher)
    rel[positive] = np.sqrt(whole / fisher[positive])
    rel[~positive] = rel[positive].max()
    return rel


#: The grid of ``--allocation hessian``'s group step factors: quarter octaves.
FACTORS_PER_OCTAVE = 4


def quarter_octaves(factors: np.ndarray) -> np.ndarray:
    """``factors`` rounded to powers of ``2**(1/FACTORS_PER_OCTAVE)``. Why: a tensor's step
    codes are entropy-coded with their own frequency table, about 12 bytes per distinct code,
    and continuous factors make nearly every group's code distinct (on a 32x512 tensor in
    groups of 64, 181 codes against 6, over a quarter of a 4-bit payload). A step off by at
    most ``2**(1/8)`` (9%) raises the high-rate distortion at equal rate by ``2 E[δ²]``, 0.5%
    (``δ`` the log step error, uniform within ``±ln 2/8``)."""
    return np.exp2(np.round(FACTORS_PER_OCTAVE * np.log2(factors)) / FACTORS_PER_OCTAVE)


def group_step_factors(tensors: Mapping[str, torch.Tensor], group_fisher: Mapping[str, np.ndarray], *,
                       per_channel: bool = False, group_size: int | None = None) -> dict[str, np.ndarray]:
    """``--allocation hessian``'s group steps relative to each tensor step, for the tensors of
    ``group_fisher`` (each group's mean Fisher diagonal,
    :func:`mlcompress.quant.sensitivity.group_sensitivity`): the smaller of
    :func:`fisher_group_factors` and the RMS scaling
    (:func:`mlcompress.codecs.quant.step.rms_factors`), on :func:`quarter_octaves`.

    Why not the Fisher rule alone: it assumes each group's rate falls by ``log2 Δ_g`` bits per
    weight on its own, and each group's error is ``Δ_g²/12``. In the file a tensor's levels
    share one frequency table, which fits best when every group's levels spread alike (the
    RMS scaling makes them so); and a group given a step coarser than its RMS share rounds
    mostly to zero, where the error is the weights themselves (``w²``, not ``Δ²/12``, and the
    same sign as the weights rather than independent noise). So the Fisher may make a group's
    step finer than the RMS scaling would, never coarser. Measured against the Fisher alone
    and the RMS scaling alone in docs/quantize.md."""
    out = {}
    for name, fisher in group_fisher.items():
        x = tensors[name]
        layout = GroupLayout.for_shape(tuple(x.shape), per_channel=per_channel, group_size=group_size)
        rule = fisher_group_factors(fisher, group_sizes(layout))
        out[name] = quarter_octaves(np.minimum(rule, rms_factors(x, layout)))
    return out


def step_plan(tensors: Mapping[str, torch.Tensor], step: float, *, allocation: str = "auto",
              per_channel: bool = False, group_size: int | None = None, lam: float = DEFAULT_LAMBDA,
              factors: Mapping[str, float] | None = None, select: Callable[[str], bool] | None = None,
              sensitivity: Mapping[str, float] | None = None, dq: bool = False,
              group_factors: Mapping[str, np.ndarray] | None = None) -> Plan:
    """``quant`` with the ``step`` scheme for the tensors of ``factors`` (default: the
    :func:`step_factors` of the quantizable tensors ``select`` keeps), ``lossless`` for the rest.
    A tensor in ``group_factors`` (:func:`group_step_factors`) gets those group steps relative
    to its tensor step instead of its groups' RMS scaling."""
    check_step(step)
    factors = factors if factors is not None else step_factors(tensors, allocation, select, sensitivity)
    options = {"scheme": "step", "per_channel": per_channel, "group_size": group_size, "lam": float(lam), "dq": bool(dq)}
    group_factors = group_factors or {}

    def quant(name: str) -> dict[str, Any]:
        extra = {"group_factors": group_factors[name]} if name in group_factors else {}
        return dict(options, step=float(step) * factors[name], **extra)

    return {name: (("quant", quant(name)) if name in factors else ("lossless", {})) for name in tensors}


def _start_step(tensors: Mapping[str, torch.Tensor], names: list[str]) -> float:
    """A step of the order of the largest tensor's RMS: the search's first bracket point."""
    rms = max(float(tensors[n].detach().double().pow(2).mean().sqrt()) for n in names)
    return rms if rms > 0 else 1.0


def search_step(
    tensors: Mapping[str, torch.Tensor],
    target_ratio: float,
    measure: Callable[[Plan], FileSize],
    *,
    allocation: str = "auto",
    per_channel: bool = False,
    group_size: int | None = None,
    lam: float = DEFAULT_LAMBDA,
    select: Callable[[str], bool] | None = None,
    sensitivity: Mapping[str, float] | None = None,
    dq: bool = False,
    group_factors: Mapping[str, np.ndarray] | None = None,
) -> tuple[float, Plan, FileSize]:
    """The global step whose file is ``fp32 bytes / target_ratio`` bytes, its plan and its size.

    ``measure(plan)`` writes a real file for ``plan`` and returns its size. Raises a usage error
    when the target cannot be reached (the losslessly stored tensors and the header alone are
    bigger than the target, or the finest step is still too small a ratio).
    """
    check_target_ratio(target_ratio)
    names = quantizable_names(tensors, select)
    if not names:
        raise UsageError("--target-ratio: the model has no tensor to quantize (conv/linear weights)")
    factors = step_factors(tensors, allocation, select, sensitivity)
    quantizer: dict[str, Any] = {"per_channel": per_channel, "group_size": group_size, "lam": lam, "dq": dq}
    groups = group_factors or {}
    kwargs: dict[str, Any] = dict(quantizer, factors=factors, group_factors=groups)

    def estimate(step: float) -> float:
        return sum(estimated_payload_bytes(step_quantize(tensors[n], step * factors[n], group_factors=groups.get(n),
                                                         **quantizer)) for n in names)
    start = _start_step(tensors, names)
    first = measure(step_plan(tensors, start, **kwargs))
    fixed = first.file_bytes - first.quantized_payload_bytes
    target_bytes = first.fp32_bytes / target_ratio
    budget = target_bytes - fixed
    if budget <= 0:
        raise UsageError(f"--target-ratio {target_ratio:g} is out of reach: the tensors stored losslessly and the "
                         f"header alone take {fixed:,} bytes (target {target_bytes:,.0f})",
                         hint="ask for a smaller ratio")
    step = _bisect(estimate, budget, start)
    best: tuple[float, float, FileSize] | None = None  # (miss, step, size)

    def trial(step: float) -> FileSize:
        nonlocal best
        size = measure(step_plan(tensors, step, **kwargs))
        miss = abs(size.file_bytes - target_bytes)
        if best is None or miss < best[0]:
            best = (miss, step, size)
        return size

    size = trial(step)
    if abs(size.file_bytes - target_bytes) > TOLERANCE * target_bytes:
        # The estimate is off (small tensors: table entries come and go): bisect on real files,
        # bracketing the estimate's step, and keep the closest file seen.
        lo, hi = math.log2(step), math.log2(step)
        too_big = size.file_bytes > target_bytes
        for _ in range(REAL_BRACKET_STEPS):
            if too_big:
                hi += 0.25
                if trial(2.0 ** hi).file_bytes <= target_bytes:
                    break
            else:
                lo -= 0.25
                if trial(2.0 ** lo).file_bytes > target_bytes:
                    break
        for _ in range(REAL_BISECTIONS):
            assert best is not None
            if best[0] <= TOLERANCE * target_bytes:
                break
            mid = 0.5 * (lo + hi)
            if trial(2.0 ** mid).file_bytes > target_bytes:
                lo = mid
            else:
                hi = mid
    assert best is not None
    _, step, size = best
    return step, step_plan(tensors, step, **kwargs), size


def _bisect(estimate: Callable[[float], float], budget: float, start: float) -> float:
    """The smallest step (on a log scale) whose estimated payload fits ``budget``."""
    lo, hi = math.log2(start), math.log2(start)
    # Bracket: payload(step) falls as the step grows.
    while estimate(2.0 ** hi) > budget:
        hi += 2.0
        if hi - math.log2(start) > 40:
            raise UsageError("--target-ratio is out of reach even with every weight at level 0",
                             hint="ask for a smaller ratio")
    while estimate(2.0 ** lo) <= budget:
        lo -= 2.0
        if math.log2(start) - lo > 40:
            return 2.0 ** lo
    for _ in range(SEARCH_ITERATIONS):
        mid = 0.5 * (lo + hi)
        if estimate(2.0 ** mid) > budget:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1.0 / 256:
            break
    return 2.0 ** hi
