"""A posterior file back in training: what progressive coding retrains between groups of blocks.

MIRACLE codes its blocks one at a time and, after each, trains the blocks not yet coded for a
while (100 steps per block in its public code): the coded weights are final, so the others can
move to make up for the particular sample each block drew. This module rebuilds the variational
model of a posterior file (:func:`variational_from_posterior`) and runs that retraining
(:func:`retrain`) on the blocks still free; :mod:`mlcompress.rec.progressive` drives the coding.

* The prior stds are frozen: blocks already coded were coded against them, and the file stores
  one prior per tensor.
* Mean-KL keeps every free block's KL exactly at the posterior's (its budget, by construction),
  so the file size is what the posterior promised whatever retraining does. Mean-Var keeps
  annealing each block's beta toward the posterior's KL.
* Every group draws its batches and noise from generators seeded by ``(seed, group)``, so a
  resumed run repeats exactly what an uninterrupted one does.
"""

from __future__ import annotations

import math

import torch

from mlcompress.codecs.rec.hashing import Tying
from mlcompress.errors import InputError
from mlcompress.posterior.file import Posterior
from mlcompress.posterior.parameterization import MEAN_VAR, PARAMETERIZATIONS
from mlcompress.posterior.training_layout import TrainingLayout, training_layout
from mlcompress.posterior.variational import VariationalModel
from mlcompress.tasks import Task, check_state_dict_fits

__all__ = ["variational_from_posterior", "retrain"]


def variational_from_posterior(task: Task, posterior: Posterior, *, device: torch.device | str = "cpu",
                               beta_init: float = 1.0) -> tuple[VariationalModel, TrainingLayout]:
    """The variational model of ``task`` holding the posterior file's distribution exactly
    (Mean-KL up to the Lambert W branch of weights with ``sigma > rho``)."""
    for name, pt in posterior.tensors.items():
        if pt.prior_mean != 0:
            raise InputError(f"{name}: retraining needs zero prior means (this posterior has {pt.prior_mean})")
    base = task.make_model()
    state = base.state_dict()
    tying = {name: Tying(math.prod(pt.shape), pt.mean.numel(), posterior.layout_seed)
             for name, pt in posterior.tensors.items() if pt.hashed}
    values = {name: posterior.weights(name) for name in posterior.tensors}
    values.update(posterior.fixed)
    check_state_dict_fits(task, values)
    missing = [n for n in state if n not in values]
    if missing:
        raise InputError(f"the posterior has no value for {missing[0]!r} of task {task.name!r}")
    base.load_state_dict({n: v.to(state[n].dtype) for n, v in values.items()})
    coded = list(posterior.tensors)
    layout = training_layout(
        {n: (pt.mean.numel(),) if pt.hashed else pt.tensor_shape for n, pt in posterior.tensors.items()},
        bits_per_block=posterior.bits_per_block, bits_per_weight=1.0, seed=posterior.layout_seed,
        blocks={n: pt.num_blocks for n, pt in posterior.tensors.items()},
    )
    param = posterior.parameterization if posterior.parameterization in PARAMETERIZATIONS else MEAN_VAR
    model = VariationalModel(base, coded, layout.block_of, layout.budget_nats, param, tying=tying,
                             beta_init=beta_init)
    with torch.no_grad():
        rho = torch.tensor([pt.prior_std for pt in posterior.tensors.values()], dtype=torch.float64)
        model.log_rho.copy_(torch.log(rho).to(model.log_rho.dtype))
        model.log_rho.requires_grad_(False)  # coded blocks used this prior: it cannot move
        mu = torch.cat([pt.mean.reshape(-1) for pt in posterior.tensors.values()]).double()
        sigma = torch.cat([pt.std.reshape(-1) for pt in posterior.tensors.values()]).double()
        per_var = rho[model.tensor_of]
        model.q.load_distribution(mu, sigma, per_var)  # each block's budget: its KL now
    return model.to(device), layout


def retrain(model: VariationalModel, task: Task, *, steps: int, lr: float, seed: int, group: int,
            batch_size: int, num_train: int, device: torch.device, beta_step: float = 1e-3) -> float:
    """``steps`` Adam steps on the variables not yet fixed; the mean task loss of the last 10."""
    if steps <= 0:
        return float("nan")
    order = torch.Generator().manual_seed(seed * 1_000_003 + group)
    noise = torch.Generator(device=device).manual_seed(seed * 1_000_033 + group)
    params = model.trainable()
    optimizer = torch.optim.Adam(params, lr=lr)
    model.train()
    losses: list[float] = []
    step = 0
    while step < steps:
        for inputs, targets in task.train_batches(batch_size, order):
            dist = model.distribution()
            loss = task.loss(model(inputs.to(device), dist, generator=noise), targets.to(device))
            kl = model.kl_per_block(dist) if model.parameterization == MEAN_VAR else None
            total = loss + model.q.penalty(kl, num_train) if kl is not None else loss
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params):
                optimizer.step()
                if kl is not None:
                    model.q.after_step(kl.detach(), beta_step)
            losses = (losses + [float(loss.detach())])[-10:]
            step += 1
            if step >= steps:
                break
    model.eval()
    return sum(losses) / len(losses)
