"""Divergence between two classifiers of a task: predictive distributions and answer flips.

Accuracy alone hides what compression did: answers flip in both directions while the accuracy
barely moves (Dutta et al., 2024). So besides both accuracies we count flips (correct -> wrong
and wrong -> correct) and measure KL/JS between the two predictive distributions on every test
example, with the same statistics as for language models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mlcompress.checkpoint import load_checkpoint
from mlcompress.divergence.lm import PhaseTimer
from mlcompress.divergence.measures import TokenMeasures, token_measures
from mlcompress.divergence.models import model_kind
from mlcompress.divergence.report import headline_from_block, measure_block
from mlcompress.divergence.stats import binomial_rate
from mlcompress.errors import CheckpointError
from mlcompress.tasks import Task, load_task_model

EVAL_BATCH = 500


def load_classifier(
    spec: str | Path, task: Task, device: torch.device, *, unsafe_pickle: bool = False
) -> nn.Module:
    """A model of ``task`` from a weights file (checked against the task) or a TorchScript file."""
    path = Path(spec)
    if model_kind(path) == "torchscript":
        try:
            module = torch.jit.load(str(path), map_location=device)
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot load TorchScript ({str(exc).splitlines()[0]})") from None
        return module.eval()
    return load_task_model(task, load_checkpoint(path, unsafe_pickle=unsafe_pickle), device)


@dataclass
class ClassifierOutcomes:
    """Per-example results of both models on (a share of) the test set: enough for the report,
    and concatenable across processes in batch order."""

    measures: TokenMeasures
    ref_ok: torch.Tensor  # bool [examples]: the reference's answer is right
    cmp_ok: torch.Tensor
    timer: PhaseTimer

    @staticmethod
    def cat(parts: list["ClassifierOutcomes"], timer: PhaseTimer) -> "ClassifierOutcomes":
        return ClassifierOutcomes(TokenMeasures.cat([p.measures for p in parts]),
                                  torch.cat([p.ref_ok for p in parts]), torch.cat([p.cmp_ok for p in parts]), timer)


def count_test_batches(task: Task, batch_size: int) -> int:
    """How many test batches ``task`` yields (what data-parallel runs share out)."""
    inputs = getattr(task, "test_inputs", None)
    if inputs is not None:
        return -(-len(inputs) // batch_size)
    return sum(1 for _ in task.test_batches(batch_size))


@torch.no_grad()
def classifier_outcomes(
    task: Task,
    ref: nn.Module,
    cmp: nn.Module,
    *,
    device: torch.device,
    batch_size: int = EVAL_BATCH,
    progress: Callable[[int], None] | None = None,
    batches: range | None = None,
) -> ClassifierOutcomes:
    """Both models on every test batch, or on the batches numbered ``batches`` (a share)."""
    parts: list[TokenMeasures] = []
    ref_ok_all, cmp_ok_all = [], []
    timer = PhaseTimer(device)
    for index, (inputs, targets) in enumerate(task.test_batches(batch_size)):
        if batches is not None and index not in batches:
            continue
        inputs, targets = inputs.to(device), targets.to(device)
        timer.start()
        out_ref, out_cmp = ref(inputs), cmp(inputs)
        timer.forward_done()
        m = token_measures(out_ref, out_cmp, targets).to("cpu")
        parts.append(m)
        ref_ok_all.append((out_ref.argmax(-1) == targets).cpu())
        cmp_ok_all.append((out_cmp.argmax(-1) == targets).cpu())
        timer.measures_done()
        if progress is not None:
            progress(len(targets))
    empty = torch.zeros(0, dtype=torch.bool)
    return ClassifierOutcomes(TokenMeasures.cat(parts), torch.cat(ref_ok_all) if ref_ok_all else empty,
                              torch.cat(cmp_ok_all) if cmp_ok_all else empty, timer)


def classifier_report(task: Task, outcomes: ClassifierOutcomes) -> dict[str, Any]:
    """The report (a JSON-able dict with ``headline``) of the outcomes on the whole test set."""
    m, ref_ok, cmp_ok, timer = outcomes.measures, outcomes.ref_ok, outcomes.cmp_ok, outcomes.timer
    n = int(ref_ok.numel())
    block = measure_block(m)
    acc_ref, se_ref = binomial_rate(int(ref_ok.sum()), n)
    acc_cmp, se_cmp = binomial_rate(int(cmp_ok.sum()), n)
    c2w = int((ref_ok & ~cmp_ok).sum())
    w2c = int((~ref_ok & cmp_ok).sum())
    report: dict[str, Any] = {
        "mode": "classifier",
        "task": task.name,
        **block,
        "accuracy": {"ref": acc_ref, "ref_stderr": se_ref, "cmp": acc_cmp, "cmp_stderr": se_cmp},
        "flips": {
            "correct_to_wrong": c2w,
            "wrong_to_correct": w2c,
            "total": c2w + w2c,
            "rate": (c2w + w2c) / n if n else float("nan"),
        },
        "timing": {"forward_s": timer.forward_s, "measures_s": timer.measures_s},
        "notes": [],
    }
    headline = headline_from_block(block)
    headline.update(
        {
            "accuracy_ref": acc_ref,
            "accuracy_cmp": acc_cmp,
            "accuracy_drop": acc_ref - acc_cmp,
            "flips": float(c2w + w2c),
            "flip_rate": report["flips"]["rate"],
            "flips_correct_to_wrong": float(c2w),
        }
    )
    report["headline"] = headline
    return report
