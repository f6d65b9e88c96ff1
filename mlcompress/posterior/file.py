"""The posterior file: what ``fit-posterior`` writes and ``encode`` reads (safetensors).

A posterior file holds, for every tensor that REC will code, a diagonal Gaussian posterior
``q = N(mean, std^2)`` and its coding prior ``p = N(prior_mean, prior_std^2)`` (one prior per
tensor), plus the block layout the posterior was fitted for; tensors that are not REC-coded
(biases, norms) are stored as plain values. Format ``mlcompress.posterior`` version 1
(docs/format.md, "Posterior file"):

Tensor keys (all float32, little-endian as safetensors stores them):

* ``<name>.mean``, ``<name>.std`` -- shape of the weight tensor; std finite and > 0;
* ``<name>.prior_mean``, ``<name>.prior_std`` -- shape ``[]``; prior_std finite and > 0;
* ``<name>.value`` -- a tensor kept as it is (any dtype), for names listed under ``fixed``.

Metadata (safetensors' string map):

* ``format`` = ``mlcompress.posterior``, ``version`` = ``1``;
* ``bits_per_block`` -- integer in [1, 24]: the REC budget of one block;
* ``layout_seed`` -- integer in [0, 2^64): seed of every coded tensor's
  :class:`~mlcompress.codecs.rec.layout.BlockLayout`;
* ``blocks`` -- JSON object ``{name: num_blocks}`` of the coded tensors, in coding order;
* ``fixed`` -- JSON list of the names stored as ``.value``, in checkpoint order;
* ``hash`` (optional) -- JSON object ``{name: shape}`` of the hashed tensors (the hashing trick):
  their ``.mean``/``.std`` are 1-D, one value per free variable, tied to the ``shape``'s weights
  as docs/format.md ("Hashing trick") specifies;
* ``parameterization`` -- how the posterior was made (``mean-kl``, ``mean-var``, ``data-free``);
  informational; optional string ``extra`` (JSON object) for the producer's own notes.

Why safetensors: no code runs on load, any tool can read it, and validation happens here, before
any encoding starts, with errors that name the key and say what is wrong.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mlcompress.atomic import atomic_output
from mlcompress.codecs.rec.hashing import Tying
from mlcompress.codecs.rec.limits import MAX_BITS_PER_BLOCK, MIN_BITS_PER_BLOCK
from mlcompress.errors import InputError

__all__ = [
    "FORMAT",
    "VERSION",
    "PosteriorTensor",
    "Posterior",
    "save_posterior",
    "load_posterior",
    "is_posterior_file",
]

FORMAT = "mlcompress.posterior"
VERSION = 1
_SUFFIXES = (".mean", ".std", ".prior_mean", ".prior_std")


@dataclass
class PosteriorTensor:
    """One coded tensor's posterior and prior, and how many REC blocks it is split into."""

    mean: torch.Tensor
    std: torch.Tensor
    prior_mean: float
    prior_std: float
    num_blocks: int
    #: The tensor's shape when it is hashed (``mean``/``std`` are then its ``[free]`` variables,
    #: tied to the weights by :class:`mlcompress.codecs.rec.hashing.Tying`); None otherwise.
    shape: tuple[int, ...] | None = None

    @property
    def hashed(self) -> bool:
        return self.shape is not None

    @property
    def tensor_shape(self) -> tuple[int, ...]:
        return tuple(self.shape) if self.shape is not None else tuple(self.mean.shape)


