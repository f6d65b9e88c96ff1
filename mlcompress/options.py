"""What a user chooses: one frozen options object per method, checked before any work starts.

These are the ``method=`` values of :func:`mlcompress.encode` (``Rec(...)``, ``Lossless()``,
``Quant(...)``, ``L2(...)``, ``Float(...)``, ``Prune(...)``). They are frozen, so a method can never change the
caller's choice behind its back: a default that depends on the input (REC's bits per block for a
posterior file) is resolved into a new value, never written back. Importing this module imports
neither torch nor numpy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from mlcompress.codecs.low_precision import float_format
from mlcompress.codecs.quant.rdo import DEFAULT_LAMBDA
from mlcompress.codecs.quant.step import check_step
from mlcompress.codecs.quant.uniform import check_bits, level_range
from mlcompress.codecs.rec.limits import (DEFAULT_BITS_PER_WEIGHT, DEFAULT_MIN_REC_NUMEL, INDEX_CODING_CHOICES,
                                          SELECTIONS, check_bits_per_block)
from mlcompress.errors import UsageError
from mlcompress.selection import Selection


#: The fixed-width grid's default bit width.
DEFAULT_BITS = 8
#: How ``--step``/``--target-ratio`` spread steps over tensors (mlcompress/quant/rate.py).
ALLOCATIONS = ("auto", "norm", "equal", "hessian")


def _fields(options: Any, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """``asdict`` of a method's options for file metadata, its tensor selection flattened into
    ``include``/``exclude`` and left out when it selects everything (old headers unchanged)."""
    out = {k: v for k, v in asdict(options).items() if k not in drop and k != "select"}
    out.update(options.select.as_dict())
    return out


def _positive(value: float | None, flag: str) -> None:
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise UsageError(f"{flag} must be a positive number, got {value}")


@dataclass(frozen=True)
class Lossless:
    """Every tensor bit-exactly: floats as Huffman-coded top bits (``lossless3``), other dtypes as
    zstd-coded byte planes (``lossless2``), or raw bytes when smaller."""

    name = "lossless"

    def validate(self) -> None:
        """Nothing to choose."""

    def as_dict(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class Rec:
    """Relative entropy coding (MIRACLE). Budgets: at most one of ``bits_per_weight``,
    ``kl_budget_bits`` (total over REC tensors) and ``target_size`` (bytes of the whole file);
    with none, ``DEFAULT_BITS_PER_WEIGHT``. A posterior file fixes its own block counts, and
    ``bits_per_block=None`` then means the file's."""

    name = "rec"

    bits_per_block: int | None = None
    bits_per_weight: float | None = None
    kl_budget_bits: float | None = None
    target_size: int | None = None
    selection: str = "is"
    seed: int = 0
    layout_seed: int | None = None  # default: derived from seed
    index_coding: str = "auto"  # auto: entropy-coded for orc when smaller, else fixed
    min_rec_numel: int = DEFAULT_MIN_REC_NUMEL
    device: str = "auto"
    # Progressive coding (MIRACLE's retraining): code blocks a group at a time and retrain the
    # rest on ``task`` between groups. Only for posterior files.
    task: str | None = None
    data: str | None = None
    retrain_steps: int = 0
    group_size: int | None = None  # blocks per group; default: half of the blocks still free each time
    retrain_lr: float | None = None  # default: a tenth of fit-posterior's for the parameterization
    select: Selection = Selection()  # --include/--exclude: which tensors REC codes (the rest: lossless)

    @property
    def progressive(self) -> bool:
        return self.task is not None

    @property
    def budget_given(self) -> bool:
        return any(x is not None for x in (self.bits_per_weight, self.kl_budget_bits, self.target_size))

    @property
    def budget_bits_per_weight(self) -> float:
        return self.bits_per_weight if self.bits_per_weight is not None else DEFAULT_BITS_PER_WEIGHT

    def validate(self) -> None:
        self.select.validate()
        if self.bits_per_block is not None:
            check_bits_per_block(self.bits_per_block)
        given = [x for x in (self.bits_per_weight, self.kl_budget_bits, self.target_size) if x is not None]
        if len(given) > 1:
            raise UsageError("give at most one of --bits-per-weight, --kl-budget and --target-size")
        _positive(self.bits_per_weight, "--bits-per-weight")
        _positive(self.kl_budget_bits, "--kl-budget")
        _positive(self.target_size, "--target-size")
        if self.selection not in SELECTIONS:
            raise UsageError(f"--selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.index_coding not in INDEX_CODING_CHOICES:
            raise UsageError(f"index coding must be one of {', '.join(INDEX_CODING_CHOICES)}")
        if self.index_coding == "entropy" and self.selection != "orc":
            raise UsageError("entropy-coded indices only pay off with --selection orc")
        if not (isinstance(self.seed, int) and 0 <= self.seed < 1 << 64):
            raise UsageError(f"--seed must be in [0, 2^64), got {self.seed}")
        if self.layout_seed is not None and not (isinstance(self.layout_seed, int) and 0 <= self.layout_seed < 1 << 64):
            raise UsageError(f"layout seed must be in [0, 2^64), got {self.layout_seed}")
        if not (isinstance(self.min_rec_numel, int) and self.min_rec_numel >= 1):
            raise UsageError(f"--min-rec-numel must be >= 1, got {self.min_rec_numel}")
        if not (isinstance(self.retrain_steps, int) and self.retrain_steps >= 0):
            raise UsageError(f"--retrain-steps must be >= 0, got {self.retrain_steps}")
        if (self.retrain_steps or self.group_size is not None) and self.task is None:
            raise UsageError("--retrain-steps and --group-size need --task (the data to retrain on)",
                             hint="pass --task NAME, or drop them for one-shot coding")
        if self.group_size is not None and not (isinstance(self.group_size, int) and self.group_size >= 1):
            raise UsageError(f"--group-size must be >= 1, got {self.group_size}")
        if self.retrain_lr is not None and not self.retrain_lr > 0:
            raise UsageError("--retrain-lr must be positive")

    def as_dict(self) -> dict[str, Any]:
        return _fields(self)


@dataclass(frozen=True)
class Quant:
    """Data-free quantization, levels entropy-coded. Two grids:

    * a fixed width: ``bits`` per level on a min/max grid per tensor, channel (``per_channel``)
      or group of ``group_size`` weights (the default, 8 bits, when neither of the next two is
      given);
    * entropy-constrained: a uniform step chosen for the size -- ``target_ratio`` (fp32 bytes
      over file bytes) searches it, ``step`` sets it -- with every integer level allowed,
      steps spread over tensors by ``allocation`` and rate-distortion optimised rounding
      (``rdo_lambda``; 0 is nearest rounding), or with ``dq`` dependent (trellis) quantization,
      ``rdo_lambda`` then being the trellis's rate weight. See docs/quantize.md.
    """

    name = "quant"

    bits: int | None = None  # None: 8, unless step or target_ratio is given
    symmetric: bool = False
    per_channel: bool = False
    group_size: int | None = None
    step: float | None = None
    target_ratio: float | None = None
    allocation: str = "auto"
    rdo_lambda: float = DEFAULT_LAMBDA
    task: str | None = None  # optional: report the task's metric before and after (hessian: its data)
    data: str | None = None
    device: str = "auto"
    select: Selection = Selection()  # --include/--exclude: which tensors are quantized (the rest: lossless)
    calib_samples: int = 1000  # allocation hessian: calibration inputs its sensitivities come from
    dq: bool = False  # --dq: dependent quantization on the step grid (mlcompress/codecs/quant/trellis.py)

    @property
    def entropy_constrained(self) -> bool:
        return self.step is not None or self.target_ratio is not None

    @property
    def resolved_bits(self) -> int:
        return DEFAULT_BITS if self.bits is None else self.bits

    def validate(self) -> None:
        self.select.validate()
        if self.per_channel and self.group_size is not None:
            raise UsageError("--per-channel and --group-size contradict each other",
                             hint="groups are already inside each channel: give one of them")
        if self.group_size is not None and not (isinstance(self.group_size, int) and self.group_size >= 1):
            raise UsageError(f"--group-size must be a positive integer, got {self.group_size}")
        if not self.entropy_constrained:
            if self.dq:
                raise UsageError("--dq applies to --step/--target-ratio", hint="drop --dq, or use --target-ratio R --dq")
            level_range(self.resolved_bits, self.symmetric)  # validates --bits and --symmetric
            return
        if self.bits is not None:
            if self.dq:
                raise UsageError("--dq applies to --step/--target-ratio, not to --bits",
                                 hint="--bits fixes a grid width; drop --dq or --bits")
            flag = "--step" if self.step is not None else "--target-ratio"
            raise UsageError(f"--bits and {flag} contradict each other",
                             hint="--bits fixes a grid width; --step/--target-ratio choose an entropy-coded step")
        if self.step is not None and self.target_ratio is not None:
            raise UsageError("--step and --target-ratio contradict each other", hint="give one of them")
        if self.symmetric:
            raise UsageError("--symmetric applies to --bits; the entropy-constrained grid is always symmetric")
        if self.step is not None:
            check_step(self.step)
        if self.target_ratio is not None:
            check_target_ratio(self.target_ratio)
        if self.allocation not in ALLOCATIONS:
            raise UsageError(f"unknown --allocation {self.allocation!r}", hint=f"use one of: {', '.join(ALLOCATIONS)}")
        if self.allocation == "hessian" and not self.task:
            raise UsageError("--allocation hessian needs --task (the calibration data its sensitivities come from)",
                             hint="pass --task NAME, or use --allocation auto")
        if self.allocation == "hessian" and not (isinstance(self.calib_samples, int) and self.calib_samples >= 1):
            raise UsageError(f"--calib-samples must be a positive integer, got {self.calib_samples}")
        if not (isinstance(self.rdo_lambda, (int, float)) and math.isfinite(self.rdo_lambda) and self.rdo_lambda >= 0):
            raise UsageError(f"--rdo-lambda must be a number >= 0, got {self.rdo_lambda}")

    def as_dict(self) -> dict[str, Any]:
        if self.entropy_constrained:
            keys = ("step", "target_ratio", "allocation", "rdo_lambda", "per_channel", "group_size")
            calib = {"calib_samples": self.calib_samples} if self.allocation == "hessian" else {}
            dq = {"dq": True} if self.dq else {}  # only then: headers without --dq stay as they were
            return {"method": "step", **{k: getattr(self, k) for k in keys}, **calib, **dq, **self.select.as_dict()}
        d = {k: v for k, v in asdict(self).items() if k in ("symmetric", "per_channel", "group_size")}
        return {"method": "uniform", "bits": self.resolved_bits, **d, **self.select.as_dict()}


def check_target_ratio(ratio: object) -> None:
    if not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and math.isfinite(ratio) and ratio > 1):
        raise UsageError(f"--target-ratio must be a number above 1, got {ratio!r}")


