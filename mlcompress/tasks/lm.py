"""Built-in task ``lm``: a Hugging Face causal language model on a text file.

Compression methods that look at data (``quantize --method l2``, ``fit-posterior``, ``eval``)
need a task, and a language model's architecture lives in its model directory, not in code. So:

* **Architecture and tokenizer** come from a Hugging Face model directory: the checkpoint the
  command works on (quantize's input, fit-posterior's ``--init``, the directory evaluated), or
  ``--task lm:model=DIR`` when that file cannot say (an ``.mrc``, ``--resume``). The model is
  built from ``config.json`` with ``AutoModelForCausalLM.from_config`` (random weights: every
  command loads the checkpoint's into it), the tokenizer with ``AutoTokenizer`` from the same
  directory, local files only. transformers is imported only when the task is built, since it
  takes seconds and is an optional extra.
* **Data**: ``--data FILE``, a plain text file or JSON lines with a ``"text"`` field per line (or
  pre-tokenized ``"input_ids"``), read by :mod:`mlcompress.tasks.text` -- the reader of
  ``mlcompress diverge --data`` -- as ONE token stream (the lines of a ``.jsonl`` joined by
  newlines).
* **Windows**: the stream is cut into consecutive windows of ``window`` tokens; a window's
  targets are the same tokens shifted by one, so every token but the first is predicted exactly
  once. ``window`` is the model's ``n_positions`` capped at :data:`DEFAULT_WINDOW`, or
  ``--task lm:window=N``. A trailing part shorter than a window is dropped.
* **Split**: the last tenth of the windows (at least one) is the test set; the rest are the
  training windows, shuffled by the generator the command passes; calibration windows are a
  fixed draw from the training windows. Deterministic: the same file gives the same split.
* **Loss and metric**: next-token cross-entropy (mean over every position); the metric is
  perplexity, ``exp`` of the mean per-token cross-entropy over the test set, and lower is better
  (``higher_is_better = False``).

The model's ``forward`` takes a ``[batch, window]`` tensor of token ids and returns
``[batch, window, vocab]`` logits (a Hugging Face model returns an output object), and its state
dict names a tied tensor once (``transformer.wte.weight``, not ``lm_head.weight`` too), as
``save_pretrained`` stores it, so the tied head is never coded or stored twice.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from mlcompress.errors import InputError
from mlcompress.tasks.protocol import Batch, TensorTask
from mlcompress.tasks.text import read_token_stream
from mlcompress.tasks.weights import tied_aliases

#: Longest window (tokens) unless ``--task lm:window=N``: long enough for the model to use its
#: context, short enough that a batch's logits (batch x window x vocab floats) stay small.
DEFAULT_WINDOW = 256
#: Fraction of the windows, taken from the end of the stream, held out as the test set.
TEST_FRACTION = 0.1
#: Windows per evaluation batch: evaluation asks for 1,000 examples at a time, which for a
#: language model means gigabytes of logits.
EVAL_WINDOWS = 16
LM_EXTRA_HINT = "pip install 'mlcompress[lm]'"
_MODEL_HINT = (
    "give a Hugging Face model directory (config.json and a tokenizer): quantize DIR, "
    "fit-posterior --init DIR, eval DIR, or --task lm:model=DIR"
)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits [batch, window, vocab]`` against ``targets [batch, window]``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def _mean_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # Windows have equal lengths, so the mean over windows (evaluation weights batches by their
    # number of windows) is the mean over tokens, whose exp is the perplexity.
    return next_token_loss(logits, targets).detach()


class LanguageModelTask(TensorTask):
    """A :class:`TensorTask` over token windows that evaluates in small batches and says how
    many calibration windows there are when asked for too many."""

    def test_batches(self, batch_size: int) -> Iterator[Batch]:
        yield from super().test_batches(min(batch_size, EVAL_WINDOWS))

    def calibration(self, n: int) -> torch.Tensor:
        if n > len(self.train_inputs):
            window = self.input_shape[0]
            raise InputError(
                f"task lm has {len(self.train_inputs)} training windows of {window} tokens;"
                f" cannot take {n} for calibration",
                hint=f"pass --calib-samples {min(len(self.train_inputs), 64)} or fewer (L² keeps the teacher's"
                " logits of every calibration window: window x vocabulary floats each), or more --data",
            )
        return super().calibration(n)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise InputError("task lm needs transformers", hint=LM_EXTRA_HINT) from None
    transformers.logging.set_verbosity_error()
    return transformers


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


_LOGIT_CLASSES: dict[type, type] = {}


def _returning_logits(cls: type) -> type:
    """A subclass of the Hugging Face class ``cls`` whose ``forward(ids)`` returns the logits
    tensor. A subclass, not a wrapper module, so that parameter names stay those of the
    checkpoint (a wrapper would prefix them)."""
    if cls not in _LOGIT_CLASSES:

        def forward(self: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
            return cls.forward(self, input_ids=input_ids, use_cache=False).logits

        _LOGIT_CLASSES[cls] = type(f"{cls.__name__}Logits", (cls,), {"forward": forward, "__module__": __name__})
    return _LOGIT_CLASSES[cls]


def _drop_tied(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict hook: a tied tensor under its first name only."""
    for alias in tied_aliases(module):
        state_dict.pop(prefix + alias, None)