@dataclass
class Posterior:
    """A whole model's posterior: coded tensors (in coding order) and fixed tensors."""

    tensors: dict[str, PosteriorTensor]
    bits_per_block: int
    layout_seed: int
    fixed: dict[str, torch.Tensor] = field(default_factory=dict)
    parameterization: str = "mean-kl"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Accept 20.0 for 20: training code often carries the budget as a float.
        if isinstance(self.bits_per_block, float) and self.bits_per_block.is_integer():
            self.bits_per_block = int(self.bits_per_block)

    def weights(self, name: str, values: torch.Tensor | None = None) -> torch.Tensor:
        """Weights of the coded tensor ``name`` (its shape) from per-variable ``values`` (default
        its means): a hashed tensor's free variables expanded through its tying."""
        pt = self.tensors[name]
        values = pt.mean if values is None else values
        if not pt.hashed:
            return values.reshape(pt.tensor_shape)
        tying = Tying(math.prod(pt.shape), pt.mean.numel(), self.layout_seed)
        return tying.expand(values.reshape(-1).to(torch.float32)).reshape(pt.tensor_shape)

    def validate(self, where: str = "posterior") -> None:
        """Raise :class:`InputError` on anything the encoder could not use, naming the tensor."""
        _check_int(self.bits_per_block, "bits_per_block", MIN_BITS_PER_BLOCK, MAX_BITS_PER_BLOCK, where)
        _check_int(self.layout_seed, "layout_seed", 0, (1 << 64) - 1, where)
        overlap = set(self.tensors) & set(self.fixed)
        if overlap:
            raise InputError(f"{where}: {sorted(overlap)[0]!r} is both coded and fixed")
        for name, t in self.tensors.items():
            if t.mean.shape != t.std.shape:
                raise InputError(
                    f"{where}: {name}.mean has shape {tuple(t.mean.shape)} but {name}.std has {tuple(t.std.shape)}"
                )
            numel = t.mean.numel()
            if t.hashed:
                full = math.prod(t.shape)
                if t.mean.dim() != 1 or not 1 <= numel <= full:
                    raise InputError(f"{where}: hashed {name} must have 1-D means of 1..{full} free variables, got shape {tuple(t.mean.shape)}")
            if numel == 0:
                raise InputError(f"{where}: {name} is empty; empty tensors cannot be REC-coded")
            if not torch.isfinite(t.mean).all():
                raise InputError(f"{where}: {name}.mean has NaN or Inf values")
            if not (torch.isfinite(t.std).all() and (t.std > 0).all()):
                raise InputError(f"{where}: {name}.std must be finite and > 0 everywhere", hint="a posterior std of 0 cannot be sampled")
            if not (math.isfinite(t.prior_mean) and math.isfinite(t.prior_std) and t.prior_std > 0):
                raise InputError(f"{where}: {name} prior must have a finite mean and a finite std > 0")
            if not (isinstance(t.num_blocks, int) and 1 <= t.num_blocks <= numel):
                raise InputError(f"{where}: {name} has {t.num_blocks} blocks; need 1..{numel} (its number of weights)")


def _check_int(value: Any, key: str, lo: int, hi: int, where: str) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi):
        raise InputError(f"{where}: {key} must be an integer in [{lo}, {hi}], got {value!r}")