@dataclass(frozen=True)
class L2:
    """The L² learned dead-zone quantizer (seed 003), trained on ``task``'s calibration data to a
    file of ``target_ratio`` times smaller than fp32."""

    name = "l2"

    task: str = ""
    data: str | None = None
    target_ratio: float = 20.0
    calib_samples: int = 1000
    kernel: str = "cos"
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        if not self.task:
            raise UsageError("--method l2 needs --task (the model and its calibration data)")
        _positive(self.target_ratio, "--target-ratio")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"method": "l2", **{k: v for k, v in d.items() if k != "device"}}


@dataclass(frozen=True)
class Float:
    """Low-precision floating-point conversion (seed 001, eq. 1): round onto ``format``
    (``bf16``, ``fp16``, ``fp8-e4m3``, ``fp8-e5m2``), to nearest with ties to even, and store the
    result through the lossless codec. fp8 scales each conv/linear weight so its largest
    magnitude is the format's largest finite value, per tensor or per output channel
    (``per_channel``); bf16/fp16 cast every float32/float64 tensor and need no scale."""

    name = "float"

    format: str = "bf16"
    per_channel: bool = False
    task: str | None = None  # optional: report the task's metric before and after
    data: str | None = None
    device: str = "auto"
    select: Selection = Selection()  # --include/--exclude: which tensors are converted (the rest: lossless)

    def validate(self) -> None:
        self.select.validate()
        if not float_format(self.format).scaled and self.per_channel:
            raise UsageError(f"--per-channel applies to the fp8 formats; {self.format} has no scale")

    def as_dict(self) -> dict[str, Any]:
        return {"method": "float", "format": self.format, "per_channel": self.per_channel, **self.select.as_dict()}


