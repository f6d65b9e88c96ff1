"""Decoding into Hugging Face model directories and streaming safetensors output.

A tiny GPT-2 (one layer, tied embeddings) is built with transformers on the fly; nothing is
downloaded. The properties: ``from_pretrained`` on the decoded directory gives exactly the
source model's logits with the output head still tied, sharding gives transformers' index and
shards, the small files come from the ``.mrc`` or ``--like``, bad requests fail with one line and
write nothing, the streamed safetensors file holds exactly what the in-memory path wrote, and
decoding memory is bounded by the largest tensor, not the model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors import safe_open

from peak_rss import MALLOC_SLACK

import mlcompress
from mlcompress.assembly import base_metadata
from mlcompress.checkpoint import ALIASES_KEY, load_checkpoint, save_checkpoint
from mlcompress.checkpoint.hf_output import FILES_KEY, STORED_FILES, shards
from mlcompress.checkpoint.safetensors_stream import TensorEntry, stream_safetensors
from mlcompress.cli import main
from mlcompress.container import encode_tensor, open_mrc, write_encoded
from mlcompress.errors import CheckpointError, InputError, UsageError

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_TEXT = '{"model": {"type": "BPE", "vocab": {"a": 0}}}\n'


@dataclass
class Ran:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Ran]:
    """``mlcompress ARGS`` in this process (a subprocess per case cost 3 s of imports), in ``cwd``."""
    monkeypatch.delenv("MLCOMPRESS_DEBUG", raising=False)

    def run(*args: str | Path, cwd: Path) -> Ran:
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return Ran(code, out, err)

    return run


def assert_one_line_error(ran: Ran, code: int, *fragments: str) -> None:
    assert ran.code == code, (ran.stdout, ran.stderr)
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), ran.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny tied GPT-2 saved with save_pretrained (plus a tokenizer file and a hidden file),
    and its lossless ``.mrc``."""
    root = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64,
                                     bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    src = root / "src"
    transformers.GPT2LMHeadModel(config).save_pretrained(src)
    (src / "tokenizer.json").write_text(TOKENIZER_TEXT)
    (src / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    mrc = root / "model.mrc"
    mlcompress.encode(src, mrc, method=mlcompress.Lossless())
    return {"root": root, "src": src, "mrc": mrc}


def logits(directory: Path) -> tuple[torch.Tensor, object]:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    model.eval()
    with torch.no_grad():
        return model(torch.arange(24).reshape(2, 12) % 100).logits, model


def assert_tied(model: object) -> None:
    assert model.lm_head.weight is model.transformer.wte.weight  # type: ignore[attr-defined]


def test_mrc_keeps_config_and_generation_config(gpt2: dict[str, Path]) -> None:
    files = open_mrc(gpt2["mrc"]).metadata[FILES_KEY]
    assert set(files) == set(STORED_FILES)
    for name in STORED_FILES:
        assert files[name] == (gpt2["src"] / name).read_text()


def test_decoded_directory_loads_with_identical_logits_and_ties(gpt2: dict[str, Path], tmp_path: Path) -> None:
    report = mlcompress.decode_file(gpt2["mrc"], f"{tmp_path / 'out'}/")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert report.path == out and report.details["output_bytes"] == sum(p.stat().st_size for p in out.iterdir())
    for name in STORED_FILES:  # written back byte for byte
        assert (out / name).read_bytes() == (gpt2["src"] / name).read_bytes()
    with safe_open(str(out / "model.safetensors"), framework="pt") as reader:
        assert reader.metadata() == {"format": "pt"}
    expected, source = logits(gpt2["src"])
    got, model = logits(out)
    assert torch.equal(got, expected)
    assert_tied(source)
    assert_tied(model)


def test_like_copies_tokenizer_files_but_not_weights_or_hidden_files(gpt2: dict[str, Path], tmp_path: Path) -> None:
    like = tmp_path / "like"
    like.mkdir()
    for name in ("config.json", "tokenizer.json", ".gitattributes"):
        (like / name).write_bytes((gpt2["src"] / name).read_bytes())
    (like / "special_tokens_map.json").symlink_to(like / "tokenizer.json")  # the Hugging Face cache links
    (like / "pytorch_model.bin").write_bytes(b"not copied")
    (like / "extra.safetensors").write_bytes(b"not copied")
    (like / "onnx").mkdir()
    (like / "config.json").write_text('{"edited": true}')  # the .mrc's own config wins
    out = tmp_path / "out"
    out.mkdir()  # an existing empty directory is a directory output
    mlcompress.decode_file(gpt2["mrc"], out, like=like)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "special_tokens_map.json", "tokenizer.json"]
    assert (out / "tokenizer.json").read_text() == TOKENIZER_TEXT
    assert (out / "special_tokens_map.json").read_text() == TOKENIZER_TEXT and not (out / "special_tokens_map.json").is_symlink()
    assert (out / "config.json").read_bytes() == (gpt2["src"] / "config.json").read_bytes()


