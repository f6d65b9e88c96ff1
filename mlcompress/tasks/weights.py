"""Putting a checkpoint's tensors into a task's model, with an error users can act on.

``nn.Module.load_state_dict`` fails with a multi-line message that lists every key; every
command that loads a checkpoint into a task model goes through :func:`check_state_dict_fits`
instead, which says in one line what is missing, what is extra and which shapes differ.

Tied tensors (one parameter reached under two names, such as a language model's embedding
reused as its output head) are one tensor: a checkpoint may name it once, as ``save_pretrained``
and safetensors store it, or under every name with the same values. Loading fills the one
tensor, so the tie survives.
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


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """``{alias: canonical}`` for every parameter or buffer ``model`` reaches under more than one
    name; the canonical name is the first in registration order (the one ``named_parameters``
    keeps)."""
    aliases: dict[str, str] = {}
    for named in (model.named_parameters, model.named_buffers):
        first: dict[int, str] = {}
        for name, tensor in named(remove_duplicate=False):
            if id(tensor) in first:
                aliases[name] = first[id(tensor)]
            else:
                first[id(tensor)] = name
    return aliases


def _without_aliases(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], label: str
) -> dict[str, torch.Tensor]:
    """``state_dict`` with tied aliases dropped; an alias that holds other values than its
    canonical tensor would untie the model, which is an error."""
    aliases = tied_aliases(model)
    kept = {}
    for name, tensor in state_dict.items():
        canonical = aliases.get(name)
        if canonical is None or canonical not in state_dict:
            kept[canonical or name] = tensor
        elif not torch.equal(tensor.to(state_dict[canonical].dtype), state_dict[canonical]):
            raise CheckpointError(
                f"checkpoint does not fit {label}: {name} and {canonical} are one tied tensor in the"
                " model but hold different values in the checkpoint",
                hint="store the tied tensor once, or the same values under both names",
            )
    return kept


def _expected(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict, each tied tensor under its canonical name only."""
    aliases = tied_aliases(model)
    return {name: t for name, t in model.state_dict().items() if name not in aliases}


def check_state_dict_fits(
    task_or_model: Task | nn.Module, state_dict: Mapping[str, torch.Tensor], *, label: str | None = None
) -> None:
    """Raise :class:`CheckpointError` unless ``state_dict`` has exactly the model's names and
    shapes. Dtypes may differ (loading casts), since a float16 or decoded checkpoint is fine."""
    model = task_or_model if isinstance(task_or_model, nn.Module) else task_or_model.make_model()
    if label is None:
        label = "the model" if isinstance(task_or_model, nn.Module) else f"task {task_or_model.name!r}"
    expected = _expected(model)
    state_dict = _without_aliases(model, state_dict, label)
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
    label = f"task {task.name!r}"
    check_state_dict_fits(model, state_dict, label=label)
    reference = _expected(model)
    # Every name but the tied aliases was checked present; the aliases are the same tensors.
    model.load_state_dict(
        {name: tensor.to(reference[name].dtype) for name, tensor in _without_aliases(model, state_dict, label).items()},
        strict=False,
    )
    return model.to(device).eval()