@dataclass(frozen=True)
class Prune:
    """Prune the ``sparsity`` fraction of conv/linear weights that ``criterion`` ranks lowest:
    set to zero in a checkpoint, to the coding prior in a posterior file (docs/pruning.md).
    Optionally fine-tune on ``task`` with the mask held, optionally quantize the rest to ``bits``.

    ``criterion`` is ``random`` (seeded), ``magnitude`` (|w|, or |mean - prior mean| for a
    posterior) or ``kl`` (each variable's KL to the prior; posterior files only)."""

    name = "prune"
    CRITERIA = ("random", "magnitude", "kl")
    SCOPES = ("global", "layer")

    sparsity: float = 0.5
    criterion: str = "magnitude"
    scope: str = "global"
    task: str | None = None
    data: str | None = None
    finetune_steps: int = 0
    bits: int | None = None
    seed: int = 0
    device: str = "auto"
    select: Selection = Selection()  # --include/--exclude: which tensors are pruned (the rest: lossless)

    def validate(self) -> None:
        self.select.validate()
        check_sparsity(self.sparsity)
        if self.criterion not in self.CRITERIA:
            raise UsageError(f"unknown pruning criterion {self.criterion!r}", hint=f"use one of: {', '.join(self.CRITERIA)}")
        if self.scope not in self.SCOPES:
            raise UsageError(f"unknown pruning scope {self.scope!r}", hint=f"use one of: {', '.join(self.SCOPES)}")
        if self.finetune_steps < 0:
            raise UsageError(f"--finetune-steps must be >= 0, got {self.finetune_steps}")
        if self.finetune_steps and not self.task:
            raise UsageError("--finetune-steps needs --task (the data to fine-tune on)")
        if self.bits is not None:
            check_bits(self.bits)

    def as_dict(self) -> dict[str, Any]:
        return _fields(self)


Method = Lossless | Rec | Quant | L2 | Float | Prune


def check_sparsity(sparsity: object) -> None:
    """A pruning fraction must be in [0, 1)."""
    if not (isinstance(sparsity, (int, float)) and 0.0 <= float(sparsity) < 1.0):
        raise UsageError(f"--sparsity must be in [0, 1), got {sparsity}", hint="e.g. --sparsity 0.9 zeros 90% of the weights")


def parse_size(text: str) -> int:
    """Bytes from ``1520``, ``1.52kB``, ``3MB`` (decimal units, as ``inspect`` prints them)."""
    units = {"": 1, "b": 1, "kb": 1000, "k": 1000, "mb": 1000**2, "m": 1000**2, "gb": 1000**3, "g": 1000**3}
    t = text.strip().lower().replace(" ", "")
    number = t.rstrip("kmgb")
    try:
        value = float(number) * units[t[len(number):]]
    except (ValueError, KeyError):
        raise UsageError(f"cannot read size {text!r}", hint="use bytes or a unit: 1520, 1.52kB, 3MB") from None
    if not (math.isfinite(value) and value >= 1):
        raise UsageError(f"size must be at least 1 byte, got {text!r}")
    return int(value)
