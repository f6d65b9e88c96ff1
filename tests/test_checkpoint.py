"""Checkpoint I/O: every readable format round-trips, bit for bit, with tied tensors kept tied."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from mlcompress.checkpoint import (
    ALIASES_KEY,
    checkpoint_format,
    load_checkpoint,
    save_checkpoint,
    tied_groups,
)
from mlcompress.errors import CheckpointError, InputError


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Flatten(), torch.nn.Linear(8, 3)
    )


class TiedNet(torch.nn.Module):
    """An embedding reused as the output projection, as language models do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(5, 4)
        self.head = torch.nn.Linear(4, 5, bias=False)
        self.head.weight = self.embed.weight


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor: equality here is bit-exactness, NaN payloads and -0.0 included."""
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        got = loaded[name]
        assert got.dtype == tensor.dtype, name
        assert got.shape == tensor.shape, name
        assert torch.equal(bits(got), bits(tensor.detach().cpu())), name


def every_dtype() -> dict[str, torch.Tensor]:
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40, -2.5, 3.0])
    nan_payload = torch.tensor([0x7FC00123], dtype=torch.int32).view(torch.float32)
    return {
        "f64": special.double().reshape(2, 4),
        "f32": torch.cat([special, nan_payload]),
        "f16": torch.cat([special.half(), torch.tensor([6e-8], dtype=torch.float16)]),
        "bf16": special.bfloat16(),
        "i64": torch.tensor([-(2**63), 2**63 - 1, 0], dtype=torch.int64),
        "i8": torch.tensor([[-128, 127], [0, 5]], dtype=torch.int8),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(7.5),
    }


# --------------------------------------------------------------------------------------------
# PyTorch state-dict files


def test_state_dict_pt_round_trip(tmp_path: Path) -> None:
    state = tiny_model().state_dict()
    torch.save(state, tmp_path / "m.pt")
    assert checkpoint_format(tmp_path / "m.pt") == "torch"
    assert_same(load_checkpoint(tmp_path / "m.pt"), dict(state))


def test_legacy_torch_format(tmp_path: Path) -> None:
    state = tiny_model().state_dict()
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert_same(load_checkpoint(tmp_path / "legacy.pth"), dict(state))


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "model", "module"])
def test_training_checkpoint_wrappers_are_unwrapped(tmp_path: Path, key: str) -> None:
    model = tiny_model()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 1, 4, 4)).sum().backward()
    optimizer.step()  # gives the optimizer tensor state that must not leak into the weights
    torch.save(
        {key: model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3, "note": "x"},
        tmp_path / "ckpt.pt",
    )
    assert_same(load_checkpoint(tmp_path / "ckpt.pt"), dict(model.state_dict()))


def test_nested_dicts_are_flattened_and_non_tensors_dropped(tmp_path: Path) -> None:
    a, b, c = torch.ones(2), torch.zeros(3), torch.arange(4)
    torch.save({"enc": {"w": a, "inner": {"b": b}}, "c": c, "step": 10, "names": ["x"]}, tmp_path / "n.pt")
    assert_same(load_checkpoint(tmp_path / "n.pt"), {"enc.w": a, "enc.inner.b": b, "c": c})


def test_submodule_named_model_is_not_mistaken_for_a_wrapper(tmp_path: Path) -> None:
    tensors = {"model": {"weight": torch.ones(2)}, "head.weight": torch.zeros(2)}
    torch.save(tensors, tmp_path / "m.pt")
    assert set(load_checkpoint(tmp_path / "m.pt")) == {"model.weight", "head.weight"}


def test_dataparallel_prefix_is_stripped(tmp_path: Path) -> None:
    state = tiny_model().state_dict()
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pt")
    assert_same(load_checkpoint(tmp_path / "ddp.pt"), dict(state))


def test_lightning_model_prefix_is_stripped_only_in_lightning_checkpoints(tmp_path: Path) -> None:
    state = {f"model.{k}": v for k, v in tiny_model().state_dict().items()}
    torch.save({"state_dict": state, "pytorch-lightning_version": "2.4.0", "epoch": 1}, tmp_path / "l.ckpt")
    assert set(load_checkpoint(tmp_path / "l.ckpt")) == {k[len("model."):] for k in state}
    torch.save(state, tmp_path / "plain.pt")
    assert set(load_checkpoint(tmp_path / "plain.pt")) == set(state)


def test_checkpoint_without_tensors_is_refused(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "none.pt")
    with pytest.raises(CheckpointError, match="holds no tensors"):
        load_checkpoint(tmp_path / "none.pt")
    torch.save(torch.ones(3), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_checkpoint(tmp_path / "bare.pt")


# --------------------------------------------------------------------------------------------
# Pickled modules: refused unless the user opts in


def test_pickled_module_is_refused_without_the_flag(tmp_path: Path) -> None:
    model = tiny_model()
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "whole.pt")
    message = info.value.one_line()
    assert "--unsafe-pickle" in message and "\n" not in message
    assert_same(load_checkpoint(tmp_path / "whole.pt", unsafe_pickle=True), dict(model.state_dict()))


def test_pickled_module_inside_a_dict_needs_the_flag(tmp_path: Path) -> None:
    model = tiny_model()
    torch.save({"model": model, "epoch": 2}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="--unsafe-pickle"):
        load_checkpoint(tmp_path / "ckpt.pt")
    assert_same(load_checkpoint(tmp_path / "ckpt.pt", unsafe_pickle=True), dict(model.state_dict()))


def test_cli_refuses_pickled_module_without_the_flag(tmp_path: Path) -> None:
    torch.save(tiny_model(), tmp_path / "whole.pt")
    command = [sys.executable, "-m", "mlcompress", "encode", str(tmp_path / "whole.pt"), "--lossless"]
    refused = subprocess.run(command, capture_output=True, text=True, env=cli_env())
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: ") and "--unsafe-pickle" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "whole.mrc").exists()
    accepted = subprocess.run(command + ["--unsafe-pickle"], capture_output=True, text=True, env=cli_env())
    assert accepted.returncode == 0, accepted.stderr
    assert_same(load_checkpoint(tmp_path / "whole.mrc"), dict(tiny_model().state_dict()))


def cli_env() -> dict[str, str]:
    """The caller's environment without MLCOMPRESS_DEBUG, which would add a traceback."""
    return {k: v for k, v in os.environ.items() if k != "MLCOMPRESS_DEBUG"}


