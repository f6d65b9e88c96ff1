"""Scaling out over ``torch.distributed``: one process per core group or GPU, launched by torchrun.

``torchrun --nproc-per-node N -m mlcompress diverge|encode|fit-posterior|quantize ...`` starts N copies of
the command. Each finds out here who it is (:func:`join`: rank, world size, local rank from
torchrun's environment), works on its contiguous share of the items (:meth:`World.share`),
and hands its results to process 0 (:meth:`World.gather`), which alone writes files and prints.
Why this shape:

* **One process behaves exactly as before.** Without torchrun (or with one process) :func:`join`
  returns :data:`SINGLE`, creates no process group, and every method is the identity: the code
  paths of a plain run are the ones it always had.
* **Contiguous shares in whole units.** Results are concatenated in rank order, so they come out
  in the order one process produces them; shares are made of whole batches (diverge) or whole
  block groups (REC), so each unit is computed from exactly the inputs one process would give it.
* **A failure anywhere stops everyone, cleanly.** Work between two collectives runs inside
  :meth:`World.guard`; leaving the guard is a sync point where all processes exchange their
  status, so a one-line error on one process becomes :class:`ProcessFailed` (same exit code,
  one line naming the process) on all others, instead of a hang at the next collective. The
  process group has a timeout (``MLCOMPRESS_DIST_TIMEOUT``, seconds) for what no guard can see
  (a process killed outright); torchrun then stops the rest.

Backends: gloo on the CPU, NCCL with ``--device cuda`` (one GPU per process: ``LOCAL_RANK``).
torch is imported lazily so the command line's start-up (``--help``, usage errors) stays light.
"""

from __future__ import annotations

import atexit
import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Iterator

from mlcompress.errors import InputError, MlcompressError, UsageError
from mlcompress.lazy import LazyModule, torch

if TYPE_CHECKING:  # pragma: no cover
    import torch as torch_types

dist: Any = LazyModule("torch.distributed")

__all__ = ["World", "SINGLE", "ProcessFailed", "launched", "main_process", "join", "refuse_if_launched",
           "TIMEOUT_ENV", "FAULT_ENV"]

#: Seconds a collective may wait for the other processes before the run is declared hung.
TIMEOUT_ENV = "MLCOMPRESS_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
#: Tests only (honoured when pytest runs the process): the rank that fails at its first guard.
FAULT_ENV = "MLCOMPRESS_TEST_FAULT_RANK"
#: Bytes per message when a file is streamed to process 0.
_PIECE = 16 << 20


