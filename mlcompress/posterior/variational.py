"""A variational wrapper for any ``nn.Module``: chosen weights get a Gaussian posterior.

The wrapped model is never modified: a forward pass hands it sampled weights through
``torch.func.functional_call``, so any architecture works, including plug-in tasks' models.

* **Which weights.** By default every floating-point parameter (:func:`default_coded_names`),
  biases included, as MIRACLE codes every variable; the rest (buffers) stays as it is. A
  hashed tensor's posterior is over its free variables (:class:`~mlcompress.codecs.rec.hashing.Tying`),
  expanded to the weights in every forward pass.
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

from mlcompress.codecs.rec.hashing import Tying
from mlcompress.errors import InputError
from mlcompress.posterior.pretrain import project
from mlcompress.posterior.parameterization import (
    MEAN_KL,
    MEAN_VAR,
    MeanKL,
    MeanVar,
    block_kl,
)

# Guards sqrt of a local-reparameterization variance that is exactly 0 (an all-zero input row).
_VAR_EPS = 1e-20


def default_coded_names(model: nn.Module, min_numel: int = 1) -> list[str]:
    """Names of the parameters that get a posterior by default: every floating-point parameter
    with at least ``min_numel`` values -- biases and small layers included, as in MIRACLE, which
    codes every variable (a bias costs a share of one block, far less than storing it)."""
    return [name for name, p in model.named_parameters() if p.is_floating_point() and p.numel() >= min_numel]


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
        tying: dict[str, Tying] | None = None,
    ) -> None:
        super().__init__()
        # A private copy: the wrapper freezes the coded parameters and hooks Linear layers, which
        # must not leak into the caller's model.
        base = copy.deepcopy(base)
        self.base = base
        params = dict(base.named_parameters())
        self.coded = list(coded)
        self.tying = dict(tying or {})
        self.shapes = [tuple(params[name].shape) for name in self.coded]
        # The posterior lives on the coded *variables*: a tensor's weights, or its free
        # variables when it is hashed (each the mean of its tied weights, signs undone: the
        # least-squares projection, exact when the weights were trained tied).
        self.sizes = [self.tying[n].free if n in self.tying else params[n].numel() for n in self.coded]
        self._ties: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        pieces = []
        for name in self.coded:
            params[name].requires_grad_(False)  # replaced by the posterior in every forward
            flat = params[name].detach().flatten().to(torch.float64)
            if name in self.tying:
                self._ties[name] = self.tying[name].index_and_sign()
                flat = project(params[name], self.tying[name], self._ties[name])
            pieces.append(flat)
        init = torch.cat(pieces)
        rms = torch.stack([p.pow(2).mean().sqrt() for p in pieces])
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
        self._lrt: dict[str, nn.Linear] = {}  # coded weight name -> its Linear layer
        self._lrt_bias: dict[str, nn.Linear] = {}  # coded bias name of such a layer -> the layer
        if local_reparam:
            for name in self.coded:
                owner, _, leaf = name.rpartition(".")
                module = modules.get(owner)
                if type(module) is nn.Linear and leaf == "weight":
                    self._lrt[name] = module
                    module.register_forward_hook(self._lrt_hook)
            for name in self.coded:
                owner, _, leaf = name.rpartition(".")
                if leaf == "bias" and f"{owner}.weight" in self._lrt:
                    self._lrt_bias[name] = self._lrt[f"{owner}.weight"]
        self._active: dict[nn.Module, tuple] = {}
        self._share: tuple[int, range] | None = None  # data-parallel: (batch size, this process's rows)
        # Progressive coding: variables already coded are fixed at their decoded values.
        total = int(sum(self.sizes))
        self.register_buffer("fixed_mask", torch.zeros(total, dtype=torch.bool), persistent=True)
        self.register_buffer("fixed_value", torch.zeros(total, dtype=torch.float64), persistent=True)

    # -- the distribution -------------------------------------------------------------------------

    @property
    def parameterization(self) -> str:
        return self.q.kind

    def prior_std(self) -> torch.Tensor:
        """One prior std per coded tensor (float64)."""
        return torch.exp(self.log_rho.to(torch.float64))

    def distribution(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat per-variable ``(mu, sigma, rho)`` of all coded variables, float64, differentiable.

        Fixed variables (:meth:`fix`) have their decoded value as mean and ``sigma = 0``.
        """
        rho = self.prior_std()[self.tensor_of]
        mu, sigma = self.q.distribution(rho)
        if self.fixed_mask.any():
            mu = torch.where(self.fixed_mask, self.fixed_value, mu)
            sigma = torch.where(self.fixed_mask, torch.zeros_like(sigma), sigma)
        return mu, sigma, rho

    def kl_per_block(self, dist: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """KL of every block to the prior, in nats (float64); 0 for blocks already coded."""
        mu, sigma, rho = self.distribution() if dist is None else dist
        if self.fixed_mask.any():  # coded blocks cost nothing more; keep their terms finite
            mu = torch.where(self.fixed_mask, torch.zeros_like(mu), mu)
            sigma = torch.where(self.fixed_mask, rho.to(sigma.dtype), sigma)
        return block_kl(mu, sigma, rho, self.block_of, self.num_blocks)

    @torch.no_grad()
    def fix(self, variables: torch.Tensor, values: torch.Tensor) -> None:
        """Fix the coded variables at flat indices ``variables`` to ``values`` (their decoded
        values): from now on they are deterministic and carry no KL."""
        variables = variables.to(self.fixed_mask.device)
        self.fixed_mask[variables] = True
        self.fixed_value[variables] = values.to(device=self.fixed_value.device, dtype=torch.float64)

    def trainable(self) -> list[nn.Parameter]:
        """What the optimiser updates: the posterior, the prior stds and the deterministic weights."""
        return [p for p in self.parameters() if p.requires_grad]

    def split(self, flat: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, variables)`` per coded tensor: a flat per-variable vector cut into tensors
        (shaped as the weights, or 1-D free variables for hashed tensors)."""
        for name, shape, piece in zip(self.coded, self.shapes, torch.split(flat, self.sizes)):
            yield name, piece if name in self.tying else piece.reshape(shape)

    def expand(self, name: str, variables: torch.Tensor, *, signed: bool = True) -> torch.Tensor:
        """The weights of ``name`` from its coded variables (a hashed tensor's are gathered
        through its tying, with the signs unless ``signed`` is False, as for a std)."""
        if name not in self.tying:
            return variables
        index, sign = self._ties[name]
        index = index.to(variables.device)
        out = variables.index_select(0, index)
        if signed:
            out = out * sign.to(device=variables.device, dtype=variables.dtype)
        return out.reshape(self.shapes[self.coded.index(name)])

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
        bias_sigma = {}
        for (name, m), (_, s) in zip(self.split(mu.to(dtype)), self.split(sigma.to(dtype))):
            if name in self.tying:
                if sample and name not in self._lrt:
                    # one draw per free variable, shared by its tied weights (what REC decodes)
                    noise = torch.randn(m.shape, generator=generator, device=m.device, dtype=m.dtype)
                    overrides[name] = self.expand(name, m + s * noise)
                    continue
                m, s = self.expand(name, m), self.expand(name, s, signed=False)
            if not sample:
                overrides[name] = m
            elif name in self._lrt:
                overrides[name] = m
                active[self._lrt[name]] = (m, s, generator)
            elif name in self._lrt_bias:  # its noise joins the layer's pre-activation noise
                overrides[name] = m
                bias_sigma[self._lrt_bias[name]] = s
            else:
                noise = torch.randn(m.shape, generator=generator, device=m.device, dtype=m.dtype)
                overrides[name] = m + s * noise
        active = {module: entry + (bias_sigma.get(module),) for module, entry in active.items()}
        with self._activated(active):
            return functional_call(self.base, overrides, (inputs,))

    @contextmanager
    def batch_share(self, size: int, rows: range) -> Iterator[None]:
        """Forward passes here see rows ``rows`` of a batch of ``size`` examples: per-example
        noise is drawn for the whole batch and these rows kept, so a data-parallel process gives
        its examples the noise one process would, and every process's generator stays in step."""
        self._share = (size, rows)
        try:
            yield
        finally:
            self._share = None

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
        mu, sigma, generator, bias_sigma = entry
        (x,) = args
        if x.dim() != 2:
            # Several positions per example share one weight draw: sample the weights instead.
            noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            bias = module.bias
            if bias_sigma is not None:
                bias = bias + bias_sigma * torch.randn(bias.shape, generator=generator, device=bias.device, dtype=bias.dtype)
            return F.linear(x, mu + sigma * noise, bias)
        var = F.linear(x * x, sigma * sigma)
        if bias_sigma is not None:
            var = var + bias_sigma * bias_sigma
        std = torch.sqrt(var + _VAR_EPS)
        if self._share is None:
            noise = torch.randn(output.shape, generator=generator, device=output.device, dtype=output.dtype)
        else:
            size, rows = self._share
            if output.shape[0] != len(rows):
                raise InputError(f"data-parallel fitting needs Linear layers fed [batch, features]; "
                                 f"{type(module).__name__} got {tuple(x.shape)} for {len(rows)} examples",
                                 hint="run fit-posterior in one process, or --no-local-reparam")
            noise = torch.randn((size, *output.shape[1:]), generator=generator, device=output.device,
                                dtype=output.dtype)[rows.start : rows.stop]
        return output + std * noise