def save_posterior(posterior: Posterior, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Validate and write ``posterior`` to ``path`` (atomically; refuses to overwrite unless ``force``)."""
    posterior.validate()
    stored: dict[str, torch.Tensor] = {}
    for name, t in posterior.tensors.items():
        stored[f"{name}.mean"] = t.mean.detach().to("cpu", torch.float32).contiguous()
        stored[f"{name}.std"] = t.std.detach().to("cpu", torch.float32).contiguous()
        stored[f"{name}.prior_mean"] = torch.tensor(float(t.prior_mean), dtype=torch.float32)
        stored[f"{name}.prior_std"] = torch.tensor(float(t.prior_std), dtype=torch.float32)
    for name, value in posterior.fixed.items():
        stored[f"{name}.value"] = value.detach().to("cpu").contiguous().clone()
    if len(stored) != 4 * len(posterior.tensors) + len(posterior.fixed):
        raise InputError("posterior: tensor names collide once suffixed (e.g. 'a' and 'a.mean')")
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "bits_per_block": str(posterior.bits_per_block),
        "layout_seed": str(posterior.layout_seed),
        "blocks": json.dumps({n: t.num_blocks for n, t in posterior.tensors.items()}),
        "fixed": json.dumps(list(posterior.fixed)),
        "hash": json.dumps({n: list(t.shape) for n, t in posterior.tensors.items() if t.hashed}),
        "parameterization": posterior.parameterization,
        "extra": json.dumps(posterior.extra),
    }
    with atomic_output(path, force=force) as tmp:
        save_file(stored, str(tmp), metadata=metadata)
    return Path(path)


def is_posterior_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors file whose metadata names the posterior format."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as reader:
            return (reader.metadata() or {}).get("format") == FORMAT
    except Exception:  # not safetensors at all (safetensors raises several types)
        return False


def load_posterior(path: str | os.PathLike) -> Posterior:
    """Read and fully validate a posterior file; any problem is one :class:`InputError`."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist or is not a file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as reader:
            meta = dict(reader.metadata() or {})
            keys = set(reader.keys())
            tensors = {k: reader.get_tensor(k) for k in keys}
    except Exception as exc:
        raise InputError(f"{where}: not a readable safetensors file ({type(exc).__name__})") from None
    if meta.get("format") != FORMAT:
        raise InputError(f"{where}: not a posterior file (metadata format is {meta.get('format')!r}, expected {FORMAT!r})")
    if meta.get("version") != str(VERSION):
        raise InputError(f"{where}: posterior format version {meta.get('version')!r} is not supported", hint=f"this mlcompress reads version {VERSION}")
    bits = _meta_int(meta, "bits_per_block", where)
    seed = _meta_int(meta, "layout_seed", where)
    blocks = _meta_json(meta, "blocks", where, dict)
    fixed_names = _meta_json(meta, "fixed", where, list)
    extra = _meta_json(meta, "extra", where, dict) if "extra" in meta else {}
    hashed = _meta_json(meta, "hash", where, dict) if "hash" in meta else {}
    for name, shape in hashed.items():
        if name not in blocks or not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise InputError(f"{where}: metadata 'hash' entry {name!r} must name a coded tensor and give its shape")
    expected = {f"{n}{s}" for n in blocks for s in _SUFFIXES} | {f"{n}.value" for n in fixed_names}
    missing = sorted(expected - keys)
    if missing:
        raise InputError(f"{where}: metadata lists {missing[0]!r} but the file has no such tensor")
    unknown = sorted(keys - expected)
    if unknown:
        raise InputError(f"{where}: tensor {unknown[0]!r} is not described by the metadata")
    coded: dict[str, PosteriorTensor] = {}
    for name, count in blocks.items():
        for suffix in (".prior_mean", ".prior_std"):
            if tensors[name + suffix].dim() != 0:
                raise InputError(f"{where}: {name}{suffix} must be a scalar (one prior per tensor), got shape {tuple(tensors[name + suffix].shape)}")
        for suffix in _SUFFIXES:
            if not tensors[name + suffix].is_floating_point():
                raise InputError(f"{where}: {name}{suffix} must be floating point")
        if not isinstance(count, int) or isinstance(count, bool):
            raise InputError(f"{where}: blocks[{name!r}] must be an integer, got {count!r}")
        coded[name] = PosteriorTensor(
            mean=tensors[f"{name}.mean"].to(torch.float32),
            std=tensors[f"{name}.std"].to(torch.float32),
            prior_mean=float(tensors[f"{name}.prior_mean"]),
            prior_std=float(tensors[f"{name}.prior_std"]),
            num_blocks=count,
            shape=tuple(hashed[name]) if name in hashed else None,
        )
    posterior = Posterior(
        tensors=coded,
        bits_per_block=bits,
        layout_seed=seed,
        fixed={n: tensors[f"{n}.value"] for n in fixed_names},
        parameterization=str(meta.get("parameterization", "")),
        extra=extra,
    )
    posterior.validate(where)
    return posterior


def _meta_int(meta: Mapping[str, str], key: str, where: str) -> int:
    try:
        return int(meta[key])
    except KeyError:
        raise InputError(f"{where}: metadata lacks {key!r}") from None
    except ValueError:
        raise InputError(f"{where}: metadata {key!r} is not an integer: {meta[key]!r}") from None


def _meta_json(meta: Mapping[str, str], key: str, where: str, kind: type) -> Any:
    try:
        value = json.loads(meta[key])
    except KeyError:
        raise InputError(f"{where}: metadata lacks {key!r}") from None
    except json.JSONDecodeError:
        raise InputError(f"{where}: metadata {key!r} is not valid JSON") from None
    if not isinstance(value, kind):
        raise InputError(f"{where}: metadata {key!r} must be a JSON {kind.__name__}")
    return value