class ProcessFailed(MlcompressError):
    """Another process of the run failed (or could not be reached); this one stops too, with
    that process's exit code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def launched() -> bool:
    """Whether this process is one of several started by torchrun (``WORLD_SIZE`` > 1)."""
    return _env_int("WORLD_SIZE", 1) > 1


def main_process() -> bool:
    """Whether this process prints and writes: process 0 of a torchrun launch, or a plain run."""
    return _env_int("RANK", 0) == 0


def refuse_if_launched(what: str) -> None:
    """A usage error (on every process alike) for ``what`` under torchrun: it is not sharded,
    and N copies of it would only race on its output."""
    if launched():
        raise UsageError(f"{what} runs in one process, not under torchrun",
                         hint="launch it without torchrun; encode (REC), diverge, fit-posterior and "
                              "quantize --method l2 scale out")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


@dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``size`` processes, ``local_rank`` on its
    machine. ``World()`` is the one-process run, whose collectives are identities."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- work ----------------------------------------------------------------------------------

    def share(self, count: int, unit: int = 1) -> range:
        """This process's contiguous share of ``range(count)``, cut at multiples of ``unit``
        (whole batches, whole block groups); the first ``(units % size)`` processes get one unit
        more, so process 0 has work whenever there is any, and extra processes idle."""
        if unit < 1:
            raise ValueError(f"unit must be positive, got {unit}")
        units = -(-count // unit)
        base, extra = divmod(units, self.size)
        first = self.rank * base + min(self.rank, extra)
        last = first + base + (1 if self.rank < extra else 0)
        return range(min(count, first * unit), min(count, last * unit))

    # -- failures ------------------------------------------------------------------------------

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Run a stretch of work that may fail on some processes only; leaving it is a sync
        point. A process that failed re-raises its own error; the others raise
        :class:`ProcessFailed` naming it. One process: no sync, nothing added."""
        if not self.distributed:
            yield
            return
        try:
            _injected_fault(self.rank)
            yield
        except BaseException as exc:
            try:
                self._exchange(exc)
            except ProcessFailed:
                pass  # our own error is the one to report
            raise
        self._exchange(None)

    def _exchange(self, error: BaseException | None) -> None:
        status = None if error is None else (self.rank, _exit_code(error), _one_line(error))
        statuses: list[Any] = [None] * self.size
        self._collective(dist.all_gather_object, statuses, status)
        failed = [s for s in statuses if s is not None]
        if failed and error is None:
            rank, code, message = failed[0]
            raise ProcessFailed(f"process {rank} of {self.size} failed: {message}", exit_code=code)

    def _collective(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        """A collective whose failure (a peer gone, the timeout) is one line, not a traceback."""
        try:
            return call(*args, **kwargs)
        except MlcompressError:
            raise
        except Exception as exc:
            text = " ".join(str(exc).split())[:200]
            raise ProcessFailed(f"process {self.rank} lost contact with the other processes: {text}") from None

    # -- results -------------------------------------------------------------------------------

    def gather(self, obj: Any) -> list[Any] | None:
        """Every process's ``obj`` on process 0, in rank order (None elsewhere). Objects are
        pickled (tensors included): for per-token values, indices and small state."""
        if not self.distributed:
            return [obj]
        out: list[Any] | None = [None] * self.size if self.is_main else None
        self._collective(dist.gather_object, obj, out, dst=0)
        return out

    def gather_cat(self, tensor: "torch_types.Tensor") -> "torch_types.Tensor | None":
        """The processes' CPU tensors concatenated along dim 0 on process 0, in rank order."""
        parts = self.gather(tensor.cpu())
        return None if parts is None else torch.cat(parts)

    def broadcast(self, obj: Any) -> Any:
        """Process 0's ``obj`` on every process (what it wrote or measured, for the return value)."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        self._collective(dist.broadcast_object_list, box, src=0)
        return box[0]

    def all_reduce_sum(self, tensor: "torch_types.Tensor") -> "torch_types.Tensor":
        """``tensor`` summed over the processes, in place (gradients: one flat buffer per step)."""
        if self.distributed:
            self._collective(dist.all_reduce, tensor, op=dist.ReduceOp.SUM)
        return tensor

    def append_files(self, local: IO[bytes] | None, sink: IO[bytes] | None) -> None:
        """Stream every other process's ``local`` file (read from its start) onto process 0's
        ``sink``, in rank order and in pieces, so a part far larger than memory crosses
        machines without a shared file system."""
        if not self.distributed:
            return
        device = self._wire_device()
        for src in range(1, self.size):
            if self.rank == src:
                assert local is not None
                local.flush()
                local.seek(0, os.SEEK_END)
                size = local.tell()
                local.seek(0)
                self._collective(dist.send, torch.tensor([size], dtype=torch.int64, device=device), dst=0)
                while size > 0:
                    piece = local.read(min(_PIECE, size))
                    size -= len(piece)
                    data = torch.frombuffer(bytearray(piece), dtype=torch.uint8).to(device)
                    self._collective(dist.send, data, dst=0)
            elif self.is_main:
                assert sink is not None
                head = torch.zeros(1, dtype=torch.int64, device=device)
                self._collective(dist.recv, head, src=src)
                size = int(head[0])
                while size > 0:
                    data = torch.empty(min(_PIECE, size), dtype=torch.uint8, device=device)
                    self._collective(dist.recv, data, src=src)
                    sink.write(data.cpu().numpy().tobytes())
                    size -= data.numel()

    def _wire_device(self) -> "torch_types.device":
        """NCCL moves CUDA tensors only; gloo moves CPU tensors."""
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


SINGLE = World()
_joined: World | None = None


def join(device: str | Any = "cpu") -> World:
    """This process's :class:`World`, starting the process group on the first call under
    torchrun (gloo, or NCCL when ``device`` is CUDA, each process on GPU ``LOCAL_RANK``).
    Without torchrun: :data:`SINGLE`, and no process group."""
    global _joined
    if not launched():
        return SINGLE
    if _joined is not None:
        return _joined
    rank, size, local = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    cuda = _wants_cuda(device)
    if cuda:
        if not torch.cuda.is_available():
            raise InputError("--device cuda was requested but no CUDA device is available",
                             hint="use --device cpu or --device auto")
        if local >= torch.cuda.device_count():
            raise InputError(f"process {rank} (LOCAL_RANK {local}) has no GPU of its own: "
                             f"{torch.cuda.device_count()} visible",
                             hint="start at most one process per GPU (--nproc-per-node)")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=_timeout_s())
        try:
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
        except Exception as exc:
            text = " ".join(str(exc).split())[:200]
            raise InputError(f"process {rank} could not join the other {size - 1}: {text}",
                             hint="check torchrun's --rdzv-endpoint / --master-addr and that every node can reach it") from None
        atexit.register(_leave)
    _joined = World(rank, size, local)
    return _joined


#: Seconds the processes wait for each other at exit before tearing the group down anyway.
LEAVE_TIMEOUT_S = 20.0


def _leave() -> None:
    """Tear the group down, all processes together. Why the barrier: gloo aborts a process
    ("terminate called without an active exception", SIGABRT) when its peer closes the
    connection while it is still tearing down, which made short runs fail at exit now and then.
    The wait is bounded, so a process that died does not hold the others."""
    if not dist.is_initialized():
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=LEAVE_TIMEOUT_S))
        else:
            dist.barrier()
    except Exception:  # a peer is gone: nothing to wait for
        pass
    dist.destroy_process_group()


def _wants_cuda(device: Any) -> bool:
    name = str(device or "auto").strip().lower()
    if name == "auto":
        return bool(torch.cuda.is_available())
    return name.startswith("cuda")


def _timeout_s() -> float:
    value = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise UsageError(f"{TIMEOUT_ENV}={value!r} is not a number of seconds") from None
    if not seconds > 0:
        raise UsageError(f"{TIMEOUT_ENV} must be positive, got {value}")
    return seconds


def _injected_fault(rank: int) -> None:
    """The failure tests inject on one process (never outside pytest): proof that the others
    stop with a message instead of waiting."""
    if os.environ.get("PYTEST_CURRENT_TEST") and os.environ.get(FAULT_ENV) == str(rank):
        raise InputError(f"injected fault on process {rank} ({FAULT_ENV})")


def _exit_code(error: BaseException) -> int:
    return error.exit_code if isinstance(error, MlcompressError) else 1


def _one_line(error: BaseException) -> str:
    if isinstance(error, MlcompressError):
        return error.one_line()
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    text = " ".join(str(error).split())
    return f"internal error: {type(error).__name__}: {text}"[:300]