# --------------------------------------------------------------------------------------------
# safetensors, TorchScript, .mrc


def test_safetensors_round_trip_with_metadata(tmp_path: Path) -> None:
    state = dict(tiny_model().state_dict())
    out = save_checkpoint(state, tmp_path / "m.safetensors", metadata={"source": "tiny"})
    assert checkpoint_format(out) == "safetensors"
    assert_same(load_checkpoint(out), state)
    with safe_open(str(out), framework="pt") as reader:
        assert reader.metadata() == {"source": "tiny"}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
def test_every_dtype_round_trips_bit_exactly(tmp_path: Path, suffix: str) -> None:
    tensors = every_dtype()
    path = save_checkpoint(tensors, tmp_path / f"d{suffix}")
    assert_same(load_checkpoint(path), tensors)


def test_unknown_suffix_is_written_as_safetensors(tmp_path: Path) -> None:
    path = save_checkpoint({"w": torch.ones(2)}, tmp_path / "weights.out")
    assert checkpoint_format(path) == "safetensors"


def test_format_is_detected_by_content_not_name(tmp_path: Path) -> None:
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    save_file(tensors, str(tmp_path / "really_safetensors.pt"))
    torch.save(tensors, tmp_path / "really_torch.safetensors")
    assert checkpoint_format(tmp_path / "really_safetensors.pt") == "safetensors"
    assert checkpoint_format(tmp_path / "really_torch.safetensors") == "torch"
    assert_same(load_checkpoint(tmp_path / "really_safetensors.pt"), tensors)
    assert_same(load_checkpoint(tmp_path / "really_torch.safetensors"), tensors)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torchscript_archive_parameters_and_buffers(tmp_path: Path) -> None:
    model = tiny_model().eval()
    torch.jit.script(model).save(str(tmp_path / "scripted.pt"))
    assert checkpoint_format(tmp_path / "scripted.pt") == "torchscript"
    assert_same(load_checkpoint(tmp_path / "scripted.pt"), dict(model.state_dict()))


def test_mrc_container_is_read(tmp_path: Path) -> None:
    from mlcompress.container import write_mrc

    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    path = write_mrc(tmp_path / "m.bin", tensors, {n: ("raw", {}) for n in tensors}, {})
    assert checkpoint_format(path) == "mrc"  # by its magic bytes, despite the .bin name
    assert_same(load_checkpoint(path), tensors)


# --------------------------------------------------------------------------------------------
# Tied tensors


