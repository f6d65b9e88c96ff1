"""Loading the two models to compare: whatever file the user has, as a next-token logit function.

Each side may be

* a Hugging Face model directory (``config.json`` + weights): built with transformers
  (optional extra ``lm``);
* a TorchScript file: used as is; it must map ``[batch, positions]`` token ids to
  ``[batch, positions, vocab]`` logits (or a tuple/dict whose first entry / ``logits`` is that);
* a weights-only file (``.pt`` state dict, safetensors, ``.mrc``, read with
  :func:`mlcompress.checkpoint.load_checkpoint`) whose architecture comes from the other side or
  from ``--arch`` (a model directory or a TorchScript file). This is what lets
  ``mlcompress diverge model_dir model.mrc`` compare a model with its compressed self.

Classifier tasks (``--arch lenet5``) are handled in :mod:`mlcompress.divergence.classifier`.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from mlcompress.checkpoint import checkpoint_format
from mlcompress.checkpoint.source import TensorSource, open_source
from mlcompress.errors import CheckpointError, InputError, UsageError

LM_EXTRA_HINT = "pip install 'mlcompress[lm]'"
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class LanguageModel:
    """A causal language model ready to score: ``logits(ids[B, T]) -> [B, T, vocab]``."""

    source: str
    kind: str  # "hf-dir", "torchscript" or "weights"
    module: nn.Module
    device: torch.device
    vocab_size: int | None = None  # from the config; None until the first forward otherwise
    max_positions: int | None = None
    bos_token_id: int | None = None
    directory: Path | None = None  # a model directory that may also hold the tokenizer
    _fingerprint: str | None = field(default=None, repr=False)

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits for every position of ``ids`` (int64, on any device)."""
        ids = ids.to(self.device)
        if self.kind == "torchscript":
            out = self.module(ids)
        else:
            out = self.module(input_ids=ids, use_cache=False)
        logits = _first_tensor(out, self.source)
        if logits.dim() != 3 or logits.shape[:2] != ids.shape:
            raise InputError(
                f"{self.source}: expected logits of shape [batch, positions, vocab] for input "
                f"{tuple(ids.shape)}, got {tuple(logits.shape)}",
                hint="a TorchScript model must map token ids to per-position next-token logits",
            )
        if self.vocab_size is None:
            self.vocab_size = int(logits.shape[-1])
        return logits

    def fingerprint(self) -> str:
        """SHA-256 over the weights as evaluated (names, dtypes, shapes, bytes), 16 hex digits.

        Stored in reference caches so that reusing a cache with another reference model fails
        loudly instead of reporting divergences against the wrong model."""
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.module.state_dict())
        return self._fingerprint


