"""Training a posterior under a per-block KL budget: the loop behind ``mlcompress fit-posterior``.

Starting from a trained model (``--init``), every coded weight gets a Gaussian posterior
(:mod:`.variational`) and training minimises the task loss of sampled weights -- plus, for
Mean-Var, the annealed KL penalty -- with Adam. What makes it usable on long runs:

* **Deterministic given the seed** (on the CPU): weight noise and batch order come from two
  ``torch.Generator`` objects seeded from ``seed``; nothing reads the global RNG.
* **Resumable**: every ``checkpoint_every`` steps the whole state (posterior, prior, optimiser,
  annealing, both generators and the position inside the current epoch) is saved atomically; a
  resumed run continues exactly as the uninterrupted one would have.
* **Fails cleanly**: a non-finite loss or gradient is caught *before* the optimiser step, so the
  state is still the last good one; it is saved to the checkpoint and a one-line error says at
  which step training diverged.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from mlcompress.atomic import atomic_output, check_destination
from mlcompress.checkpoint import load_checkpoint
from mlcompress.container import shared_storage_aliases
from mlcompress.device import resolve_device
from mlcompress.distributed import SINGLE, World, join
from mlcompress.errors import InputError, MlcompressError, UsageError
from mlcompress.posterior.file import Posterior, PosteriorTensor, save_posterior
from mlcompress.posterior.meankl import NATS_PER_BIT
from mlcompress.progress import Progress, report
from mlcompress.selection import Selection
from mlcompress.codecs.rec.limits import DEFAULT_BITS_PER_BLOCK
from mlcompress.posterior.parameterization import MEAN_KL, MEAN_VAR, PARAMETERIZATIONS
from mlcompress.codecs.rec import compact_prior
from mlcompress.codecs.rec.hashing import Tying
from mlcompress.posterior.budget import resolve_hash, target_blocks
from mlcompress.posterior.pretrain import pretrain_tied
from mlcompress.posterior.training_layout import TrainingLayout, training_layout
from mlcompress.posterior.variational import VariationalModel, default_coded_names
from mlcompress.tasks import Evaluation, Task, evaluate_outputs, load_task_model
from mlcompress.tasks.training import steps_per_epoch

CHECKPOINT_FORMAT = "mlcompress-fit-checkpoint"
_LR_FLOOR = 0.01  # the cosine schedule ends at this fraction of --lr
CHECKPOINT_VERSION = 1


#: Default Adam learning rate per parameterization. Adam moves every parameter by about ``lr`` per
#: step in its own coordinates, and those differ: Mean-Var's mean is in weight units, Mean-KL's in
#: ``atanh`` of the fraction of the mean bound ``rho*sqrt(2*kappa)`` (tiny at low KL) and its KL
#: shares in softmax logits, so Mean-KL needs a ~10x larger rate to move as fast. Measured on
#: LeNet-5 / Fashion-MNIST and the digits MLP (docs/results.md, "fit-posterior"; docs/posterior.md).
DEFAULT_LR = {MEAN_KL: 3e-2, MEAN_VAR: 3e-3}


class TrainingDiverged(MlcompressError):
    """The loss or a gradient became NaN/Inf; the last good state was kept."""


@dataclass(frozen=True)
class FitConfig:
    """Everything that determines a fit; stored in checkpoints so ``--resume`` can check it."""

    parameterization: str = MEAN_KL
    bits_per_block: int = DEFAULT_BITS_PER_BLOCK
    kl_margin: float = 0.0  # bits: each block's KL budget is bits_per_block - kl_margin
    bits_per_weight: float = 1.0
    steps: int = 2000
    lr: float | None = None  # None: DEFAULT_LR of the parameterization
    batch_size: int | None = None  # the task's default when None
    seed: int = 0
    local_reparam: bool = True
    # Mean-Var annealing. beta_init 1 is the ELBO's own weighting of the KL against the data
    # set's log-likelihood; MIRACLE starts at 1e-8 because it starts from scratch without KL, but
    # we start from a trained model, and 1e-8 would need ~18/beta_step steps just to climb.
    # beta_step None means "auto" (see beta_step_at).
    beta_init: float = 1.0
    beta_step: float | None = None
    eval_every: int = 500
    checkpoint_every: int = 500
    coded: list[str] | None = None  # parameter names that get a posterior; None: the default rule
    include: tuple[str, ...] = ()  # --include globs narrowing the coded tensors (mlcompress.selection)
    exclude: tuple[str, ...] = ()  # --exclude globs: never coded (stored as fixed tensors)
    min_rec_numel: int = 1  # default rule: every floating-point parameter with this many values
    # The hashing trick: {name: weights per free variable}, "auto" (posterior.budget.auto_hash), or None.
    hash: dict[str, float] | str | None = None
    pretrain_steps: int = 0  # steps of tied training (no KL) before the posterior; needs hashing
    target_size: int | None = None  # bytes of the REC file; sets the blocks instead of bits_per_weight

    def __post_init__(self) -> None:
        # Frozen, but the default learning rate follows the parameterization: resolve it once here
        # (the caller's object is this one; nothing changes it afterwards).
        if self.lr is None:
            object.__setattr__(self, "lr", DEFAULT_LR.get(self.parameterization, DEFAULT_LR[MEAN_VAR]))

    def beta_step_at(self, step: int) -> float:
        """The annealing step size after ``step`` steps (0-based).

        A given ``beta_step`` is MIRACLE's constant rule (its paper uses 5e-5 over ~10^5 steps).
        "auto" adapts to the run's length: it starts at ``min(0.05, 60/steps)``, enough for beta
        to climb from 1e-8 to its working level in the first third of the run, and shrinks
        geometrically to 1/100 of that by the end, so the limit cycle of beta around each
        block's balance point (and with it KL_b around C_b) tightens as training settles.
        """
        if self.beta_step is not None:
            return self.beta_step
        start = min(0.05, 60.0 / self.steps)
        return start * 0.01 ** (step / self.steps)

    def lr_at(self, step: int) -> float:
        """Learning rate for the step after ``step`` steps: cosine decay from ``lr`` to lr/100.

        Decaying matters beyond the usual end-of-training polish: at a constant rate Adam keeps
        every weight jittering by about ``lr`` per step, and each block's KL jitters with it
        (several percent for small blocks), so Mean-Var could never settle on its budget.
        """
        progress = min(step / self.steps, 1.0)
        return self.lr * (_LR_FLOOR + (1.0 - _LR_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * progress)))

    def validate(self) -> None:
        if self.parameterization not in PARAMETERIZATIONS:
            raise UsageError(
                f"unknown --param {self.parameterization!r}", hint="use mean-kl or mean-var"
            )
        if self.steps <= 0:
            raise UsageError("--steps must be positive")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError("--lr must be a positive number")
        if self.batch_size is not None and self.batch_size <= 0:
            raise UsageError("--batch-size must be positive")
        if self.eval_every < 0 or self.checkpoint_every < 0:
            raise UsageError("--eval-every and --checkpoint-every must be >= 0 (0: never)")
        if not (self.beta_init > 0) or (self.beta_step is not None and not self.beta_step > 0):
            raise UsageError("--beta-init and --beta-step must be positive")
        if self.pretrain_steps < 0:
            raise UsageError("--pretrain-steps must be >= 0")
        if self.target_size is not None and self.target_size < 1:
            raise UsageError("--target-size must be at least 1 byte")
        if isinstance(self.hash, dict):
            for name, factor in self.hash.items():
                if not (isinstance(factor, (int, float)) and factor >= 1):
                    raise UsageError(f"--hash {name}={factor}: the factor must be at least 1 (weights per free variable)")
        elif self.hash not in (None, "auto"):
            raise UsageError(f"--hash must be name=factor,... or auto, got {self.hash!r}")


@dataclass
class FitStatus:
    """What the live display shows after a step."""

    step: int
    steps: int
    loss: float  # task loss of this step's batch (sampled weights)
    loss_avg: float  # running mean of the task loss over the last 100 steps
    kl_bits_min: float
    kl_bits_mean: float
    kl_bits_max: float
    budget_bits: float
    blocks: int
    beta_mean: float | None
    test: Evaluation | None
    seconds: float


@dataclass
class FitResult:
    model: VariationalModel
    layout: TrainingLayout
    config: FitConfig
    steps: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    test: Evaluation | None = None


def build_variational(
    task: Task,
    init: Mapping[str, torch.Tensor],
    config: FitConfig,
    device: torch.device,
) -> tuple[VariationalModel, TrainingLayout]:
    """The variational model of ``task`` started at the weights ``init``, with its block layout."""
    base = load_task_model(task, init)  # checked first; tied tensors stay tied
    params = dict(base.named_parameters())
    coded = coded_names(config, base)
    unknown = [name for name in coded if name not in params]
    if unknown:
        raise InputError(f"cannot give a posterior to {', '.join(unknown)}: not parameters of the model")
    if not coded:
        raise InputError(
            f"task {task.name!r}: no floating-point parameter has {config.min_rec_numel} or more values",
            hint="lower --min-rec-numel",
        )
    tying = tyings(config, {name: tuple(params[name].shape) for name in coded})
    sizes = {name: tying[name].free if name in tying else params[name].numel() for name in coded}
    blocks = None
    if config.target_size is not None:
        blocks = target_blocks({n: tuple(params[n].shape) for n in coded}, sizes,
                               {n: t.free for n, t in tying.items()}, config.bits_per_block, config.target_size)
    layout = training_layout(
        {name: (sizes[name],) if name in tying else tuple(params[name].shape) for name in coded},
        bits_per_block=config.bits_per_block,
        bits_per_weight=config.bits_per_weight,
        seed=config.seed,
        kl_margin=config.kl_margin,
        blocks=blocks,
    )
    model = VariationalModel(
        base,
        coded,
        layout.block_of,
        layout.budget_nats,
        config.parameterization,
        local_reparam=config.local_reparam,
        beta_init=config.beta_init,
        tying=tying,
    )
    return model.to(device), layout


def coded_names(config: FitConfig, model: torch.nn.Module) -> list[str]:
    """The parameters that get a posterior: ``config.coded``, or the default rule, narrowed by
    the ``include``/``exclude`` globs (matched against every state-dict name, ties as one)."""
    names = list(config.coded) if config.coded is not None else default_coded_names(model, config.min_rec_numel)
    select = Selection(tuple(config.include), tuple(config.exclude))
    if not select.narrows:
        return names
    state = model.state_dict(keep_vars=True)
    chosen = select.resolve(state, shared_storage_aliases(state))
    return [n for n in names if chosen(n)]


def tyings(config: FitConfig, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Tying]:
    """The hashing trick's tying of each hashed coded tensor, keyed on the fit's layout seed."""
    free = resolve_hash(config.hash, {name: math.prod(shape) for name, shape in shapes.items()})
    seed = config.seed % (1 << 64)
    return {name: Tying(math.prod(shapes[name]), f, seed) for name, f in free.items()}


def _batches(task: Task, batch_size: int, generator: torch.Generator, epoch_state: torch.Tensor,
             skip: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    """Endless batches with, for each, the generator state at its epoch's start and its index in
    the epoch: enough to restart at exactly this batch."""
    generator.set_state(epoch_state)
    while True:
        start_state = generator.get_state()
        for index, (inputs, targets) in enumerate(task.train_batches(batch_size, generator)):
            if index >= skip:
                yield inputs, targets, start_state, index
        skip = 0


def evaluate_posterior(task: Task, model: VariationalModel, device: torch.device, *,
                       samples: int = 0, seed: int = 0) -> Evaluation:
    """Test loss and metric at the posterior mean (``samples == 0``) or averaged over
    ``samples`` weight draws (each one a model the REC decoder could produce)."""
    model.eval()
    with torch.no_grad():
        dist = model.distribution()
        if samples <= 0:
            return evaluate_outputs(task, lambda x: model(x, dist, sample=False), device)
        generator = torch.Generator(device=device).manual_seed(seed)
        results = []
        for _ in range(samples):
            mu, sigma, rho = dist
            noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            drawn = (mu + sigma * noise, sigma, rho)
            results.append(evaluate_outputs(task, lambda x: model(x, drawn, sample=False), device))
    return Evaluation(
        loss=sum(r.loss for r in results) / samples,
        metric=sum(r.metric for r in results) / samples,
        metric_name=results[0].metric_name,
        examples=results[0].examples,
    )


def _save_checkpoint(path: Path, *, task: Task, config: FitConfig, model: VariationalModel,
                     optimizer: torch.optim.Optimizer, step: int, noise: torch.Generator,
                     epoch_state: torch.Tensor, batch_index: int, history: list) -> None:
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "task": task.name,
        "config": asdict(config),
        "step": step,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "noise_rng": noise.get_state().cpu(),
        "epoch_rng": epoch_state,
        "batch_index": batch_index,
        "history": history,
    }
    with atomic_output(path, force=True) as tmp:
        torch.save(state, tmp)


def load_fit_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by :func:`fit_posterior`, loaded without unpickling code."""
    if not path.is_file():
        raise InputError(f"no checkpoint to resume from at {path}", hint="run without --resume first")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged files
        raise InputError(f"cannot read fit checkpoint {path}: {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path} is not a fit-posterior checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise InputError(f"{path} is a fit-posterior checkpoint of version {state.get('version')}, expected {CHECKPOINT_VERSION}")
    return state


_MUST_MATCH_ON_RESUME = ("parameterization", "bits_per_block", "kl_margin", "bits_per_weight", "seed",
                         "local_reparam", "coded", "min_rec_numel", "batch_size", "beta_init", "hash",
                         "pretrain_steps", "target_size", "include", "exclude")


def fit_posterior(
    task: Task,
    init: Mapping[str, torch.Tensor] | None,
    config: FitConfig,
    *,
    device: str | torch.device = "auto",
    checkpoint: Path | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    world: World = SINGLE,
) -> FitResult:
    """Train a posterior for ``task`` starting from ``init`` (a state dict of the task's model).

    With ``resume`` the state comes from ``checkpoint`` instead (``init`` may then be None) and
    training continues up to ``config.steps``; the settings that shape the posterior must match
    the checkpoint's.

    Data-parallel (``world`` of several processes): every process draws the same batches and
    weight noise, computes the loss of its contiguous share of each batch (weighted by its
    share of the examples), and the gradients are summed over the processes before each step,
    so all hold the same model and the run is one process's up to float round-off, and exactly
    reproducible given the seed and the number of processes. Process 0 alone evaluates, reads
    and writes checkpoints (resuming sends the state to the others).
    """
    config.validate()
    dev = resolve_device(device)
    if resume and checkpoint is None:
        raise UsageError("--resume needs a checkpoint path")
    saved = None
    if resume:
        with world.guard():
            saved = load_fit_checkpoint(checkpoint) if world.is_main else None
        saved = world.broadcast(saved)
    if saved is not None:
        if saved["task"] != task.name:
            raise InputError(f"checkpoint {checkpoint} is for task {saved['task']!r}, not {task.name!r}")
        for key in _MUST_MATCH_ON_RESUME:
            # A key missing from an older checkpoint had its default value then.
            was = saved["config"].get(key, FitConfig.__dataclass_fields__[key].default)
            if isinstance(was, list) and isinstance(getattr(config, key), tuple):
                was = tuple(was)  # the checkpoint's container kept the globs' values, not their type
            if was != getattr(config, key):
                raise UsageError(
                    f"--resume: {key} is {getattr(config, key)!r} but the checkpoint was made with "
                    f"{was!r}", hint="resume with the original settings",
                )
        if config.steps < saved["step"]:
            raise UsageError(f"--steps {config.steps} is below the checkpoint's step {saved['step']}")
        init = task.make_model().state_dict()  # shapes only: every value is replaced below
    if init is None:
        raise UsageError("fit-posterior needs --init (a trained model of the task) or --resume")
    if config.pretrain_steps and saved is None:
        base = task.make_model()
        params = dict(base.named_parameters())
        tied = tyings(config, {n: tuple(params[n].shape) for n in coded_names(config, base) if n in params})
        if not tied:
            raise UsageError("--pretrain-steps trains the tied (hashed) network: it needs --hash")
        with world.guard():  # one process pretrains (GPUs need not agree to the bit); all get it
            init = pretrain_tied(task, init, tied, steps=config.pretrain_steps, seed=config.seed,
                                 batch_size=config.batch_size, device=dev, progress=progress) if world.is_main else None
        init = world.broadcast(init)

    model, layout = build_variational(task, init, config, dev)
    optimizer = torch.optim.Adam(model.trainable(), lr=config.lr)
    noise = torch.Generator(device=dev).manual_seed(config.seed)
    order = torch.Generator().manual_seed(config.seed)
    epoch_state, skip, step, history = order.get_state(), 0, 0, []
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        noise.set_state(saved["noise_rng"].to(noise.get_state().device))
        epoch_state, skip, step, history = saved["epoch_rng"], saved["batch_index"], saved["step"], saved["history"]

    batch_size = config.batch_size or task.batch_size
    num_train = num_train_examples(task, batch_size)
    epoch_length = steps_per_epoch(task, batch_size)
    budget_bits = config.bits_per_block - config.kl_margin
    recent: list[float] = []
    test: Evaluation | None = None
    started = time.perf_counter()
    model.train()
    batches = _batches(task, batch_size, order, epoch_state, skip)

    def save(at_step: int, state: torch.Tensor, index: int) -> None:
        if checkpoint is not None and world.is_main:
            _save_checkpoint(checkpoint, task=task, config=config, model=model, optimizer=optimizer,
                             step=at_step, noise=noise, epoch_state=state, batch_index=index,
                             history=history)

    while step < config.steps:
        inputs, targets, state, index = next(batches)
        noise_before = noise.get_state()
        with world.guard():  # data-parallel: a failure in one process's share stops all, one line each
            dist = model.distribution()
            if world.distributed:
                task_loss = _share_loss(model, task, inputs, targets, dist, noise, dev, world)
            else:
                outputs = model(inputs.to(dev), dist, generator=noise)
                task_loss = task.loss(outputs, targets.to(dev))
            if model.parameterization == MEAN_VAR:
                kl = model.kl_per_block(dist)
            else:  # Mean-KL: KL_b = C_b by construction; computed for the display only
                with torch.no_grad():
                    kl = model.kl_per_block(tuple(t.detach() for t in dist))
            # The KL penalty is the same on every process: its gradient is counted once, on process 0.
            loss = task_loss + model.q.penalty(kl, num_train) if world.is_main else task_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if world.distributed:
            value, total = _sum_gradients(world, model.trainable(), task_loss, loss)
        else:
            value, total = float(task_loss.detach()), float(loss.detach())
        bad = not math.isfinite(total) or any(
            p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in model.trainable()
        )
        if bad:
            # Nothing has been updated yet: the model holds the state after `step` good steps.
            noise.set_state(noise_before)
            save(step, state, index)
            where = f"kept the last good state (step {step}) in {checkpoint}" if checkpoint else "no checkpoint was requested"
            raise TrainingDiverged(
                f"training diverged: the loss or its gradient became {value if not math.isfinite(value) else 'non-finite'} "
                f"at step {step + 1}; {where}",
                hint="lower --lr",
            )
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step)
        optimizer.step()
        model.q.after_step(kl, config.beta_step_at(step))
        step += 1
        recent = (recent + [value])[-100:]
        if config.eval_every and (step % config.eval_every == 0 or step == config.steps) and world.is_main:
            test = evaluate_posterior(task, model, dev)
            model.train()
        kl_bits = kl.detach() / NATS_PER_BIT
        record = {"step": step, "loss": value, "kl_bits_mean": float(kl_bits.mean()),
                  "kl_bits_max": float(kl_bits.max())}
        if test is not None and config.eval_every and step % config.eval_every == 0:
            record["test_metric"] = test.metric
        history.append(record)
        periodic = config.checkpoint_every and step % config.checkpoint_every == 0
        if checkpoint is not None and (periodic or step == config.steps):
            with world.guard():  # a failed save on process 0 stops the others too
                nxt_state, nxt_index = _position_after(task, batch_size, state, index, epoch_length)
                save(step, nxt_state, nxt_index)
        if progress is not None:
            beta = getattr(model.q, "beta", None)
            status = FitStatus(
                step=step, steps=config.steps, loss=value, loss_avg=sum(recent) / len(recent),
                kl_bits_min=float(kl_bits.min()), kl_bits_mean=float(kl_bits.mean()),
                kl_bits_max=float(kl_bits.max()), budget_bits=budget_bits, blocks=layout.num_blocks,
                beta_mean=float(beta.mean()) if beta is not None else None, test=test,
                seconds=time.perf_counter() - started,
            )
            report(progress, "fit", step, config.steps, "steps", status=status)
    model.eval()
    return FitResult(model=model, layout=layout, config=config, steps=step,
                     seconds=time.perf_counter() - started, history=history, test=test)