def test_sharded_directory_matches_transformers_layout_and_loads(gpt2: dict[str, Path], tmp_path: Path, cli) -> None:
    proc = cli("decode", gpt2["mrc"], "-o", "out/", "--max-shard-size", "20kB", "--json", cwd=tmp_path)
    assert proc.code == 0, proc.stderr
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    weight_files = sorted(p.name for p in out.glob("*.safetensors"))
    count = len(weight_files)
    assert count >= 3
    assert weight_files == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert set(index["weight_map"].values()) == set(weight_files)
    stored = load_checkpoint(gpt2["src"])
    assert set(index["weight_map"]) == set(stored)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    for name in weight_files:
        with safe_open(str(out / name), framework="pt") as reader:
            assert reader.metadata() == {"format": "pt"}
            keys = list(reader.keys())
            assert all(index["weight_map"][k] == name for k in keys)
            size = sum(reader.get_tensor(k).numel() * 4 for k in keys)
            assert size <= 20_000 or len(keys) == 1  # a tensor larger than the limit is alone
    assert json.loads(proc.stdout)["output_files"] == sorted(p.name for p in out.iterdir())
    expected, _ = logits(gpt2["src"])
    got, model = logits(out)
    assert torch.equal(got, expected)
    assert_tied(model)
    loaded = load_checkpoint(out)
    assert set(loaded) == set(stored) and all(torch.equal(loaded[k], stored[k]) for k in stored)


def test_shards_split_in_order_at_the_limit() -> None:
    entries = [TensorEntry(f"t{i}", (n,), torch.float32) for i, n in enumerate([2, 2, 10, 1, 1, 3])]
    sizes = [[e.nbytes for e in group] for group in shards(entries, 16)]
    assert sizes == [[8, 8], [40], [4, 4], [12]]
    assert [e for g in shards(entries, 16) for e in g] == entries


def test_existing_non_empty_directory_needs_force_and_is_then_replaced_whole(gpt2: dict[str, Path], tmp_path: Path,
                                                                             cli) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    assert_one_line_error(cli("decode", gpt2["mrc"], "-o", "out", cwd=tmp_path), 1, "non-empty", "--force")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    proc = cli("decode", gpt2["mrc"], "-o", "out/", "--force", cwd=tmp_path)
    assert proc.code == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left behind


