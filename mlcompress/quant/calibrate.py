"""The L² optimisation loop: learn per-tensor edge/step (and nudge the weights) under a rate target.

What happens, and why:

1. Every quantizable weight ``W`` (see :mod:`mlcompress.quant.plan`) gets an edge ``e`` and a step
   ``s`` (log-parameterised so they stay positive; initialised to ``(max - min) / 256``). The
   student model runs with ``T^-1(round(T(W)))`` (straight-through), the teacher is the original.
2. The loss is distillation on calibration inputs (KL divergence from the teacher's output
   distribution to the student's -- calibration data are unlabelled) plus ``lambda`` times the
   differentiable rate estimate of all levels (bits per quantized weight, from the counter).
3. The rate budget comes from the target ratio: ``fp32 bytes / target`` minus what the rest of the
   file costs (lossless biases, frequency tables, header), measured by encoding a real file at the
   start of every round. ``lambda`` is steered multiplicatively towards the budget (raised while
   the estimate is above it, lowered below), a controller in place of the paper's fixed
   ``1e-6`` cut 100x at the target: the paper's constant depends on its model sizes, the controller
   does not.
4. Rounds alternate a *transform* phase (only e, s move) and a *weight* phase (W and the biases
   move with a small learning rate, e, s fixed), as in the public recipe (which runs 3 rounds of
   300 + 1000 steps; 2 rounds of 200 + 200 are the default here so LeNet-5 fits in minutes on a
   small CPU).
5. Training starts from the e, s (scaled together from the paper's init) whose file just meets
   the target, so the loop trades accuracy against rate around the budget.
6. After the last round the final levels are computed once, the hard way (float64, the codec's
   rule); if the real file misses the target, e and s are widened together by the smallest common
   factor (bisection) that meets it. The accuracy reported is that of exactly these weights.

Data-parallel (``world`` of several processes, ``torchrun ... quantize --method l2``): every
process draws the same calibration batches and rate-estimate samples (the same seeded
generator), computes the distillation loss of its contiguous share of each batch's examples
(summed, divided by the whole batch's size, so the shares add up to the batch mean), and the
gradients are summed over the processes in one all-reduce per step. The rate term does not
depend on the examples, so it is counted once (process 0's). All processes then take the same
optimiser step and hold the same state, so the file measurements and the final widening, which
every process repeats, agree without communication. Why: the result is one process's up to
float round-off (the sum of share losses and the float64 gradient sum round differently), and
exactly reproducible given the seed and the number of processes.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from mlcompress.distributed import SINGLE, World
from mlcompress.errors import InputError, UsageError
from mlcompress.progress import Progress, report
from mlcompress.codecs.quant import l2
from mlcompress.quant import counter
from mlcompress.quant.plan import FileSize, Plan, quantizable_names, write_plan

#: Floor of the level budget while frequency tables alone still exceed the target.
MIN_BUDGET_BPW = 0.02
#: The rate weight stays within these bounds so an unreachable budget cannot blow up the loss.
LAMBDA_MIN, LAMBDA_MAX = 1e-4, 1e3


@dataclass(frozen=True)
class L2Config:
    """Hyper-parameters of the L² loop (defaults scaled for small CPU models; see docs/quantize.md)."""

    target_ratio: float = 20.0
    kernel: str = "cos"
    resolution: int = counter.DEFAULT_RESOLUTION
    rounds: int = 2
    transform_steps: int = 200
    weight_steps: int = 200
    batch_size: int = 16
    transform_lr: float = 0.02
    weight_lr: float = 1e-4
    lambda_init: float = 0.05
    lambda_gain: float = 0.03
    remeasure_every: int = 50
    seed: int = 0

    def validate(self) -> None:
        if not (self.target_ratio > 1 and math.isfinite(self.target_ratio)):
            raise UsageError(f"--target-ratio must be a number above 1, got {self.target_ratio}")
        if self.kernel not in counter.KERNELS:
            raise UsageError(f"unknown kernel {self.kernel!r}", hint=f"use one of: {', '.join(counter.KERNELS)}")
        for key in ("rounds", "transform_steps", "weight_steps", "batch_size", "resolution", "remeasure_every"):
            if getattr(self, key) < 0 or (key in ("batch_size", "resolution", "rounds", "remeasure_every") and getattr(self, key) < 1):
                raise UsageError(f"L² setting {key} must be positive, got {getattr(self, key)}")


@dataclass
class L2Result:
    """Final tensors and codec plan; ``dequantized`` are exactly the weights a decoder rebuilds."""

    tensors: dict[str, torch.Tensor]  # latent weights + other tensors, what the codec encodes
    dequantized: dict[str, torch.Tensor]  # quantized tensors replaced by their reconstruction
    plan: Plan
    edge_step: dict[str, tuple[float, float]]
    sparsity: float
    widen_factor: float
    seconds: float
    history: list[dict] = field(default_factory=list)


class _Quantized(nn.Module):
    """The learnable L² state of one model: latent weights, log-edge, log-step."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.names = names
        params = dict(model.named_parameters())
        self.log_edge = nn.ParameterDict()
        self.log_step = nn.ParameterDict()
        for i, name in enumerate(names):
            e, s = l2.initial_edge_step(params[name])
            self.log_edge[str(i)] = nn.Parameter(torch.tensor(math.log(e), device=params[name].device))
            self.log_step[str(i)] = nn.Parameter(torch.tensor(math.log(s), device=params[name].device))

    def edge_step(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.log_edge[str(i)].exp(), self.log_step[str(i)].exp()


def _kd_loss(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the output distributions, per example."""
    return F.kl_div(
        F.log_softmax(student_out, dim=-1), F.log_softmax(teacher_out, dim=-1), log_target=True,
        reduction="batchmean",
    )


def _kd_share_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, batch: int) -> torch.Tensor:
    """This process's part of the batch's mean KL: its examples' summed KL over the whole batch's
    size, so the parts of all processes add up to :func:`_kd_loss` of the batch."""
    return F.kl_div(
        F.log_softmax(student_out, dim=-1), F.log_softmax(teacher_out, dim=-1), log_target=True,
        reduction="sum",
    ) / batch


def _all_reduce_grads(world: World, params: list[torch.Tensor], values: list[float]) -> list[float]:
    """Sum the gradients of ``params`` and the scalars ``values`` over the processes, in float64
    and one all-reduce (one message per step, whatever the number of tensors). A gradient no
    process has stays None, as in one process; a process without one adds zeros."""
    grads = [p.grad.reshape(-1).double() if p.grad is not None else torch.zeros(p.numel(), dtype=torch.float64,
             device=p.device) for p in params]
    device = grads[0].device if grads else None
    tail = torch.tensor([float(p.grad is not None) for p in params] + values, dtype=torch.float64, device=device)
    flat = world.all_reduce_sum(torch.cat(grads + [tail]))
    summed_tail = flat[flat.numel() - tail.numel():].cpu()
    offset = 0
    for i, p in enumerate(params):
        piece = flat[offset : offset + p.numel()]
        offset += p.numel()
        p.grad = piece.view(p.shape).to(p.dtype) if summed_tail[i] > 0 else None
    return [float(v) for v in summed_tail[len(params):]]


def _final_levels(weights: Mapping[str, torch.Tensor], es: Mapping[str, tuple[float, float]], factor: float = 1.0):
    out = {}
    for name, w in weights.items():
        e, s = es[name]
        e32 = float(torch.tensor(e * factor, dtype=torch.float32))
        s32 = float(torch.tensor(s * factor, dtype=torch.float32))
        out[name] = (l2.levels(w, e32, s32), e32, s32)
    return out


def fit_factor(file_bytes: Callable[[float], int], budget: float, iterations: int = 12) -> float:
    """Smallest common factor (>= 1, to ~6% by bisection in log space) by which e and s must grow
    so that ``file_bytes(factor) <= budget``; 1.0 when the file already fits."""
    if file_bytes(1.0) <= budget:
        return 1.0
    lo, hi = 1.0, 2.0
    while file_bytes(hi) > budget and hi < 2.0**20:
        lo, hi = hi, hi * 2
    for _ in range(iterations):
        mid = math.sqrt(lo * hi)
        if file_bytes(mid) > budget:
            lo = mid
        else:
            hi = mid
    return hi


def _plan_for(tensors: Mapping[str, torch.Tensor], finals: Mapping[str, tuple]) -> Plan:
    plan: Plan = {}
    for name in tensors:
        if name in finals:
            _, e, s = finals[name]
            plan[name] = ("quant", {"scheme": "l2", "edge": e, "step": s})
        else:
            plan[name] = ("lossless", {})
    return plan


def l2_compress(
    model: nn.Module,
    calibration: torch.Tensor,
    config: L2Config | None = None,
    *,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    world: World = SINGLE,
) -> L2Result:
    """Run L² on ``model`` (left untouched) with ``calibration`` inputs; see the module docstring.

    With a ``world`` of several processes every process calls this with the same model,
    calibration inputs and config, trains on its share of each batch, and returns the same
    result (see the module docstring for what is shared and what is guaranteed)."""
    config = config or L2Config()
    config.validate()
    if calibration is None or len(calibration) == 0:
        raise InputError("the calibration set is empty", hint="pass --calib-samples with a positive number")
    start = time.perf_counter()
    dev = torch.device(device)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    teacher = copy.deepcopy(model).to(dev).eval()
    student = copy.deepcopy(model).to(dev).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    all_tensors = {**dict(student.named_parameters()), **dict(student.named_buffers())}
    names = [n for n in quantizable_names(dict(student.named_parameters()))]
    if not names:
        raise InputError("the model has no conv/linear weights to quantize (need >= 2-D float tensors)")
    state = _Quantized(student, names).to(dev)
    n_quant = sum(all_tensors[n].numel() for n in names)
    total_fp32 = 4 * sum(t.numel() for t in model.state_dict().values())
    budget_file_bytes = total_fp32 / config.target_ratio
    calib = calibration.to(dev)
    with torch.no_grad():
        teacher_out_all = torch.cat([teacher(calib[i : i + 256]) for i in range(0, len(calib), 256)])

    def forward(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        params = dict(student.named_parameters())
        rate = torch.zeros((), device=dev)
        for i, name in enumerate(names):
            e, s = state.edge_step(i)
            w_hat, c = l2.fake_quantize(params[name], e, s)
            params[name] = w_hat
            sample, scale = counter.subsample(c, generator)
            rate = rate + scale * counter.rate_bits(sample, kernel=config.kernel, resolution=config.resolution)
        if not world.distributed:
            out = functional_call(student, {**params, **dict(student.named_buffers())}, (calib[idx],))
            return _kd_loss(out, teacher_out_all[idx]), rate / n_quant
        share = world.share(len(idx))  # whole examples, contiguous; none empty while examples >= processes
        rows = idx[share.start : share.stop]
        if len(rows) == 0:  # more processes than examples: this one idles (its generator stays in step)
            return torch.zeros((), device=dev), rate / n_quant
        out = functional_call(student, {**params, **dict(student.named_buffers())}, (calib[rows],))
        return _kd_share_loss(out, teacher_out_all[rows], len(idx)), rate / n_quant

    def current_edge_step() -> dict[str, tuple[float, float]]:
        return {n: tuple(float(v.detach()) for v in state.edge_step(i)) for i, n in enumerate(names)}

    def measure(factor: float = 1.0) -> tuple[FileSize, dict, Plan]:
        weights = {n: all_tensors[n].detach().cpu() for n in names}
        finals = _final_levels(weights, current_edge_step(), factor)
        tensors = {k: v.detach().cpu() for k, v in student.state_dict().items()}
        plan = _plan_for(tensors, finals)
        return write_plan(None, tensors, plan, {}), finals, plan

    def budget() -> tuple[float, FileSize]:
        # Bits per quantized weight left for the level symbols once everything else in the file
        # (header, lossless tensors, frequency tables) is paid for. Tables shrink as the step
        # grows, so this is re-measured during training.
        size, finals, _ = measure()
        level_bits = sum(counter.hard_entropy_bits(lv) for lv, _, _ in finals.values())
        overhead = size.file_bytes - level_bits / 8
        return max((budget_file_bytes - overhead) * 8 / n_quant, MIN_BUDGET_BPW), size

    # Start from the dead-zone quantizer that just meets the target (e and s scaled together), so
    # training trades accuracy against rate around the budget instead of descending from ~8 bits.
    start_factor = fit_factor(lambda f: measure(f)[0].file_bytes, budget_file_bytes)
    with torch.no_grad():
        for i in range(len(names)):
            state.log_edge[str(i)] += math.log(start_factor)
            state.log_step[str(i)] += math.log(start_factor)

    lam = config.lambda_init
    history: list[dict] = []
    for rnd in range(config.rounds):
        for phase, steps in (("transform", config.transform_steps), ("weights", config.weight_steps)):
            if phase == "transform":
                opt = torch.optim.Adam(state.parameters(), lr=config.transform_lr)
            else:
                opt = torch.optim.Adam(student.parameters(), lr=config.weight_lr)
            for p in state.parameters():
                p.requires_grad_(phase == "transform")
            for p in student.parameters():
                p.requires_grad_(phase == "weights")
            trained = list((state if phase == "transform" else student).parameters())
            for step in range(steps):
                if step % config.remeasure_every == 0:
                    budget_bpw, size = budget()
                    history.append({"round": rnd + 1, "phase": phase, "step": step, "file_bytes": size.file_bytes,
                                    "ratio": size.fp32_ratio, "budget_bpw": budget_bpw, "lambda": lam})
                idx = torch.randint(len(calib), (config.batch_size,), generator=generator).to(dev)
                if world.distributed:
                    with world.guard():  # a failure in one process's share stops all, one line each
                        kd, bpw = forward(idx)
                        # The rate is the same on every process: its gradient is counted once (process 0's).
                        loss = kd + lam * bpw if world.is_main else kd
                        opt.zero_grad(set_to_none=True)
                        if loss.requires_grad:
                            loss.backward()
                    kd_value, total = _all_reduce_grads(world, trained, [float(kd.detach()), float(loss.detach())])
                    kd = torch.tensor(kd_value)
                else:
                    kd, bpw = forward(idx)
                    loss = kd + lam * bpw
                    total = float(loss.detach())
                if not math.isfinite(total):  # the same verdict on every process: the summed loss
                    raise InputError("L² optimisation diverged (non-finite loss)", hint="lower --target-ratio")
                if not world.distributed:
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                opt.step()
                if phase == "transform":
                    # Only e and s can move the rate much, so lambda is steered in this phase only
                    # (steering it while the weights move lets it run away). Log-ratio: over- and
                    # undershooting the budget by the same factor move lambda alike.
                    gap = math.log(max(float(bpw.detach()), 1e-6) / budget_bpw)
                    lam = min(max(lam * math.exp(config.lambda_gain * max(-1.0, min(1.0, gap))), LAMBDA_MIN), LAMBDA_MAX)
                report(progress, phase, step + 1, steps, "steps", round=rnd + 1, kd=float(kd.detach()),
                       bpw=float(bpw.detach()), budget_bpw=budget_bpw)
    for p in student.parameters():
        p.requires_grad_(False)

    # Final hard quantization; widen e and s together if the real file misses the target.
    factor = fit_factor(lambda f: measure(f)[0].file_bytes, budget_file_bytes)
    size, finals, plan = measure(factor)
    tensors = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
    dequantized = dict(tensors)
    zeros = 0
    for name, (lv, e, s) in finals.items():
        dequantized[name] = l2.dequantize_levels(lv, e, s, tensors[name].dtype).reshape(tensors[name].shape)
        zeros += int((lv == 0).sum())
    return L2Result(
        tensors=tensors,
        dequantized=dequantized,
        plan=plan,
        edge_step={n: (e, s) for n, (_, e, s) in finals.items()},
        sparsity=zeros / n_quant,
        widen_factor=factor,
        seconds=time.perf_counter() - start,
        history=history,
    )
