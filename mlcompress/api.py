"""The public Python API: one call per thing the command line does.

    import mlcompress
    report = mlcompress.encode("model.pt", method=mlcompress.Rec(bits_per_block=16))
    weights = mlcompress.decode(report.path)

Every call takes plain values and frozen option objects and returns a typed result; the CLI is a
thin layer over these same calls. Long calls accept ``progress``, a callable receiving
:class:`~mlcompress.progress.Update` objects.

Start-up: importing this module imports neither torch nor numpy. Each call imports the method
it runs when it runs, and checks its inputs first, so ``inspect`` (0.2 s) and the error for a
missing file never pay the 2-3 s of ``import torch``. These function-level imports are the
package's deliberate exception to "imports at the top" (tests/test_layering.py allows them here
only).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from mlcompress.container import open_mrc
from mlcompress.errors import InputError, UsageError
from mlcompress.inspection import inspect_file
from mlcompress.options import L2, Float, Lossless, Method, Prune, Quant, Rec, parse_size
from mlcompress.progress import Progress, Update
from mlcompress.report import Report

if TYPE_CHECKING:  # pragma: no cover
    from mlcompress.divergence.compare import DivergeOptions, DivergeReport
    from mlcompress.posterior.fit import FitConfig

__all__ = ["encode", "encode_bytes", "decode", "decode_bytes", "decode_file", "inspect", "fit_posterior", "train",
           "evaluate", "diverge", "Report", "Update", "Progress", "Method", "Rec", "Lossless", "Quant", "L2", "Float",
           "Prune", "parse_size"]

Source = str | os.PathLike | Mapping[str, Any]


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist")
    return path


def encode(src: Source, dst: str | os.PathLike | None = None, *, method: Method | None = None, force: bool = False,
           unsafe_pickle: bool = False, progress: Progress | None = None,
           dequantized: str | os.PathLike | None = None, device: str = "auto", threads: int | None = None) -> Report:
    """Compress ``src`` (a checkpoint path, a posterior file, or a dict of tensors) into ``dst``.

    ``dst`` defaults to ``src`` with the suffix ``.mrc`` (required when ``src`` is a dict).
    ``method`` is one of ``Rec()``, ``Lossless()``, ``Quant()``, ``L2()``, ``Float()``, ``Prune()``;
    ``None`` means REC for a posterior file (what ``fit-posterior`` wrote) and is an error otherwise.
    ``dequantized`` (``Quant``/``L2``/``Float`` only) also writes the reconstructed weights there.
    ``device`` is where that automatic REC runs; a given method carries its own. ``threads``
    (``Lossless`` only; default: all cores) code each tensor's chunks in parallel, without
    changing a byte of the file.
    """
    tensors = None if isinstance(src, (str, os.PathLike)) else dict(src)
    if tensors is None:
        src = _existing(src)
    elif dst is None:
        raise UsageError("encoding a dict of tensors needs dst")
    name = src if tensors is None else Path(dst).name
    posterior = None
    if method is None:  # the one method that needs no choosing: REC of a posterior file
        from mlcompress.posterior.file import is_posterior_file, load_posterior

        if tensors is not None or not src.is_file() or not is_posterior_file(src):
            raise UsageError("choose how to encode",
                             hint="pass --lossless, or REC with --bits-per-block / --bits-per-weight / --kl-budget / --target-size")
        posterior, method = load_posterior(src), Rec(device=device)
    if isinstance(method, Rec):
        from mlcompress.rec.compress import encode_rec

        return encode_rec(name, dst, options=method, force=force, unsafe_pickle=unsafe_pickle, progress=progress,
                          tensors=tensors, posterior=posterior)
    if isinstance(method, Lossless):
        from mlcompress.lossless import encode_lossless

        return encode_lossless(name, dst, force=force, unsafe_pickle=unsafe_pickle, progress=progress, tensors=tensors,
                               threads=threads)
    if tensors is not None:
        raise UsageError(f"method {method.name} reads a checkpoint file; save the tensors first")
    if dequantized is not None and not isinstance(method, (Quant, L2, Float)):
        raise UsageError("a dequantized copy (--safetensors) comes from quantization only")
    if isinstance(method, (Quant, L2, Float)):
        from mlcompress.quant.quantize import quantize_checkpoint

        if isinstance(method, Quant):
            kwargs: dict[str, Any] = dict(method="uniform", bits=method.bits, symmetric=method.symmetric,
                                          per_channel=method.per_channel, group_size=method.group_size,
                                          step=method.step, target_ratio=method.target_ratio,
                                          allocation=method.allocation, rdo_lambda=method.rdo_lambda,
                                          task=method.task, data=method.data, device=method.device,
                                          select=method.select, calib_samples=method.calib_samples, dq=method.dq)
        elif isinstance(method, Float):
            kwargs = dict(method="float", float_format=method.format, per_channel=method.per_channel,
                          task=method.task, data=method.data, device=method.device, select=method.select)
        else:
            kwargs = dict(method="l2", task=method.task, data=method.data, target_ratio=method.target_ratio,
                          calib_samples=method.calib_samples, kernel=method.kernel, seed=method.seed,
                          device=method.device)
        return quantize_checkpoint(src, output=dst, safetensors=dequantized, force=force, unsafe_pickle=unsafe_pickle,
                                   progress=progress, **kwargs)
    if isinstance(method, Prune):
        from mlcompress.prune import prune_file

        return prune_file(src, sparsity=method.sparsity, criterion=method.criterion, scope=method.scope,
                          task=method.task, data=method.data, finetune_steps=method.finetune_steps,
                          bits=method.bits, output=dst, force=force, unsafe_pickle=unsafe_pickle,
                          seed=method.seed, device=method.device, select=method.select, progress=progress)
    raise UsageError(f"unknown method {method!r}", hint="use Rec(), Lossless(), Quant(), L2(), Float() or Prune()")


def encode_bytes(src: Source, *, method: Method | None = None, unsafe_pickle: bool = False,
                 progress: Progress | None = None) -> bytes:
    """:func:`encode`, returning the ``.mrc`` file's bytes instead of writing it."""
    with tempfile.TemporaryDirectory(prefix="mlcompress-") as tmp:
        out = Path(tmp) / "model.mrc"
        encode(src, out, method=method, unsafe_pickle=unsafe_pickle, progress=progress)
        return out.read_bytes()