def test_bad_requests_fail_with_one_line_and_write_nothing(gpt2: dict[str, Path], tmp_path: Path, cli) -> None:
    (tmp_path / "empty").mkdir()
    state = {"w": torch.ones(3, 3)}
    save_checkpoint(state, tmp_path / "plain.pt")
    mlcompress.encode(tmp_path / "plain.pt", tmp_path / "plain.mrc", method=mlcompress.Lossless())
    before = sorted(p.name for p in tmp_path.iterdir())
    cases = [
        (("-o", "out/", "--like", "empty"), 1, ["--like", "no config.json"]),
        (("-o", "out/", "--like", "missing"), 1, ["--like", "not a directory"]),
        (("-o", "out/", "--max-shard-size", "lots"), 2, ["size", "lots"]),
        (("-o", "out/", "--max-shard-size", "0"), 2, ["size"]),
        (("-o", "x.safetensors", "--max-shard-size", "2GB"), 2, ["directory", "end -o with /"]),
        (("-o", "x.npz"), 1, ["unknown output format"]),
    ]
    for args, code, fragments in cases:
        assert_one_line_error(cli("decode", gpt2["mrc"], *args, cwd=tmp_path), code, *fragments)
    # a .mrc not encoded from a model directory keeps no config: the error names --like
    assert_one_line_error(cli("decode", "plain.mrc", "-o", "out/", cwd=tmp_path), 2, "config.json", "--like")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    like = tmp_path / "like"
    like.mkdir()
    (like / "config.json").write_bytes((gpt2["src"] / "config.json").read_bytes())
    with pytest.raises(UsageError):
        mlcompress.decode_file(tmp_path / "plain.mrc", tmp_path / "x.safetensors", like=like)
    mlcompress.decode_file(tmp_path / "plain.mrc", f"{tmp_path / 'out'}/", like=like)  # with --like it works
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(load_checkpoint(tmp_path / "out")["w"], state["w"])