def _share_loss(model: VariationalModel, task: Task, inputs: torch.Tensor, targets: torch.Tensor, dist: tuple,
                noise: torch.Generator, dev: torch.device, world: World) -> torch.Tensor:
    """This process's part of the batch's mean task loss: the mean over its contiguous rows
    times their fraction of the batch (the parts sum to the batch mean). A process without rows
    (more processes than examples) runs one example at weight 0, so its noise stays in step."""
    size = len(targets)
    rows = world.share(size)
    weight = len(rows) / size
    if not len(rows):
        rows = range(0, 1)
    with model.batch_share(size, rows):
        outputs = model(inputs[rows.start : rows.stop].to(dev), dist, generator=noise)
    return task.loss(outputs, targets[rows.start : rows.stop].to(dev)) * weight


def _sum_gradients(world: World, params: list[torch.Tensor], task_loss: torch.Tensor,
                   loss: torch.Tensor) -> tuple[float, float]:
    """Sum the gradients (and the two losses) over the processes in one all-reduce; a gradient
    no process has stays None, as in one process. Returns the batch's task loss and total loss."""
    present = [p.grad is not None for p in params]
    pieces = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double() for p in params]
    flags = torch.tensor([float(f) for f in present] + [float(task_loss.detach()), float(loss.detach())],
                         dtype=torch.float64, device=pieces[0].device if pieces else None)
    flat = world.all_reduce_sum(torch.cat(pieces + [flags]))
    tail = flat[-len(flags):].cpu()
    offset = 0
    for i, (p, piece) in enumerate(zip(params, pieces)):
        summed = flat[offset : offset + piece.numel()]
        offset += piece.numel()
        p.grad = summed.view(p.shape).to(p.dtype) if tail[i] > 0 else None
    return float(tail[-2]), float(tail[-1])


