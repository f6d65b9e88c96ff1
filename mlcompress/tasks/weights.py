"""Putting a checkpoint's tensors into a task's model, with an error users can act on.

``nn.Module.load_state_dict`` fails with a multi-line message that lists every key; every
command that loads a checkpoint into a task model goes through :func:`check_state_dict_fits`
instead, which says in one line what is missing, what is extra and which shapes differ.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from mlcompress.errors import CheckpointError
from mlcompress.tasks.protocol import Task

_SHOWN = 3  # names listed per kind of mismatch; the rest are counted


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def check_state_dict_fits(
    task_or_model: Task | nn.Module, state_dict: Mapping[str, torch.Tensor], *, label: str | None = None
) -> None:
    """Raise :class:`CheckpointError` unless ``state_dict`` has exactly the model's names and
    shapes. Dtypes may differ (loading casts), since a float16 or decoded checkpoint is fine."""
    model = task_or_model if isinstance(task_or_model, nn.Module) else task_or_model.make_model()
    expected = model.state_dict()
    if label is None:
        label = "the model" if isinstance(task_or_model, nn.Module) else f"task {task_or_model.name!r}"
    missing = [name for name in expected if name not in state_dict]
    unexpected = [name for name in state_dict if name not in expected]
    reshaped = [
        f"{name} is {tuple(state_dict[name].shape)} not {tuple(tensor.shape)}"
        for name, tensor in expected.items()
        if name in state_dict and tuple(state_dict[name].shape) != tuple(tensor.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected {_listed(unexpected)}")
    if reshaped:
        problems.append(_listed(reshaped))
    if problems:
        raise CheckpointError(
            f"checkpoint does not fit {label}: {'; '.join(problems)}",
            hint="was it trained for another task? pass the matching --task",
        )


def load_task_model(
    task: Task, state_dict: Mapping[str, torch.Tensor], device: torch.device | str = "cpu"
) -> nn.Module:
    """A model of ``task`` holding ``state_dict`` (checked first), on ``device``, in eval mode."""
    model = task.make_model()
    check_state_dict_fits(model, state_dict, label=f"task {task.name!r}")
    reference = model.state_dict()
    model.load_state_dict(
        {name: tensor.to(reference[name].dtype) for name, tensor in state_dict.items()}
    )
    return model.to(device).eval()
