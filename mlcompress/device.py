"""Which torch device a command runs on.

Every command takes ``--device auto|cpu|cuda``. ``auto`` means CUDA when it is usable and the CPU
otherwise, so the same command line works on a laptop and on a GPU box; asking for ``cuda`` where
there is none is a user error, not a silent fallback, because timings and memory would then mean
something else than the user thinks.
"""

from __future__ import annotations

import torch

from mlcompress.errors import InputError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The concrete device for ``spec`` (``auto``, ``cpu``, ``cuda`` or ``cuda:N``)."""
    if isinstance(spec, torch.device):
        return spec
    name = (spec or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InputError(
                "--device cuda was requested but no CUDA device is available",
                hint="use --device cpu or --device auto",
            )
        return torch.device(name)
    raise InputError(f"unknown device {spec!r}", hint="use auto, cpu or cuda")