def num_train_examples(task: Task, batch_size: int) -> int:
    """Training-set size (MIRACLE's KL weight is relative to the whole data set's likelihood)."""
    size = getattr(task, "train_inputs", None)
    if size is not None:
        return len(size)
    return sum(len(t) for _, t in task.train_batches(batch_size, torch.Generator().manual_seed(0)))


def _position_after(task: Task, batch_size: int, epoch_state: torch.Tensor, index: int,
                    epoch_length: int) -> tuple[torch.Tensor, int]:
    """Where the batch stream stands after batch ``index`` of the epoch that began at
    ``epoch_state``: the next batch of the same epoch, or the start of the next epoch (found by
    replaying the epoch, so tasks may draw from the generator whenever they like)."""
    if index + 1 < epoch_length:
        return epoch_state, index + 1
    generator = torch.Generator()
    generator.set_state(epoch_state)
    for _ in task.train_batches(batch_size, generator):
        pass
    return generator.get_state(), 0


def posterior_of(result: FitResult, task: Task) -> Posterior:
    """The fitted posterior in the REC posterior-file form that ``mlcompress encode`` reads:
    coded tensors with their mean, std, prior and block count; everything else of the model's
    state dict (buffers, parameters left out) as fixed values.

    The prior stds are first rounded to what the file header carries
    (:func:`mlcompress.codecs.rec.compact_prior`, 4 significant digits) -- in the model itself, so
    that Mean-KL recomputes its posterior against the rounded prior and every block keeps its
    budget exactly (Mean-Var's blocks move by < 0.01 bits).
    """
    model, layout = result.model, result.layout
    with torch.no_grad():
        rounded = [compact_prior(float(r)) for r in model.prior_std()]
        model.log_rho.copy_(torch.log(torch.tensor(rounded, dtype=torch.float64)).to(model.log_rho.dtype))
        mu, sigma, _ = model.distribution()
        rho = model.prior_std()
        kl_bits = model.kl_per_block() / NATS_PER_BIT
    means, stds = dict(model.split(mu.float())), dict(model.split(sigma.float()))
    blocks = layout.blocks_per_tensor()
    tensors = {
        name: PosteriorTensor(mean=means[name].cpu(), std=stds[name].cpu(), prior_mean=0.0,
                              prior_std=float(rho[i]), num_blocks=blocks[name],
                              shape=model.shapes[i] if name in model.tying else None)
        for i, name in enumerate(model.coded)
    }
    fixed = {name: t.detach().cpu() for name, t in model.base.state_dict().items() if name not in tensors}
    return Posterior(
        tensors=tensors,
        bits_per_block=layout.bits_per_block,
        layout_seed=layout.seed,
        fixed=fixed,
        parameterization=result.config.parameterization,
        extra={
            "task": task.name,
            "steps": result.steps,
            "bits_per_weight": result.config.bits_per_weight,
            "kl_bits_mean": float(kl_bits.mean()),
            "kl_bits_max": float(kl_bits.max()),
        },
    )