def _decoded(mrc: Any, device: str, keep_dtype: bool, threads: int | None = None) -> dict[str, Any]:
    from mlcompress.device import resolve_device

    if not keep_dtype:
        return mrc.tensors(device=resolve_device(device), threads=threads)
    from mlcompress.checkpoint.mrc_tensors import decoded_dict, decoded_tensors, plan_decode

    plan = plan_decode(mrc, keep_dtype=True)
    return decoded_dict(plan, decoded_tensors(mrc, plan, device=resolve_device(device), threads=threads))


def decode(source: str | os.PathLike | bytes, *, device: str = "cpu", keep_dtype: bool = False,
           threads: int | None = None) -> dict[str, Any]:
    """Every tensor of a ``.mrc`` file (a path or its bytes), decoded on ``device``.

    Names, shapes and dtypes are the ones encoded; tied tensors come back as one tensor object.
    The bits never depend on the device (``auto``, ``cpu`` or ``cuda``). ``keep_dtype`` leaves
    tensors converted by ``Float`` in their low-precision format (fp8 ones with a float32
    ``<name>_scale`` beside them, docs/quantize.md) instead of the dtype they were encoded from.
    ``threads`` (default: all cores) decode a ``lossless3``/``lossless2`` tensor's chunks in parallel.
    """
    return _decoded(open_mrc(source), device, keep_dtype, threads)


def decode_bytes(data: bytes, *, device: str = "cpu", keep_dtype: bool = False,
                 threads: int | None = None) -> dict[str, Any]:
    """:func:`decode` of a ``.mrc`` file held in memory."""
    return decode(bytes(data), device=device, keep_dtype=keep_dtype, threads=threads)