def weights_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """A short content hash of named tensors, independent of where they live."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _first_tensor(out: Any, source: str) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise InputError(f"{source}: the model returned {type(out).__name__}, not logits")


def model_kind(spec: str | Path) -> str:
    """``hf-dir``, ``torchscript`` or ``weights`` for a model path (raises if unreadable)."""
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(
                f"{path} is a directory without config.json",
                hint="give a Hugging Face model directory (save_pretrained output)",
            )
        return "hf-dir"
    kind = checkpoint_format(path)
    return "torchscript" if kind == "torchscript" else "weights"


def load_pair(
    ref: str | Path,
    cmp: str | Path,
    *,
    arch: str | Path | None = None,
    device: torch.device,
    unsafe_pickle: bool = False,
) -> tuple[LanguageModel, LanguageModel]:
    """Load both sides; a weights-only side borrows its architecture from ``arch`` or the other."""
    kinds = {"ref": model_kind(ref), "cmp": model_kind(cmp)}
    paths = {"ref": Path(ref), "cmp": Path(cmp)}
    loaded: dict[str, LanguageModel] = {}
    for side in ("ref", "cmp"):
        if kinds[side] != "weights":
            loaded[side] = _load_full(paths[side], kinds[side], device, unsafe_pickle)
    for side, other in (("ref", "cmp"), ("cmp", "ref")):
        if kinds[side] != "weights":
            continue
        if arch is not None:
            template = _arch_template(arch, device, unsafe_pickle)
        elif other in loaded:
            template = loaded[other]
        else:
            raise UsageError(
                f"{paths[side]} and {paths[other]} both hold weights only, so the model "
                "architecture is unknown",
                hint="pass --arch MODEL_DIR (or a TorchScript file) with the architecture",
            )
        loaded[side] = _with_weights(template, open_source(paths[side], unsafe_pickle=unsafe_pickle), paths[side],
                                     device)
    return loaded["ref"], loaded["cmp"]


def load_one(
    spec: str | Path,
    *,
    arch: str | Path | None = None,
    device: torch.device,
    unsafe_pickle: bool = False,
) -> LanguageModel:
    """One model on its own (used when a reference cache stands in for the other side)."""
    path = Path(spec)
    kind = model_kind(path)
    if kind != "weights":
        return _load_full(path, kind, device, unsafe_pickle)
    if arch is None:
        raise UsageError(
            f"{path} holds weights only, so its architecture is unknown",
            hint="pass the reference model too, or --arch MODEL_DIR",
        )
    template = _arch_template(arch, device, unsafe_pickle)
    return _with_weights(template, open_source(path, unsafe_pickle=unsafe_pickle), path, device)


def _arch_template(arch: str | Path, device: torch.device, unsafe_pickle: bool) -> LanguageModel:
    path = Path(arch)
    kind = model_kind(path)
    if kind == "weights":
        raise UsageError(
            f"--arch {path} holds weights only",
            hint="--arch must be a model directory, a TorchScript file or a task name",
        )
    return _load_full(path, kind, device, unsafe_pickle)


def _load_full(path: Path, kind: str, device: torch.device, unsafe_pickle: bool) -> LanguageModel:
    if kind == "torchscript":
        try:
            module = torch.jit.load(str(path), map_location=device)
        except Exception as exc:  # torch raises RuntimeError with pages of C++ context
            raise CheckpointError(f"{path}: cannot load TorchScript ({_first_line(exc)})") from None
        module.eval()
        return LanguageModel(str(path), "torchscript", module, device)
    return _load_hf(path, device, unsafe_pickle)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise InputError(
            "reading a Hugging Face model directory needs transformers", hint=LM_EXTRA_HINT
        ) from None
    transformers.logging.set_verbosity_error()
    return transformers


def _load_hf(path: Path, device: torch.device, unsafe_pickle: bool) -> LanguageModel:
    transformers = _transformers()
    config = _hf_config(transformers, path)
    # Weights go through mlcompress's own reader (safetensors first, restricted unpickling of
    # .bin unless --unsafe-pickle), never through transformers' loaders.
    tensors = open_source(path, unsafe_pickle=unsafe_pickle)
    template = _hf_skeleton(transformers, config, path, device)
    return _with_weights(template, tensors, path, device, keep_directory=True)


def _hf_config(transformers: Any, path: Path) -> Any:
    try:
        return transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read config.json ({_first_line(exc)})") from None


def _hf_skeleton(transformers: Any, config: Any, path: Path, device: torch.device) -> LanguageModel:
    try:
        module = transformers.AutoModelForCausalLM.from_config(config)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: cannot build a causal language model from config.json ({_first_line(exc)})"
        ) from None
    module = module.float().to(device).eval()
    return LanguageModel(
        source=str(path),
        kind="hf-dir",
        module=module,
        device=device,
        vocab_size=getattr(config, "vocab_size", None),
        max_positions=_max_positions(config),
        bos_token_id=getattr(config, "bos_token_id", None),
        directory=path,
    )


def _max_positions(config: Any) -> int | None:
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _with_weights(
    template: LanguageModel,
    weights: TensorSource,
    source: Path,
    device: torch.device,
    *,
    keep_directory: bool = False,
) -> LanguageModel:
    """A copy of ``template``'s architecture holding the checkpoint ``weights``, checked name by
    name from its header, then filled one tensor at a time (so loading holds the model and one
    tensor, never a second copy of the model)."""
    module = template.module if keep_directory else copy.deepcopy(template.module)
    names = _match_prefix(module, weights.names)  # module name -> checkpoint name
    expected = module.state_dict()
    tied = _tied_names(module)
    missing = [n for n in expected if n not in names and n not in tied]
    unexpected = [stored for n, stored in names.items() if n not in expected]
    reshaped = [
        f"{n} is {tuple(weights.info(names[n]).shape)} not {tuple(expected[n].shape)}"
        for n in expected
        if n in names and tuple(weights.info(names[n]).shape) != tuple(expected[n].shape)
    ]
    problems = [
        f"{label} {', '.join(names[:3])}{' and more' if len(names) > 3 else ''}"
        for label, names in (("missing", missing), ("unexpected", unexpected), ("", reshaped))
        if names
    ]
    if problems:
        raise CheckpointError(
            f"{source} does not fit the architecture of {template.source}: "
            + "; ".join(p.strip() for p in problems),
            hint="compare a model with a compressed copy of the same model, or pass --arch",
        )
    with torch.no_grad():
        for name, target in expected.items():
            if name in names:
                target.copy_(weights.get(names[name]).to(dtype=target.dtype))
    out = LanguageModel(
        source=str(source),
        kind=template.kind if keep_directory else "weights",
        module=module.to(device).eval(),
        device=device,
        vocab_size=template.vocab_size,
        max_positions=template.max_positions,
        bos_token_id=template.bos_token_id,
        directory=template.directory if keep_directory else None,
    )
    if template.kind == "torchscript":
        out.kind = "torchscript"
    return out


def _tied_names(module: nn.Module) -> set[str]:
    """State-dict names that alias an earlier parameter (e.g. lm_head.weight = wte.weight):
    files written by save_pretrained or safetensors store such a tensor only once."""
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for name, tensor in module.state_dict(keep_vars=True).items():
        key = id(tensor)
        if key in seen:
            tied.add(name)
        else:
            seen[key] = name
    return tied


def _match_prefix(module: nn.Module, names: list[str]) -> dict[str, str]:
    """The module's name for each checkpoint name: accepts checkpoints saved from the base model
    (``h.0...`` for ``transformer.h.0...``)."""
    expected = module.state_dict()
    if any(n in expected for n in names):
        return {n: n for n in names}
    prefix = getattr(module, "base_model_prefix", "")
    if prefix:
        renamed = {f"{prefix}.{n}": n for n in names}
        if any(n in expected for n in renamed):
            return renamed
    return {n: n for n in names}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --- tokenizers -------------------------------------------------------------------------------


@dataclass
class Tokenizer:
    """Text to token ids, plus a fingerprint of the exact vocabulary and rules."""

    encode: Callable[[str], list[int]]
    fingerprint: str
    source: str
    bos_token_id: int | None = None
    #: The token the tokenizer puts before every text it encodes (its BOS), or None when it adds
    #: none: llama.cpp's "the vocabulary adds BOS" (see :func:`prepended_token`).
    added_bos: int | None = None


#: Text used to see what a tokenizer adds around a text; any short plain text would do.
PROBE_TEXT = "Hello world"


def prepended_token(with_special: list[int], without: list[int]) -> int | None:
    """The id a tokenizer prepends when it adds its special tokens, judged from one text encoded
    with and without them: llama.cpp overwrites token 0 of every chunk with BOS exactly when the
    vocabulary adds BOS, and a Hugging Face tokenizer says so only by doing it (the
    ``add_bos_token`` setting, a post-processor template, or built into the class)."""
    if len(with_special) > len(without) and with_special[1 : 1 + len(without)] == without:
        return int(with_special[0])  # one token before the text (an EOS after it is ignored)
    return None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer from a ``tokenizer.json`` file or a directory holding one (``tokenizers``),
    or, failing that, any tokenizer transformers can read from the directory."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if file.is_file():
        try:
            import tokenizers
        except ImportError:
            raise InputError("reading tokenizer.json needs tokenizers", hint=LM_EXTRA_HINT) from None
        try:
            tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as exc:
            raise InputError(f"{file}: not a tokenizers file ({_first_line(exc)})") from None
        fp = hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]
        bos = None
        for candidate in ("<|endoftext|>", "<s>", "<bos>", "[BOS]"):
            bos = tok.token_to_id(candidate)
            if bos is not None:
                break
        added = prepended_token(
            tok.encode(PROBE_TEXT).ids, tok.encode(PROBE_TEXT, add_special_tokens=False).ids
        )
        return Tokenizer(lambda text: tok.encode(text).ids, fp, str(file), bos, added)
    if not path.is_dir():
        raise InputError(f"tokenizer {path} does not exist", hint="give tokenizer.json or a model directory")
    transformers = _transformers()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise InputError(f"{path}: no tokenizer found ({_first_line(exc)})") from None
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    fp = hashlib.sha256(repr((type(tok).__name__, vocab)).encode()).hexdigest()[:16]
    added = prepended_token(
        list(tok(PROBE_TEXT)["input_ids"]), list(tok(PROBE_TEXT, add_special_tokens=False)["input_ids"])
    )
    return Tokenizer(lambda text: list(tok(text)["input_ids"]), fp, str(path), tok.bos_token_id, added)


def find_tokenizer(
    explicit: str | Path | None, *candidates: LanguageModel | Path | None
) -> Tokenizer | None:
    """``--tokenizer`` if given, else the first model directory that holds a tokenizer
    (candidates are loaded models or directories, e.g. ``--arch``)."""
    if explicit is not None:
        return load_tokenizer(explicit)
    for candidate in candidates:
        d = candidate.directory if isinstance(candidate, LanguageModel) else candidate
        if d is not None and Path(d).is_dir() and any(
            (Path(d) / name).is_file() for name in (TOKENIZER_FILE, "vocab.json", "tokenizer.model")
        ):
            return load_tokenizer(d)
    return None