def _tied_are_loaded(module: nn.Module, incompatible: Any) -> None:
    """Load hook: a tied alias is filled with its canonical tensor, so it is never missing."""
    aliases = set(tied_aliases(module))
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in aliases]


def _model_directory(model: Path | str | None) -> Path:
    if model is None:
        raise InputError("task lm takes its architecture and tokenizer from a model directory, and none was given",
                         hint=_MODEL_HINT)
    path = Path(model)
    if not (path.is_dir() and (path / "config.json").is_file()):
        what = "has no config.json" if path.is_dir() else "is a file" if path.exists() else "does not exist"
        raise InputError(f"task lm needs a Hugging Face model directory, and {path} {what}", hint=_MODEL_HINT)
    return path


def _window(option: int | str | None, config: Any) -> int:
    positions = next((v for v in (getattr(config, k, None) for k in ("n_positions", "max_position_embeddings"))
                      if isinstance(v, int) and v > 0), None)
    if option is None:
        return min(DEFAULT_WINDOW, positions or DEFAULT_WINDOW)
    try:
        window = int(option)
    except ValueError:
        window = 0
    if window < 2:
        raise InputError(f"task lm: window must be an integer of at least 2, got {option!r}")
    if positions is not None and window > positions:
        raise InputError(f"task lm: window {window} is longer than the model's {positions} positions",
                         hint=f"use --task lm:window={positions} or less")
    return window


def lm_task(data: Path | str | None = None, model: Path | str | None = None, *,
            window: int | str | None = None) -> LanguageModelTask:
    """The ``lm`` task: the causal LM of the model directory ``model`` on the text file ``data``,
    cut into windows of ``window`` tokens (see the module docstring)."""
    directory = _model_directory(model)
    if data is None:
        raise InputError("task lm needs --data: a .txt file, or a .jsonl file with a \"text\" field per line")
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:  # transformers raises many types for a bad config
        raise InputError(f"{directory}: cannot read config.json ({_first_line(exc)})") from None
    length = _window(window, config)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as exc:
        raise InputError(f"{directory}: no tokenizer could be read ({_first_line(exc)})",
                         hint="task lm tokenizes --data with the model directory's tokenizer.json / tokenizer_config.json") from None
    ids = read_token_stream(Path(data), tokenize=lambda text: list(tokenizer(text)["input_ids"]),
                            field_hint="each line needs a \"text\" field (or \"input_ids\")")
    stream = torch.tensor(ids, dtype=torch.long)
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and stream.numel() and int(stream.max()) >= vocab:
        raise InputError(f"{data}: token id {int(stream.max())} is outside the model's vocabulary of {vocab}")
    count = (stream.numel() - 1) // length
    if count < 2:
        raise InputError(f"{data} has {stream.numel()} tokens: task lm needs at least two windows of {length} + 1",
                         hint="pass more text, or a shorter --task lm:window=N")
    held_out = max(1, int(count * TEST_FRACTION))
    inputs = stream[: count * length].view(count, length)
    targets = stream[1 : count * length + 1].view(count, length)

    def make_model() -> nn.Module:
        try:
            module = transformers.AutoModelForCausalLM.from_config(config)
        except Exception as exc:
            raise InputError(f"{directory}: cannot build a causal language model from config.json ({_first_line(exc)})") from None
        module.__class__ = _returning_logits(type(module))
        module.register_state_dict_post_hook(_drop_tied)
        module.register_load_state_dict_post_hook(_tied_are_loaded)
        return module.float()

    return LanguageModelTask(
        name="lm",
        model_factory=make_model,
        train_inputs=inputs[:-held_out],
        train_targets=targets[:-held_out],
        test_inputs=inputs[-held_out:],
        test_targets=targets[-held_out:],
        loss_fn=next_token_loss,
        metric_fn=_mean_cross_entropy,
        metric_name="perplexity",
        higher_is_better=False,
        metric_summary=math.exp,
        batch_size=8,
        lr=3e-4,
        epochs=1,
    )