def save_fit(result: FitResult, task: Task, path: str | Path, *, force: bool = False) -> Path:
    """Write the fitted posterior to ``path`` (atomically) as a posterior file."""
    return save_posterior(posterior_of(result, task), path, force=force)


def fit_to_file(
    task: Task,
    init: str | Path | None,
    config: FitConfig,
    output: str | Path,
    *,
    checkpoint: Path | None = None,
    resume: bool = False,
    device: str | torch.device = "auto",
    force: bool = False,
    progress: Progress | None = None,
    unsafe_pickle: bool = False,
) -> dict[str, Any]:
    """``fit-posterior`` end to end: read ``init``, fit, write the posterior file; a summary.

    ``progress`` receives ``Update("fit", step, steps, info={"status": FitStatus})``.
    """
    world = join(device)
    with world.guard():
        if world.is_main:  # it alone writes
            check_destination(output, force=force)
        state = load_checkpoint(init, unsafe_pickle=unsafe_pickle) if init is not None and not resume else None
    result = fit_posterior(task, state, config, device=device, checkpoint=checkpoint, resume=resume,
                           progress=progress, world=world)
    summary = None
    with world.guard():
        if world.is_main:
            summary = _write_fit(result, task, config, output, checkpoint=checkpoint, device=device, force=force)
    return world.broadcast(summary)


