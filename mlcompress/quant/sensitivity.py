"""How much each weight matters to a model's output: the Fisher diagonal on calibration inputs.

Why the Fisher: the quantized model is judged by how far its output distribution moves from the
original's (``mlcompress diverge``'s KL, the quantity L² distils against). For a perturbation
``dw`` of the weights, ``KL(p_w || p_{w+dw}) ≈ ½ dwᵀ F dw`` with ``F`` the Fisher information
of the model's own predictive distribution, ``E_x E_{y ~ p_w(·|x)} [g gᵀ]``, ``g = ∇_w log
p_w(y|x)``: at ``dw = 0`` the KL's gradient is zero and its Hessian *is* ``F``, exactly (no
"near an optimum" assumption, as the Gauss-Newton/empirical-Fisher readings of the loss's Hessian
need). Its diagonal ``F_i`` is the classic diagonal-Hessian proxy of Optimal Brain Damage, and
uniform rounding noise (independent across weights, variance ``step²/12``) sees only the
diagonal: the expected KL of a tensor quantized with step ``Δ`` is ``½ Δ²/12 Σ_i F_i``.

Estimate: calibration inputs come unlabelled (:meth:`~mlcompress.tasks.protocol.Task.calibration`,
the inputs ``quantize --method l2`` distils on), so the labels are drawn from the model's own
output distribution -- which is what the Fisher above asks for, rather than the *empirical*
Fisher of true labels. One label per predicted distribution (per example for a classifier, per
position for a language model), one backward pass per calibration input, ``g²`` accumulated in
float64. Within one input the positions' labels are drawn independently, so the cross terms of
``(Σ_t g_t)²`` have mean zero and the squared gradient of the summed log-likelihood is an
unbiased estimate of ``Σ_t F(t)``: a language-model window costs one backward pass, not one per
token. The result is the mean over predicted distributions (the KL ``diverge`` reports is a
mean too). The draw is seeded, so the estimate -- and the file built from it -- is the same
every run.

The model's output must be logits over its last dimension (the built-in tasks' classifiers and
the ``lm`` task's ``[batch, window, vocab]``), as L² and ``diverge`` already assume.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from mlcompress.codecs.quant.step import group_means
from mlcompress.codecs.quant.uniform import GroupLayout
from mlcompress.errors import InputError
from mlcompress.lazy import numpy as np
from mlcompress.progress import Progress, report

#: Seed of the label draw (a fixed default: the same calibration set gives the same file).
DEFAULT_SEED = 0


def sampled_log_likelihoods(model: nn.Module, inputs: torch.Tensor, *, seed: int = DEFAULT_SEED,
                            device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, int]]:
    """Per calibration input (a row of ``inputs``), in order: the summed log-likelihood of labels
    drawn from ``model``'s own output distributions (one label per distribution, seeded), still
    differentiable, and how many distributions it sums. Its gradient's square estimates the
    Fisher diagonal summed over those distributions (module docstring)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    dev = torch.device(device)
    for i in range(len(inputs)):
        logits = model(inputs[i : i + 1].to(dev))
        log_p = F.log_softmax(logits.reshape(-1, logits.shape[-1]).double(), dim=-1)
        labels = torch.multinomial(log_p.detach().exp().cpu(), 1, generator=generator).to(dev)
        yield log_p.gather(1, labels).sum(), log_p.shape[0]


def fisher_diagonal(model: nn.Module, inputs: torch.Tensor, names: Iterable[str], *, seed: int = DEFAULT_SEED,
                    device: torch.device | str = "cpu",
                    progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """The Fisher diagonal (float64, each parameter's shape) of the parameters ``names`` of
    ``model`` over the calibration ``inputs`` (one example per row), per predicted distribution.

    ``model`` is left as it was (weights, ``requires_grad`` flags); it runs in eval mode (no
    dropout). A name that is not a parameter of ``model`` is an error; a parameter the output
    does not depend on gets zeros.
    """
    if inputs is None or len(inputs) == 0:
        raise InputError("the calibration set is empty", hint="pass --calib-samples with a positive number")
    params = dict(model.named_parameters())
    names = list(names)
    missing = [n for n in names if n not in params]
    if missing:
        raise InputError(f"the task's model has no parameter {missing[0]!r} to weigh",
                         hint="the checkpoint's tensor names must be the task model's parameters")
    dev = torch.device(device)
    was_training = model.training
    flags = {n: p.requires_grad for n, p in params.items()}
    model.to(dev).eval()
    for n, p in params.items():
        p.requires_grad_(n in names)
    chosen = [params[n] for n in names]
    sums = [torch.zeros(p.shape, dtype=torch.float64, device=dev) for p in chosen]
    distributions = 0
    try:
        for i, (log_likelihood, count) in enumerate(sampled_log_likelihoods(model, inputs, seed=seed, device=dev)):
            grads = torch.autograd.grad(log_likelihood, chosen, allow_unused=True)
            for total, g in zip(sums, grads):
                if g is not None:
                    total.add_(g.double().square())
            distributions += count
            report(progress, "sensitivity", i + 1, len(inputs), "inputs")
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
        model.train(was_training)
    return {n: (total / distributions).cpu() for n, total in zip(names, sums)}


def tensor_sensitivity(fisher: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each tensor's mean Fisher diagonal: the ``mean(F_t)`` its step allocation needs."""
    return {n: float(f.mean()) for n, f in fisher.items()}


def group_sensitivity(fisher: dict[str, torch.Tensor], *, per_channel: bool = False,
                      group_size: int | None = None) -> dict[str, np.ndarray]:
    """Each group's mean Fisher diagonal (float64, flat group order), for the tensors that the
    ``--per-channel``/``--group-size`` layout cuts into more than one group: the ``mean(F_g)``
    the group steps need (:func:`mlcompress.quant.rate.group_step_factors`). Empty
    without groups, so a per-tensor plan is the one it always was."""
    out = {}
    for name, f in fisher.items():
        layout = GroupLayout.for_shape(tuple(f.shape), per_channel=per_channel, group_size=group_size)
        if layout.n_groups > 1:
            out[name] = group_means(f, layout)
    return out
