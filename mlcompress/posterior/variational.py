"""A variational wrapper for any ``nn.Module``: chosen weights get a Gaussian posterior.

The wrapped model is never modified: a forward pass hands it sampled weights through
``torch.func.functional_call``, so any architecture works, including plug-in tasks' models.

* **Which weights.** By default the ``weight`` of every ``nn.Linear`` and convolution that the
  REC encoder would code (:func:`default_coded_names`: at least 2-D and ``min_rec_numel``
  weights, the encoder's own rule); biases, norms and small tensors stay deterministic. They
  are trained too, and the encoder stores them losslessly.
* **Coding prior.** Zero-mean Gaussian with one learned std ``rho`` per coded tensor, as in
  MIRACLE (initialised to the tensor's RMS, so it starts on the scale of the trained weights).
  The encoder draws its candidates from exactly this prior, which is why it is saved with the
  posterior.
* **Sampling.** ``nn.Linear`` layers fed 2-D inputs use the local reparameterization trick: the
  pre-activation of each example is drawn from its exact Gaussian (mean ``x mu^T``, variance
  ``x^2 sigma^2^T``), which gives independent weight noise per example and lower-variance
  gradients at the cost of one extra matrix product. Convolutions and everything else use one
  weight sample per batch: the per-position trick would drop the correlation between output
  positions that share weights and so change the objective.
* **Blocks.** Every coded weight belongs to a block of the REC layout (``block_of``); the KL of
  each block to the prior is what the encoder pays, and what training keeps at its budget.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.nn.modules.conv import _ConvNd

from mlcompress.codecs.rec.limits import DEFAULT_MIN_REC_NUMEL, is_rec_candidate
from mlcompress.posterior.parameterization import (
    MEAN_KL,
    MEAN_VAR,
    MeanKL,
    MeanVar,
    block_kl,
)

# Guards sqrt of a local-reparameterization variance that is exactly 0 (an all-zero input row).
_VAR_EPS = 1e-20


def default_coded_names(model: nn.Module, min_numel: int = DEFAULT_MIN_REC_NUMEL) -> list[str]:
    """Names of the parameters that get a posterior by default: the weights of Linear and
    convolution layers that the REC encoder would code (floating point, at least 2-D, at least
    ``min_numel`` weights: :func:`mlcompress.rec.compress.is_rec_candidate`)."""
    names = []
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, (nn.Linear, _ConvNd)) and isinstance(weight, nn.Parameter):
            if is_rec_candidate(weight, min_numel):
                names.append(f"{module_name}.weight" if module_name else "weight")
    return names


class VariationalModel(nn.Module):
    """A model whose ``coded`` parameters follow a diagonal Gaussian posterior.

    ``block_of[i]`` is the block of the ``i``-th coded weight in the concatenation of the coded
    tensors flattened in ``coded`` order; ``budget_nats[b]`` is block ``b``'s KL budget.
    """

    def __init__(
        self,
        base: nn.Module,
        coded: list[str],
        block_of: torch.Tensor,
        budget_nats: torch.Tensor,
        parameterization: str = MEAN_KL,
        *,
        local_reparam: bool = True,
        beta_init: float = 1e-8,
    ) -> None:
        super().__init__()
        # A private copy: the wrapper freezes the coded parameters and hooks Linear layers, which
        # must not leak into the caller's model.
        base = copy.deepcopy(base)
        self.base = base
        params = dict(base.named_parameters())
        self.coded = list(coded)
        self.shapes = [tuple(params[name].shape) for name in self.coded]
        self.sizes = [params[name].numel() for name in self.coded]
        for name in self.coded:
            params[name].requires_grad_(False)  # replaced by the posterior in every forward
        init = torch.cat([params[name].detach().flatten() for name in self.coded]).to(torch.float64)
        rms = torch.stack([params[name].detach().double().pow(2).mean().sqrt() for name in self.coded])
        self.log_rho = nn.Parameter(torch.log(rms.clamp(min=1e-8)).float())
        tensor_of = torch.repeat_interleave(torch.arange(len(self.coded)), torch.tensor(self.sizes))
        self.register_buffer("tensor_of", tensor_of, persistent=False)
        self.register_buffer("block_of", block_of.clone(), persistent=False)
        self.num_blocks = len(budget_nats)
        rho = rms.clamp(min=1e-8)[tensor_of]
        if parameterization == MEAN_KL:
            self.q: MeanKL | MeanVar = MeanKL(init, rho, block_of, budget_nats)
        elif parameterization == MEAN_VAR:
            self.q = MeanVar(init, rho, block_of, budget_nats, beta_init=beta_init)
        else:
            raise ValueError(f"unknown parameterization {parameterization!r}")
        modules = dict(base.named_modules())
        self._lrt: dict[str, nn.Linear] = {}
        if local_reparam:
            for name in self.coded:
                module = modules.get(name.rpartition(".")[0])
                if type(module) is nn.Linear:
                    self._lrt[name] = module
                    module.register_forward_hook(self._lrt_hook)
        self._active: dict[nn.Module, tuple[torch.Tensor, torch.Tensor, torch.Generator | None]] = {}

    # -- the distribution -------------------------------------------------------------------------

    @property
    def parameterization(self) -> str:
        return self.q.kind

    def prior_std(self) -> torch.Tensor:
        """One prior std per coded tensor (float64)."""
        return torch.exp(self.log_rho.to(torch.float64))

    def distribution(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat per-weight ``(mu, sigma, rho)`` of all coded weights, float64, differentiable."""
        rho = self.prior_std()[self.tensor_of]
        mu, sigma = self.q.distribution(rho)
        return mu, sigma, rho

    def kl_per_block(self, dist: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """KL of every block to the prior, in nats (float64)."""
        mu, sigma, rho = self.distribution() if dist is None else dist
        return block_kl(mu, sigma, rho, self.block_of, self.num_blocks)

    def trainable(self) -> list[nn.Parameter]:
        """What the optimiser updates: the posterior, the prior stds and the deterministic weights."""
        return [p for p in self.parameters() if p.requires_grad]

    def split(self, flat: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` per coded tensor, cutting a flat per-weight vector back into shapes."""
        for name, shape, piece in zip(self.coded, self.shapes, torch.split(flat, self.sizes)):
            yield name, piece.reshape(shape)

    # -- forward ---------------------------------------------------------------------------------

    def forward(
        self,
        inputs: torch.Tensor,
        dist: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        *,
        generator: torch.Generator | None = None,
        sample: bool = True,
    ) -> torch.Tensor:
        """Outputs for ``inputs`` with weights drawn from q (``sample=True``) or at its mean."""
        mu, sigma, _ = self.distribution() if dist is None else dist
        dtype = next(iter(self.base.parameters())).dtype
        overrides: dict[str, torch.Tensor] = {}
        active = {}
        for (name, m), (_, s) in zip(self.split(mu.to(dtype)), self.split(sigma.to(dtype))):
            if not sample:
                overrides[name] = m
            elif name in self._lrt:
                overrides[name] = m
                active[self._lrt[name]] = (m, s, generator)
            else:
                noise = torch.randn(m.shape, generator=generator, device=m.device, dtype=m.dtype)
                overrides[name] = m + s * noise
        with self._activated(active):
            return functional_call(self.base, overrides, (inputs,))

    @contextmanager
    def _activated(self, active: dict) -> Iterator[None]:
        self._active = active
        try:
            yield
        finally:
            self._active = {}

    def _lrt_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        entry = self._active.get(module)
        if entry is None:
            return None
        mu, sigma, generator = entry
        (x,) = args
        if x.dim() != 2:
            # Several positions per example share one weight draw: sample the weights instead.
            noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            return F.linear(x, mu + sigma * noise, module.bias)
        std = torch.sqrt(F.linear(x * x, sigma * sigma) + _VAR_EPS)
        noise = torch.randn(output.shape, generator=generator, device=output.device, dtype=output.dtype)
        return output + std * noise