def test_tied_groups_finds_exact_aliases_only() -> None:
    base = torch.arange(12.0)
    tensors = {
        "a": base,
        "b": base,
        "view": base[:6],  # overlaps a but is not the same tensor
        "other": torch.zeros(3),
        "e1": torch.zeros(0),
        "e2": torch.zeros(0),
    }
    assert tied_groups(tensors) == [["a", "b"]]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_tied_tensors_are_stored_once_and_restored_shared(tmp_path: Path, suffix: str) -> None:
    state = dict(TiedNet().state_dict())
    assert tied_groups(state) == [["embed.weight", "head.weight"]]
    path = save_checkpoint(state, tmp_path / f"tied{suffix}")
    loaded = load_checkpoint(path)
    assert_same(loaded, state)
    assert loaded["embed.weight"].data_ptr() == loaded["head.weight"].data_ptr()
    if suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as reader:
            assert list(reader.keys()) == ["embed.weight"]  # stored once
            assert json.loads(reader.metadata()[ALIASES_KEY]) == {"head.weight": "embed.weight"}


def test_overlapping_views_are_saved_as_copies(tmp_path: Path) -> None:
    base = torch.arange(12.0)
    tensors = {"all": base, "first_half": base[:6], "strided": base[::2]}
    loaded = load_checkpoint(save_checkpoint(tensors, tmp_path / "views.safetensors"))
    assert_same(loaded, tensors)


def test_damaged_alias_table_is_reported(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, str(tmp_path / "bad.safetensors"), metadata={ALIASES_KEY: '{"b": "zz"}'})
    with pytest.raises(CheckpointError, match="damaged alias table"):
        load_checkpoint(tmp_path / "bad.safetensors")
    save_file({"a": torch.ones(2)}, str(tmp_path / "bad2.safetensors"), metadata={ALIASES_KEY: "[1]"})
    with pytest.raises(CheckpointError, match="not a JSON object"):
        load_checkpoint(tmp_path / "bad2.safetensors")


# --------------------------------------------------------------------------------------------
# Hugging Face model directories


def hf_dir(tmp_path: Path, kind: str, state: dict[str, torch.Tensor]) -> Path:
    """A hand-made save_pretrained-style directory with two shards and an index."""
    model_dir = tmp_path / f"hf-{kind}"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    names = list(state)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, part in enumerate(halves, start=1):
        shard = {n: state[n].contiguous() for n in part}
        if kind == "safetensors":
            file_name = f"model-0000{i}-of-00002.safetensors"
            save_file(shard, str(model_dir / file_name))
        else:
            file_name = f"pytorch_model-0000{i}-of-00002.bin"
            torch.save(shard, model_dir / file_name)
        weight_map.update({n: file_name for n in part})
    index = "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
    (model_dir / index).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return model_dir


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_hf_sharded_directory(tmp_path: Path, kind: str) -> None:
    state = dict(tiny_model().state_dict())
    model_dir = hf_dir(tmp_path, kind, state)
    assert checkpoint_format(model_dir) == "hf-dir"
    assert_same(load_checkpoint(model_dir), state)


def test_hf_single_file_directories(tmp_path: Path) -> None:
    state = dict(tiny_model().state_dict())
    (tmp_path / "st").mkdir()
    save_file(state, str(tmp_path / "st" / "model.safetensors"))
    (tmp_path / "pt").mkdir()
    torch.save(state, tmp_path / "pt" / "pytorch_model.bin")
    assert_same(load_checkpoint(tmp_path / "st"), state)
    assert_same(load_checkpoint(tmp_path / "pt"), state)


def test_hf_index_with_missing_shard(tmp_path: Path) -> None:
    model_dir = hf_dir(tmp_path, "safetensors", dict(tiny_model().state_dict()))
    (model_dir / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="references shard model-00002-of-00002.safetensors, which is missing"):
        load_checkpoint(model_dir)


def test_hf_index_naming_a_tensor_its_shard_lacks(tmp_path: Path) -> None:
    model_dir = hf_dir(tmp_path, "safetensors", dict(tiny_model().state_dict()))
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'ghost.weight'.*which lacks it"):
        load_checkpoint(model_dir)