def decode_file(src: str | os.PathLike, dst: str | os.PathLike | None = None, *, force: bool = False,
                device: str = "cpu", keep_dtype: bool = False, threads: int | None = None,
                like: str | os.PathLike | None = None, max_shard_size: int | str | None = None,
                progress: Progress | None = None) -> Report:
    """Decode ``src`` and save the weights to ``dst`` (default: ``src`` as ``.safetensors``).

    ``dst`` ending in ``/`` (a string) or naming an existing directory writes a Hugging Face
    model directory that ``from_pretrained`` loads: weights sharded at ``max_shard_size`` bytes
    (an int or ``"2GB"``; default 50 GB, transformers' own), the ``config.json`` the ``.mrc``
    keeps, and the tokenizer and other small files of ``like`` (the source model directory;
    required when the ``.mrc`` keeps no config). A ``.safetensors`` file and directories are
    written one tensor at a time (memory about the largest tensor, not the model); ``.pt`` is
    decoded whole first. The report's ``path`` is what was written; its sizes are those of the
    ``.mrc``, with ``output_bytes`` and ``output_files`` among the details. Nothing is written
    unless every tensor decodes. ``keep_dtype`` and ``threads`` are :func:`decode`'s;
    ``progress`` receives ``"decode"`` updates, in tensors.
    """
    start = time.perf_counter()
    directory = dst is not None and (str(dst).endswith(("/", os.sep)) or Path(dst).is_dir())
    shard_bytes = parse_size(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size
    mrc = open_mrc(src)
    from mlcompress.checkpoint import save_decoded
    from mlcompress.device import resolve_device

    dst = Path(dst) if dst is not None else Path(src).with_suffix(".safetensors")
    out = save_decoded(mrc, dst, directory=directory, keep_dtype=keep_dtype, device=resolve_device(device),
                       threads=threads, like=like, max_shard_size=shard_bytes, force=force, progress=progress)
    details = {"input": str(src), "output_bytes": out.bytes, "output_files": [f.name for f in out.files]}
    return Report.of(mrc, mrc.metadata.get("options", {}).get("method", "?"), time.perf_counter() - start, details,
                     path=dst)


def inspect(path: str | os.PathLike) -> Report:
    """What a ``.mrc`` holds: the report, with per-tensor ``rows``, ``metadata`` and
    ``format_version`` among its details. Reads the header only; never imports torch."""
    return inspect_file(Path(path))


def fit_posterior(task: str, init: str | os.PathLike | None, dst: str | os.PathLike, *,
                  config: "FitConfig | None" = None, data: str | os.PathLike | None = None,
                  checkpoint: str | os.PathLike | None = None, resume: bool = False, device: str = "auto",
                  force: bool = False, unsafe_pickle: bool = False, progress: Progress | None = None,
                  **settings: Any) -> dict[str, Any]:
    """Train a Gaussian posterior for REC on ``task`` from the trained model ``init``, write it
    to ``dst``, and return its summary. Give ``config`` (a
    :class:`~mlcompress.posterior.fit.FitConfig`) or its fields as keywords (``steps=``,
    ``bits_per_block=``, ``parameterization=``...)."""
    if config is not None and settings:
        raise UsageError("give FitConfig or keyword settings, not both")
    if init is not None:
        _existing(init)
    if init is None and not resume:
        raise UsageError("fit-posterior needs --init (a trained model of the task)", hint="train one with mlcompress train")
    from mlcompress.posterior.fit import FitConfig, fit_to_file
    from mlcompress.tasks import get_task

    ckpt = Path(checkpoint) if checkpoint is not None else Path(dst).with_name(Path(dst).name + ".ckpt")
    return fit_to_file(get_task(task, data, init), init, config or FitConfig(**settings), dst, checkpoint=ckpt, resume=resume,
                       device=device, force=force, progress=progress, unsafe_pickle=unsafe_pickle)


def train(task: str, dst: str | os.PathLike, *, data: str | os.PathLike | None = None, force: bool = False,
          progress: Progress | None = None, **options: Any) -> dict[str, Any]:
    """Train a plain model of ``task`` and save it to ``dst``; ``options``: epochs, steps, lr,
    batch_size, seed, device."""
    from mlcompress.tasks import get_task
    from mlcompress.tasks.training import train_to_file

    return train_to_file(get_task(task, data), dst, force=force, progress=progress, **options)


def evaluate(task: str, path: str | os.PathLike, *, data: str | os.PathLike | None = None, samples: int = 0,
             seed: int = 0, device: str = "auto", unsafe_pickle: bool = False,
             progress: Progress | None = None) -> dict[str, Any]:
    """Test-set loss and metric of the weights in ``path`` (any checkpoint, ``.mrc`` or posterior)."""
    _existing(path)
    from mlcompress.posterior.evaluation import evaluate_file
    from mlcompress.tasks import get_task

    return evaluate_file(get_task(task, data, path), path, samples=samples, seed=seed, device=device,
                         unsafe_pickle=unsafe_pickle, progress=progress)


def diverge(ref: str | os.PathLike | None, cmp: str | os.PathLike, options: "DivergeOptions | None" = None, *,
            progress: Progress | None = None, **settings: Any) -> "DivergeReport":
    """How far ``cmp``'s predictions are from ``ref``'s: KL, JS, flips... per token or example.

    Give ``options`` (a :class:`~mlcompress.divergence.compare.DivergeOptions`) or its fields as
    keywords (``data=``, ``ctx=``, ``score=``...).
    """
    _existing(cmp)
    if ref is not None:
        _existing(ref)
    from mlcompress.divergence.compare import DivergeOptions, diverge as run

    if options is not None and settings:
        raise UsageError("give DivergeOptions or keyword settings, not both")
    return run(ref, cmp, options or DivergeOptions(**settings), progress=progress)