def _write_fit(result: FitResult, task: Task, config: FitConfig, output: str | Path, *, checkpoint: Path | None,
               device: str | torch.device, force: bool) -> dict[str, Any]:
    """Write the posterior file; the summary ``fit-posterior`` prints."""
    path = save_fit(result, task, output, force=force)
    dev = resolve_device(device)
    test = result.test if result.test is not None else evaluate_posterior(task, result.model, dev)
    with torch.no_grad():
        kl_bits = result.model.kl_per_block() / NATS_PER_BIT
    summary = {
        "output": str(path),
        "task": task.name,
        "parameterization": config.parameterization,
        "coded_tensors": len(result.model.coded),
        "coded_weights": int(sum(math.prod(shape) for shape in result.model.shapes)),
        "coded_variables": int(sum(result.model.sizes)),
        "hashed": {n: t.free for n, t in result.model.tying.items()},
        "blocks": result.layout.num_blocks,
        "bits_per_block": config.bits_per_block,
        "kl_margin": config.kl_margin,
        "bits_per_weight": config.bits_per_weight,
        "kl_bits_mean": float(kl_bits.mean()),
        "kl_bits_min": float(kl_bits.min()),
        "kl_bits_max": float(kl_bits.max()),
        "steps": result.steps,
        "seconds": result.seconds,
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "test_loss": test.loss,
        "metric_name": test.metric_name,
        test.metric_name: test.metric,
    }
    return summary