def test_hf_index_cannot_point_outside_the_directory(tmp_path: Path) -> None:
    model_dir = tmp_path / "evil"
    model_dir.mkdir()
    save_file({"w": torch.ones(1)}, str(tmp_path / "outside.safetensors"))
    (model_dir / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "../outside.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="outside"):
        load_checkpoint(model_dir)


def test_directory_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a Hugging Face model directory"):
        load_checkpoint(tmp_path)


# --------------------------------------------------------------------------------------------
# Bad input: one clear error each


def test_missing_empty_unknown_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "absent.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty"):
        load_checkpoint(tmp_path / "empty.pt")
    (tmp_path / "notes.txt").write_bytes(b"just some text, not weights")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_checkpoint(tmp_path / "notes.txt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="cannot read .* as safetensors"):
        load_checkpoint(tmp_path / "junk.safetensors")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_files_raise_checkpoint_error(tmp_path: Path, suffix: str) -> None:
    path = save_checkpoint(dict(tiny_model().state_dict()), tmp_path / f"m{suffix}")
    data = path.read_bytes()
    for cut in (len(data) // 3, len(data) - 7):
        damaged = tmp_path / f"cut{cut}{suffix}"
        damaged.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(damaged)
        assert "\n" not in info.value.one_line()


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """One small valid file per readable format, as bytes to damage."""
    folder = tmp_path_factory.mktemp("valid")
    model = tiny_model().eval()
    state = dict(model.state_dict())
    torch.save(state, folder / "zip.pt")
    torch.save(state, folder / "legacy.pt", _use_new_zipfile_serialization=False)
    save_file(state, str(folder / "st.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated
        torch.jit.script(model).save(str(folder / "ts.pt"))
    return {path.name: path.read_bytes() for path in folder.iterdir()}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.sampled_from(["zip.pt", "legacy.pt", "st.safetensors", "ts.pt"]),
    position=st.floats(0, 1, exclude_max=True),
    bit=st.integers(0, 7),
    truncate=st.booleans(),
)
def test_damaged_files_load_or_raise_checkpoint_error(
    valid_files: dict[str, bytes], tmp_path: Path, name: str, position: float, bit: int, truncate: bool
) -> None:
    # PyTorch itself does not check the zip CRCs and can abort the process on a damaged
    # TorchScript archive; load_checkpoint must turn every such file into a CheckpointError.
    data = bytearray(valid_files[name])
    index = int(position * len(data))
    if truncate:
        data = data[: max(index, 1)]
    else:
        data[index] ^= 1 << bit
    damaged = tmp_path / name
    damaged.write_bytes(bytes(data))
    try:
        tensors = load_checkpoint(damaged)
    except CheckpointError:
        return
    assert tensors and all(isinstance(t, torch.Tensor) for t in tensors.values())


# --------------------------------------------------------------------------------------------
# Writing: atomic, never overwriting by accident, validating first


def test_existing_file_is_not_overwritten_without_force(tmp_path: Path) -> None:
    dest = tmp_path / "out.safetensors"
    dest.write_bytes(b"precious")
    with pytest.raises(InputError, match="already exists") as info:
        save_checkpoint({"w": torch.ones(2)}, dest)
    assert "--force" in info.value.one_line()
    assert dest.read_bytes() == b"precious"
    save_checkpoint({"w": torch.ones(2)}, dest, force=True)
    assert_same(load_checkpoint(dest), {"w": torch.ones(2)})


@pytest.mark.parametrize(
    "suffix, target", [(".safetensors", "mlcompress.checkpoint.safetensors_file.save_file"), (".pt", "torch.save")]
)
def test_failed_write_leaves_destination_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str, target: str
) -> None:
    dest = tmp_path / f"out{suffix}"
    dest.write_bytes(b"old contents")

    def write_half_then_fail(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(target, write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"w": torch.ones(2)}, dest, force=True)
    assert dest.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == [dest.name]  # no temporary left behind


def test_invalid_input_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a tensor"):
        save_checkpoint({"w": torch.ones(2), "n": 3}, tmp_path / "a.safetensors")  # type: ignore[dict-item]
    with pytest.raises(CheckpointError, match="encoding"):
        save_checkpoint({"w": torch.ones(2)}, tmp_path / "a.mrc")
    with pytest.raises(CheckpointError, match="cannot store"):
        save_checkpoint({"c": torch.ones(2, dtype=torch.complex128)}, tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match="reserved"):
        save_checkpoint({"w": torch.ones(2)}, tmp_path / "a.safetensors", metadata={ALIASES_KEY: "{}"})
    with pytest.raises(InputError, match="does not exist"):
        save_checkpoint({"w": torch.ones(2)}, tmp_path / "missing" / "a.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_written_files_get_ordinary_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = save_checkpoint({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_saved_with_ties_kept(tmp_path: Path) -> None:
    state = {k: v.cuda() for k, v in TiedNet().state_dict().items()}
    for suffix in (".safetensors", ".pt"):
        loaded = load_checkpoint(save_checkpoint(state, tmp_path / f"c{suffix}"))
        assert_same(loaded, state)
        assert loaded["embed.weight"].data_ptr() == loaded["head.weight"].data_ptr()
