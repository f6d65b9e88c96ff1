"""Finding a task by name: the built-ins, or a user's plug-in ``package.module:factory``.

A plug-in is any importable callable returning an object that satisfies
:class:`~mlcompress.tasks.protocol.Task`. It is called with ``data=DIR`` when the user passes
``--data``, and with no arguments otherwise, so factories without a data set need no parameter.

A factory that declares a ``model`` parameter also receives the path of the checkpoint the
command works on (quantize's input, fit-posterior's ``--init``, the file evaluated), because
some tasks -- a causal language model -- take their architecture from it rather than from code.
Factories without that parameter never see it.

A built-in may take options after a colon, ``NAME:key=value,key=value`` (``lm:window=128``,
``lm:model=DIR``): they go to the factory's keyword-only parameters (and ``model``), as
strings, for the factory to check. The ``=`` is what tells them from a plug-in's
``module:factory``, since a Python name cannot hold one. ``model=`` names the architecture
when the command's own file cannot (an ``.mrc`` to evaluate, ``fit-posterior --resume``).
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Callable

from mlcompress.errors import InputError
from mlcompress.tasks.digits import digits_task
from mlcompress.tasks.lenet5 import lenet5_task
from mlcompress.tasks.lm import lm_task
from mlcompress.tasks.protocol import Task

BUILTIN: dict[str, Callable[..., Task]] = {
    "lenet5": lenet5_task,
    "lm": lm_task,
    "mlp-digits": digits_task,
}

_REQUIRED = (
    "name", "input_shape", "metric_name", "batch_size", "lr", "epochs", "make_model",
    "train_batches", "test_batches", "loss", "metric", "calibration",
)


def task_names() -> list[str]:
    """Names of the built-in tasks."""
    return sorted(BUILTIN)


def get_task(spec: str, data: Path | str | None = None, model: Path | str | None = None) -> Task:
    """The task named ``spec`` (a built-in name or ``package.module:factory``), built on ``data``;
    ``model`` (the checkpoint the command works on) goes to factories that declare it."""
    name, _, rest = spec.partition(":")
    if not rest or "=" in rest:
        try:
            factory = BUILTIN[name]
        except KeyError:
            raise InputError(
                f"unknown task {name!r}",
                hint=f"built-in tasks: {', '.join(task_names())}; or a plug-in package.module:factory",
            ) from None
        options = _options(name, factory, rest)
        if "model" in options:
            model = options.pop("model")
        return factory(data, **_model_argument(factory, model), **options)
    return _plugin(spec, data, model)


def _options(name: str, factory: Callable[..., Task], text: str) -> dict[str, str]:
    """``key=value,...`` after a built-in's name, checked against the options it declares."""
    if not text:
        return {}
    parameters = inspect.signature(factory).parameters
    accepted = [p for p, v in parameters.items() if v.kind is inspect.Parameter.KEYWORD_ONLY or p == "model"]
    options: dict[str, str] = {}
    for item in text.split(","):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise InputError(f"task {name}: bad option {item!r}", hint="write options as key=value,key=value")
        if key not in accepted:
            takes = f"its options: {', '.join(accepted)}" if accepted else "it takes none"
            raise InputError(f"task {name} has no option {key!r}", hint=takes)
        options[key] = value
    return options


def _model_argument(factory: Callable[..., Task], model: Path | str | None) -> dict[str, Path]:
    """``{"model": path}`` when ``factory`` takes a ``model`` parameter and there is a path."""
    if model is None:
        return {}
    try:
        takes = "model" in inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature
        takes = False
    return {"model": Path(model)} if takes else {}


def _plugin(spec: str, data: Path | str | None, model: Path | str | None = None) -> Task:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise InputError(f"bad task plug-in {spec!r}", hint="write it as package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(
            f"cannot import task plug-in module {module_name!r}: {exc}",
            hint="make sure it is installed or on PYTHONPATH",
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise InputError(f"task plug-in {spec!r}: {module_name} has no callable {attr!r}")
    if data is not None:
        try:
            inspect.signature(factory).bind(data=data)
        except TypeError:
            raise InputError(f"task plug-in {spec!r} takes no data argument; drop --data") from None
        task = factory(data=Path(data), **_model_argument(factory, model))
    else:
        task = factory(**_model_argument(factory, model))
    missing = [name for name in _REQUIRED if not hasattr(task, name)]
    if missing:
        raise InputError(
            f"task plug-in {spec!r} returned a {type(task).__name__} without {', '.join(missing)}",
            hint="return a mlcompress.tasks.TensorTask or an object with the Task protocol's members",
        )
    return task