def test_damaged_payload_leaves_no_output(gpt2: dict[str, Path], tmp_path: Path, cli) -> None:
    data = bytearray(gpt2["mrc"].read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor's payload: found only after the others were written
    bad = tmp_path / "bad.mrc"
    bad.write_bytes(bytes(data))
    for output in ("out/", "out.safetensors"):
        assert_one_line_error(cli("decode", "bad.mrc", "-o", output, cwd=tmp_path), 1, "checksum")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.mrc"]


def test_crafted_file_names_in_metadata_are_refused(tmp_path: Path) -> None:
    entries = [encode_tensor("w", torch.ones(2), "raw", {})]
    for name in ("../evil.json", "model.safetensors", ".", "a/b"):
        mrc = tmp_path / "crafted.mrc"
        write_encoded(mrc, entries, {FILES_KEY: {"config.json": "{}", name: "x"}}, force=True)
        with pytest.raises(InputError, match="not a model file name"):
            mlcompress.decode_file(mrc, f"{tmp_path / 'out'}/")
        assert not (tmp_path / "out").exists() and not (tmp_path / "evil.json").exists()


def test_every_encoder_records_the_model_files_only_for_directories(gpt2: dict[str, Path]) -> None:
    meta = base_metadata(gpt2["src"], {"method": "x"})
    assert meta[FILES_KEY] == {n: (gpt2["src"] / n).read_text() for n in STORED_FILES}
    assert FILES_KEY not in base_metadata(gpt2["src"] / "model.safetensors", {"method": "x"})
    assert "source" not in base_metadata(gpt2["src"], {"method": "rec"}, record_source=False)


def test_a_quantized_directory_decodes_to_a_loadable_directory(gpt2: dict[str, Path], tmp_path: Path) -> None:
    quant = tmp_path / "q.mrc"
    mlcompress.encode(gpt2["src"], quant, method=mlcompress.Quant(bits=8))
    mlcompress.decode_file(quant, f"{tmp_path / 'q'}/")
    _, model = logits(tmp_path / "q")
    assert_tied(model)


# --------------------------------------------------------------------------------------------
# streaming safetensors


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def test_streamed_file_equals_the_in_memory_path(gpt2: dict[str, Path], tmp_path: Path) -> None:
    streamed = tmp_path / "streamed.safetensors"
    updates: list = []
    mlcompress.decode_file(gpt2["mrc"], streamed, progress=updates.append)
    stored = len(open_mrc(gpt2["mrc"]).units)
    assert [(u.phase, u.done, u.total, u.unit) for u in updates] == [("decode", i, stored, "tensors")
                                                                      for i in range(stored + 1)]
    in_memory = save_checkpoint(mlcompress.decode(gpt2["mrc"]), tmp_path / "memory.safetensors",
                                metadata={"format": "pt"})
    with safe_open(str(streamed), framework="pt") as a, safe_open(str(in_memory), framework="pt") as b:
        assert a.metadata() == b.metadata() == {"format": "pt"}
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            x, y = a.get_tensor(key), b.get_tensor(key)
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(bits(x), bits(y)), key


def test_tied_tensors_stay_tied_through_a_streamed_file(tmp_path: Path) -> None:
    embed = torch.randn(7, 4)
    state = {"embed.weight": embed, "norm": torch.ones(4), "head.weight": embed}
    save_checkpoint(state, tmp_path / "source.pt")
    mlcompress.encode(tmp_path / "source.pt", tmp_path / "tied.mrc", method=mlcompress.Lossless())
    for suffix in (".safetensors", ".pt"):
        out = tmp_path / f"tied{suffix}"
        mlcompress.decode_file(tmp_path / "tied.mrc", out)
        loaded = load_checkpoint(out)
        assert set(loaded) == set(state)
        assert loaded["head.weight"].data_ptr() == loaded["embed.weight"].data_ptr()
        assert torch.equal(loaded["head.weight"], embed)
    with safe_open(str(tmp_path / "tied.safetensors"), framework="pt") as reader:
        assert sorted(reader.keys()) == ["embed.weight", "norm"]  # stored once
        assert json.loads(reader.metadata()[ALIASES_KEY]) == {"head.weight": "embed.weight"}


def test_keep_dtype_streams_fp8_values_with_their_scales_and_ties(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    embed = torch.randn(16, 8, generator=g)
    state = {"embed.weight": embed, "fc.weight": torch.randn(8, 8, generator=g), "fc.bias": torch.randn(8, generator=g),
             "head.weight": embed}
    save_checkpoint(state, tmp_path / "source.pt")
    mrc = tmp_path / "f8.mrc"
    mlcompress.encode(tmp_path / "source.pt", mrc, method=mlcompress.Float(format="fp8-e4m3", per_channel=True))
    expected = mlcompress.decode(mrc, keep_dtype=True)
    assert expected["embed.weight"].dtype == torch.float8_e4m3fn and "embed.weight_scale" in expected
    for suffix in (".safetensors", ".pt"):
        out = tmp_path / f"kept{suffix}"
        mlcompress.decode_file(mrc, out, keep_dtype=True)
        loaded = load_checkpoint(out)
        assert set(loaded) == set(expected)
        for name, tensor in expected.items():
            assert loaded[name].dtype == tensor.dtype and torch.equal(bits(loaded[name]), bits(tensor)), name
        for tied in ("head.weight", "head.weight_scale"):  # an alias keeps its scale tied too
            assert loaded[tied].data_ptr() == loaded[tied.replace("head", "embed")].data_ptr()
    with safe_open(str(tmp_path / "kept.safetensors"), framework="pt") as reader:
        assert json.loads(reader.metadata()[ALIASES_KEY]) == {"head.weight": "embed.weight",
                                                              "head.weight_scale": "embed.weight_scale"}


def every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, 5, generator=g)
    out = {
        "f64": base.double(), "f32": base, "f16": base.half(), "bf16": base.bfloat16(),
        "i64": torch.arange(-3, 3), "i32": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "i16": torch.tensor([-7, 9], dtype=torch.int16), "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "c64": torch.randn(2, dtype=torch.complex64),
        "nan": torch.tensor([float("nan"), -0.0, float("inf"), 1e-45]),
        "f8": (base * 10).to(torch.float8_e4m3fn), "f8b": base.to(torch.float8_e5m2),
    }
    return out


def test_stream_writer_round_trips_every_dtype_bit_exactly(tmp_path: Path) -> None:
    tensors = every_dtype()
    entries = [TensorEntry(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    path = tmp_path / "s.safetensors"
    with stream_safetensors(path, entries, {"k": "v"}) as stream:
        stream.write_from(iter(tensors.items()))
    with safe_open(str(path), framework="pt") as reader:
        assert reader.metadata() == {"k": "v"}
        assert sorted(reader.keys()) == sorted(tensors)
        for name, tensor in tensors.items():
            got = reader.get_tensor(name)
            assert got.dtype == tensor.dtype and got.shape == tensor.shape and torch.equal(bits(got), bits(tensor)), name
    assert (8 + int.from_bytes(path.read_bytes()[:8], "little")) % 8 == 0  # data starts 8-byte aligned
    loaded = load_checkpoint(path)
    assert all(torch.equal(bits(loaded[n]), bits(t)) for n, t in tensors.items())


def test_stream_writer_refuses_what_the_header_did_not_announce(tmp_path: Path) -> None:
    entries = [TensorEntry("a", (2,), torch.float32), TensorEntry("b", (3,), torch.float32)]
    wrong = [("b", torch.zeros(3)), ("a", torch.zeros(2, dtype=torch.float64)), ("a", torch.zeros(3))]
    for name, tensor in wrong:
        with pytest.raises(CheckpointError, match="expected 'a'"):
            with stream_safetensors(tmp_path / "x.safetensors", entries) as stream:
                stream.write(name, tensor)
    with pytest.raises(CheckpointError, match="ended before tensor 'b'"):
        with stream_safetensors(tmp_path / "x.safetensors", entries) as stream:
            stream.write("a", torch.zeros(2))
    with pytest.raises(CheckpointError, match="listed twice"):
        with stream_safetensors(tmp_path / "x.safetensors", entries + entries[:1]):
            pass
    with pytest.raises(CheckpointError, match="cannot store"):
        with stream_safetensors(tmp_path / "x.safetensors", [TensorEntry("q", (1,), torch.complex128)]):
            pass


# --------------------------------------------------------------------------------------------
# memory

_CHILD = textwrap.dedent("""
    import json, sys

    def peak():
        with open("/proc/self/status") as status:
            return next(int(l.split()[1]) * 1024 for l in status if l.startswith("VmHWM"))

    import torch
    import mlcompress
    from mlcompress import checkpoint  # everything the decode imports, before the baseline
    base = peak()
    mlcompress.decode_file(sys.argv[1], sys.argv[2])
    mlcompress.decode_file(sys.argv[1], sys.argv[3] + "/", like=sys.argv[4])
    print(json.dumps({"base": base, "peak": peak()}))
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_decode_memory_is_bounded_by_the_largest_tensor(tmp_path: Path) -> None:
    """8 tensors of 16 MiB: the old in-memory decode grew by more than the model (128 MiB);
    streaming must stay within 3 tensors (the payload, the decoded tensor, a codec buffer)."""
    g = torch.Generator().manual_seed(0)
    tensors = {f"layer{i}.weight": torch.randn(2048, 2048, generator=g) for i in range(8)}
    largest = 2048 * 2048 * 4
    mrc = tmp_path / "big.mrc"
    mlcompress.encode(tensors, mrc, method=mlcompress.Lossless())
    del tensors
    like = tmp_path / "like"
    like.mkdir()
    (like / "config.json").write_text("{}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(mrc), str(tmp_path / "out.safetensors"),
                           str(tmp_path / "out"), str(like)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(proc.stdout)
    grown = figures["peak"] - figures["base"]
    assert grown <= 3 * largest + MALLOC_SLACK, f"decode grew peak RSS by {grown / 2**20:.1f} MiB"
    assert (tmp_path / "out.safetensors").stat().st_size > 8 * largest
    assert (tmp_path / "out" / "model.safetensors").stat().st_size > 8 * largest
