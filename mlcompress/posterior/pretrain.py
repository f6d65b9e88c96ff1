"""Training a model with its hashed tensors tied, before any posterior: MIRACLE's first phase.

Tying a trained layer 50:1 after the fact averages ~50 unrelated weights into each free
variable, which destroys the layer; MIRACLE trains the tied network from scratch without KL
first (2x10^5 steps in its paper). Here the tied network starts from the trained model projected
onto its free variables (the least-squares projection, so untied tensors keep their values) and
is trained with Adam at the task's learning rate, cosine-decayed, on deterministic weights. The
result is a state dict whose hashed tensors are exactly their free variables expanded, which the
variational model then projects back without loss.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn
from torch.func import functional_call

from mlcompress.codecs.rec.hashing import Tying
from mlcompress.errors import MlcompressError
from mlcompress.progress import Progress, report
from mlcompress.tasks import Task, check_state_dict_fits

__all__ = ["project", "pretrain_tied"]


def project(weights: torch.Tensor, tying: Tying,
            ties: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The free variables closest to ``weights`` in least squares: each the mean of its tied
    weights with their signs undone (float64). ``ties``: the tying's ``index_and_sign()``, when
    the caller has it already."""
    index, sign = ties if ties is not None else tying.index_and_sign()
    flat = weights.detach().reshape(-1).to(torch.float64).cpu()
    total = torch.zeros(tying.free, dtype=torch.float64).index_add_(0, index, flat * sign.double())
    return total / torch.bincount(index, minlength=tying.free).double()


def pretrain_tied(task: Task, init: Mapping[str, torch.Tensor], tying: Mapping[str, Tying], *, steps: int,
                  seed: int = 0, batch_size: int | None = None, lr: float | None = None,
                  device: torch.device | str = "cpu", progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """``steps`` Adam steps of the task loss with the ``tying`` tensors tied; the trained state dict."""
    check_state_dict_fits(task, init)
    device = torch.device(device)
    model = task.make_model()
    reference = model.state_dict()
    model.load_state_dict({name: t.to(reference[name].dtype) for name, t in init.items()})
    model.to(device)
    params = dict(model.named_parameters())
    free: dict[str, nn.Parameter] = {}
    ties: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, t in tying.items():
        index, sign = t.index_and_sign()
        ties[name] = (index.to(device), sign.to(device))
        free[name] = nn.Parameter(project(params[name], t, (index, sign)).to(device=device, dtype=params[name].dtype))
        params[name].requires_grad_(False)
    trainable = [p for n, p in params.items() if n not in tying] + list(free.values())
    lr = task.lr if lr is None else lr
    optimizer = torch.optim.Adam(trainable, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    batch_size = batch_size or task.batch_size

    def tied() -> dict[str, torch.Tensor]:
        return {n: (free[n][ties[n][0]] * ties[n][1]).reshape(params[n].shape) for n in tying}

    step = 0
    model.train()
    while step < steps:
        for inputs, targets in task.train_batches(batch_size, generator):
            for group in optimizer.param_groups:
                group["lr"] = lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * step / steps)))
            loss = task.loss(functional_call(model, tied(), (inputs.to(device),)), targets.to(device))
            if not torch.isfinite(loss):
                raise MlcompressError(f"tied pre-training diverged at step {step + 1} (loss {float(loss)})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            report(progress, "tied pre-training", step, steps, "steps", loss=float(loss.detach()))
            if step >= steps:
                break
    with torch.no_grad():
        state = {n: t.detach().cpu().clone() for n, t in model.state_dict().items()}
        for name, weights in tied().items():
            state[name] = weights.detach().cpu().clone()
    return state
