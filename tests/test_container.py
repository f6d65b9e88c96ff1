"""The ``.mrc`` v1 container: round trips, and one specific error per kind of damage.

Damaged headers are crafted by rebuilding a valid file from a modified header dict with a fresh
header CRC, so each test reaches the check it is about instead of stopping at the checksum. The
reference file carries a ``slack`` metadata string that the rebuild empties, so an edited header
never outgrows the original and the payload offsets stay valid.
"""

from __future__ import annotations

import copy
import json
import os
import threading
import zlib
from pathlib import Path

import pytest
import torch
from bitexact import assert_same_tensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlcompress import codecs, container
from mlcompress.container import open_mrc, write_mrc
from mlcompress.format.header import (ALIGN, MAGIC, MAX_HEADER_BYTES, PREAMBLE, PRESET_DICTIONARY, VERSION,
                                      decode_header, encode_header)
from mlcompress.errors import InputError, MrcFormatError
from mlcompress.inspection import summarize

def deflate(text: bytes) -> bytes:
    """Version 2's header compression (raw DEFLATE with the preset dictionary) of ``text``."""
    d = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, PRESET_DICTIONARY)
    return d.compress(text) + d.flush()


# Incompressible (the header is zlib-compressed), so emptying it frees ~250 stored bytes.
SLACK = "".join(f"{(i * 2654435761 + 12345) % 2**32:08x}" for i in range(64))
PLAN = {"w": "lossless", "b": "raw", "emb": "lossless", "idx": "raw", "empty": "raw", "h": "lossless"}


def reference_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    emb = (torch.randn(50, 8, generator=g) * 0.1).bfloat16()
    return {
        "w": torch.randn(20, 30, generator=g) * 0.05,
        "b": torch.randn(20, generator=g),
        "emb": emb,
        "idx": torch.arange(-3, 4, dtype=torch.int64),
        "empty": torch.empty(0, dtype=torch.float32),
        "h": (torch.randn(3, 5, generator=g)).half(),
        "tied": emb,  # tied to "emb": stored once, restored as the same object
    }


def write_reference(path: Path) -> Path:
    return write_mrc(path, reference_tensors(), lambda name, t: (PLAN[name], {}), {"slack": SLACK, "source": "test"})


def assert_same(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(ref)  # the checkpoint's order is kept
    assert_same_tensors(got, ref)


@pytest.fixture
def mrc(tmp_path) -> Path:
    return write_reference(tmp_path / "ref.mrc")


def split(path: Path) -> tuple[dict, int, bytes]:
    """(header dict, header length, everything after the header) of a valid file."""
    data = path.read_bytes()
    _, _, _, hlen = PREAMBLE.unpack_from(data)
    return decode_header(data[PREAMBLE.size : PREAMBLE.size + hlen]), hlen, data[PREAMBLE.size + hlen :]


def rebuild(path: Path, edit, *, body_edit=None, version: int = VERSION, header: bytes | None = None) -> Path:
    """Rewrite ``path`` with ``edit(doc)`` applied to its header; the header CRC is recomputed."""
    doc, hlen, body = split(path)
    doc = copy.deepcopy(doc)
    doc["metadata"]["slack"] = ""
    edit(doc)
    if header is None:
        header = encode_header(doc)
    assert len(header) <= hlen, "edit made the header longer than the slack allows"
    header = header + b"\0" * (hlen - len(header))
    if body_edit is not None:
        body = body_edit(bytearray(body))
    out = path.with_name("damaged.mrc")
    out.write_bytes(PREAMBLE.pack(MAGIC, version, zlib.crc32(header), hlen) + header + bytes(body))
    return out


def record(doc: dict, name: str) -> dict:
    return next(r for r in doc["tensors"] if r["name"] == name)


def damaged(path: Path, message: str) -> None:
    """Opening and decoding everything raises MrcFormatError matching ``message``, on one line."""
    with pytest.raises(MrcFormatError, match=message) as info:
        open_mrc(path).tensors()
    assert "\n" not in info.value.one_line()


# --------------------------------------------------------------------------------------------
# Valid files


def test_roundtrip_every_tensor_bit_exact(mrc):
    f = open_mrc(mrc)
    assert f.version == VERSION
    assert f.metadata["source"] == "test"
    assert_same(f.tensors(), reference_tensors())


def test_tied_tensors_are_stored_once_and_restored_as_one_object(mrc):
    f = open_mrc(mrc)
    rec = {r.name: r for r in f.records}
    assert rec["tied"].alias_of == "emb"
    assert sum(1 for r in f.records if r.alias_of is None) == 6
    out = f.tensors()
    assert out["tied"] is out["emb"]
    assert f.tensor("tied").equal(out["emb"])


def test_layout_is_aligned_and_in_order(mrc):
    f = open_mrc(mrc)
    stored = [r for r in f.records if r.alias_of is None]
    assert all(r.offset % ALIGN == 0 for r in stored)
    assert [r.offset for r in stored] == sorted(r.offset for r in stored)
    assert stored[-1].offset + stored[-1].length == f.file_size == mrc.stat().st_size


def test_codecs_are_the_ones_planned(mrc):
    f = open_mrc(mrc)
    assert {r.name: r.codec for r in f.records if r.alias_of is None} == PLAN


def test_rebuild_helper_keeps_a_valid_file_valid(mrc):
    assert_same(open_mrc(rebuild(mrc, lambda doc: None)).tensors(), reference_tensors())


def test_empty_container(tmp_path):
    p = write_mrc(tmp_path / "e.mrc", {}, {}, {})
    f = open_mrc(p)
    assert f.tensors() == {} and f.file_size == p.stat().st_size


def test_summary_totals_add_up_to_the_file_size(mrc):
    s = summarize(mrc)
    totals = s["totals"]
    size = mrc.stat().st_size
    assert totals["file_bytes"] == size
    assert totals["stored_bytes"] + totals["overhead_bytes"] == size
    assert sum(row["stored_bytes"] for row in s["tensors"]) == totals["stored_bytes"]
    ref = reference_tensors()
    stored = [n for n in ref if n != "tied"]
    assert totals["original_bytes"] == sum(ref[n].numel() * ref[n].element_size() for n in stored)
    assert totals["parameters"] == sum(ref[n].numel() for n in stored)
    assert totals["tensors"] == len(ref)
    assert next(r for r in s["tensors"] if r["name"] == "tied")["codec"] == "alias"
    json.dumps(s, allow_nan=False)


def test_missing_file_and_directory_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        open_mrc(tmp_path / "nope.mrc")
    with pytest.raises(InputError, match="is not a file"):
        open_mrc(tmp_path)


# --------------------------------------------------------------------------------------------
# Damage, one kind per test


@pytest.mark.parametrize(
    "cut, message",
    [
        (0, "bad magic"),
        (5, "bad magic"),
        (8, "truncated inside the preamble"),
        (20, "truncated inside the preamble"),
        (PREAMBLE.size, "truncated inside the header"),
        (PREAMBLE.size + 100, "truncated inside the header"),
        (-1, r"file is truncated \("),
        (-200, r"file is truncated \("),
    ],
)
def test_truncation(mrc, cut, message):
    data = mrc.read_bytes()
    if cut < 0:
        cut = len(data) + cut
    mrc.write_bytes(data[:cut])
    damaged(mrc, message)


def test_truncation_at_every_payload_boundary(mrc):
    f = open_mrc(mrc)
    data = mrc.read_bytes()
    for r in f.records:
        if r.alias_of is None and 0 < r.offset < len(data):
            mrc.write_bytes(data[: r.offset])
            damaged(mrc, "file is truncated")


def test_bad_magic(mrc):
    data = bytearray(mrc.read_bytes())
    data[1] ^= 0x20
    mrc.write_bytes(bytes(data))
    damaged(mrc, r"is not an \.mrc file \(bad magic bytes\)")


def test_unknown_version(mrc):
    damaged(rebuild(mrc, lambda doc: None, version=3), "unsupported .mrc version 3")


def test_header_version_disagrees_with_preamble(mrc):
    damaged(rebuild(mrc, lambda doc: doc.update(version=1)), "header version disagrees with the preamble")


def test_oversize_header_length(mrc):
    data = bytearray(mrc.read_bytes())
    _, version, crc, _ = PREAMBLE.unpack_from(data)
    data[: PREAMBLE.size] = PREAMBLE.pack(MAGIC, version, crc, MAX_HEADER_BYTES + 1)
    mrc.write_bytes(bytes(data))
    damaged(mrc, f"header length {MAX_HEADER_BYTES + 1} exceeds the")


def test_header_length_past_end_of_file(mrc):
    data = bytearray(mrc.read_bytes())
    _, version, crc, _ = PREAMBLE.unpack_from(data)
    data[: PREAMBLE.size] = PREAMBLE.pack(MAGIC, version, crc, len(data))
    mrc.write_bytes(bytes(data))
    damaged(mrc, "truncated inside the header")


@pytest.mark.parametrize(
    "stored, message",
    [
        (b"\xff\xff", "header is not a valid DEFLATE stream"),
        # raw DEFLATE has no checksum of its own: a cut stream followed by zero padding may
        # still inflate to a prefix of the text, which the JSON parser then refuses
        (deflate(b'{"format": "mlcompress.mrc"}')[:-3], "header is not (a valid|a complete|valid) (DEFLATE stream|JSON)"),
        (deflate(b"{}") + b"\0\1", "header is followed by non-zero padding"),
    ],
    ids=["not-deflate", "cut-stream", "padding"],
)
def test_header_encoding_damage(mrc, stored, message):
    doc, hlen, body = split(mrc)
    header = stored + b"\0" * (hlen - len(stored))
    bad = mrc.with_name("bad.mrc")
    bad.write_bytes(PREAMBLE.pack(MAGIC, VERSION, zlib.crc32(header), hlen) + header + body)
    damaged(bad, message)


def test_header_crc_mismatch(mrc):
    data = bytearray(mrc.read_bytes())
    data[PREAMBLE.size + 30] ^= 0x01
    mrc.write_bytes(bytes(data))
    damaged(mrc, "header checksum mismatch")


@pytest.mark.parametrize("header", [b"{not json", b"\xff\xfe{}", b"[" * 100_000 + b"]" * 100_000], ids=["syntax", "utf8", "deep"])
def test_invalid_json(mrc, header):
    doc, hlen, body = split(mrc)
    header = deflate(header)
    assert len(header) <= hlen
    header += b"\0" * (hlen - len(header))
    bad = mrc.with_name("bad.mrc")
    bad.write_bytes(PREAMBLE.pack(MAGIC, VERSION, zlib.crc32(header), hlen) + header + body)
    damaged(bad, "header is not valid JSON")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.clear(), "header does not name the mlcompress.mrc format"),
        (lambda d: d.update(format="zip"), "header does not name the mlcompress.mrc format"),
        (lambda d: d.pop("file_size"), "header lacks a valid file_size"),
        (lambda d: d.update(file_size=-1), "header lacks a valid file_size"),
        (lambda d: d.update(metadata=[]), "header metadata is not an object"),
        (lambda d: d.pop("tensors"), "header lacks a tensor list"),
        (lambda d: d["tensors"].append({"shape": [1]}), "tensor record without a name"),
    ],
    ids=["empty", "format", "no-size", "neg-size", "metadata", "no-tensors", "no-name"],
)
def test_malformed_header_structure(mrc, edit, message):
    damaged(rebuild(mrc, edit), message)


def test_header_that_is_not_an_object(mrc):
    damaged(rebuild(mrc, lambda d: None, header=deflate(b"[1, 2]")), "header is not a JSON object")


def test_unknown_codec(mrc):
    damaged(rebuild(mrc, lambda d: record(d, "b").update(codec="nosuch")), "unknown codec 'nosuch'")


def test_unknown_codec_error_lists_the_known_ones(mrc):
    with pytest.raises(MrcFormatError) as info:
        open_mrc(rebuild(mrc, lambda d: record(d, "b").update(codec="nosuch")))
    assert "lossless" in info.value.one_line() and "raw" in info.value.one_line()


@pytest.mark.parametrize("dtype", ["float8", "complex64", 7, None], ids=str)
def test_unknown_dtype(mrc, dtype):
    damaged(rebuild(mrc, lambda d: record(d, "b").update(dtype=dtype)), "tensor 'b' has unknown dtype")


def test_unhashable_dtype(mrc):
    damaged(rebuild(mrc, lambda d: record(d, "b").update(dtype=["float32"])), "tensor 'b' has unknown dtype")


@pytest.mark.parametrize("shape", [[-1], [2.5], "20", [True], [1] * 33], ids=["neg", "float", "str", "bool", "too-many"])
def test_invalid_shape(mrc, shape):
    damaged(rebuild(mrc, lambda d: record(d, "b").update(shape=shape)), "tensor 'b' has an invalid shape")


@pytest.mark.parametrize("key", ["offset", "length", "crc32"])
@pytest.mark.parametrize("value", [-64, "0", None, 1.5])
def test_invalid_record_integers(mrc, key, value):
    damaged(rebuild(mrc, lambda d: record(d, "b").update({key: value})), f"tensor 'b' has an invalid {key}")


def test_missing_codec_params(mrc):
    damaged(rebuild(mrc, lambda d: record(d, "b").update(params=[1])), "tensor 'b' has no codec params object")


def test_offset_out_of_range(mrc):
    size = mrc.stat().st_size
    damaged(rebuild(mrc, lambda d: record(d, "h").update(offset=(size // ALIGN + 1) * ALIGN)),
            "payload of 'h' runs past the end of the file")


def test_overlapping_payloads(mrc):
    def overlap(doc):
        record(doc, "b")["offset"] = record(doc, "w")["offset"]

    damaged(rebuild(mrc, overlap), "overlaps the header or another payload")


def test_payload_overlapping_the_header(mrc):
    damaged(rebuild(mrc, lambda d: record(d, "w").update(offset=0)), "payload of 'w' overlaps the header")


def test_misaligned_offset(mrc):
    damaged(rebuild(mrc, lambda d: record(d, "b").update(offset=record(d, "b")["offset"] + 4)),
            f"payload of 'b' is not {ALIGN}-byte aligned")


def test_payload_crc_mismatch(mrc):
    f = open_mrc(mrc)
    w = f.record("w")
    data = bytearray(mrc.read_bytes())
    data[w.offset + w.length // 2] ^= 0x10
    mrc.write_bytes(bytes(data))
    g = open_mrc(mrc)  # structure is intact; the damage shows when the payload is read
    assert_same({"b": g.tensor("b")}, {"b": reference_tensors()["b"]})
    damaged(mrc, "checksum mismatch in payload of 'w'")


def test_wrong_crc_in_header(mrc):
    damaged(rebuild(mrc, lambda d: record(d, "idx").update(crc32=record(d, "idx")["crc32"] ^ 1)),
            "checksum mismatch in payload of 'idx'")


def test_raw_payload_size_disagrees_with_shape(mrc):
    damaged(rebuild(mrc, lambda d: record(d, "b").update(shape=[21])),
            r"raw tensor 'b': payload has 80 bytes, shape needs 84")


def test_raw_dtype_change_changes_the_needed_size(mrc):
    damaged(rebuild(mrc, lambda d: record(d, "b").update(dtype="float64")),
            r"raw tensor 'b': payload has 80 bytes, shape needs 160")


def test_lossless_raw_plane_disagrees_with_shape(mrc):
    def edit(doc):
        rec = record(doc, "w")
        assert any(p["mode"] == "raw" for p in rec["params"]["planes"])
        rec["shape"] = [20, 31]

    damaged(rebuild(mrc, edit), "lossless tensor 'w': raw plane size does not match its shape")


def test_lossless_plane_lengths_disagree_with_payload(mrc):
    def edit(doc):
        rec = record(doc, "w")
        ans = next(p for p in rec["params"]["planes"] if p["mode"] == "ans")
        ans["length"] -= 1

    damaged(rebuild(mrc, edit), "lossless tensor 'w': plane lengths do not add up to the payload")


def test_lossless_ans_plane_count_disagrees_with_shape(tmp_path):
    # ANS planes have no fixed size, so a shape edit passes the record check; the count stored in
    # each entropy stream catches it when the payload is decoded.
    t = torch.tensor([0, 1, 2, 1, 0, 0, 0, 0] * 125, dtype=torch.int8)
    p = write_mrc(tmp_path / "ans.mrc", {"q": t}, {"q": ("lossless", {})}, {"slack": SLACK})
    assert [pl["mode"] for pl in open_mrc(p).record("q").params["planes"]] == ["ans"]
    damaged(rebuild(p, lambda d: record(d, "q").update(shape=[999])), "entropy stream holds 1000 values, expected 999")


def test_raw_codec_with_params(mrc):
    damaged(rebuild(mrc, lambda d: record(d, "b").update(params={"x": 1})), "raw tensor 'b' must have empty params")


def _padding_positions(path: Path) -> list[int]:
    """Byte positions of every alignment padding byte in a valid file."""
    f = open_mrc(path)
    pos, gaps = PREAMBLE.size + f.header_length, []
    for r in sorted((r for r in f.records if r.alias_of is None), key=lambda r: r.offset):
        gaps.extend(range(pos, r.offset))
        pos = r.offset + r.length
    return gaps


def test_nonzero_padding(mrc):
    gaps = _padding_positions(mrc)
    assert gaps, "reference layout should contain alignment padding"
    for pos in (gaps[0], gaps[-1]):
        data = bytearray(mrc.read_bytes())
        data[pos] = 0xFF
        bad = mrc.with_name("bad.mrc")
        bad.write_bytes(bytes(data))
        damaged(bad, "padding bytes are not zero")


def test_gap_larger_than_alignment(mrc):
    size = mrc.stat().st_size

    def edit(doc):
        last = record(doc, "h")
        last["offset"] += ALIGN
        doc["file_size"] = size + ALIGN

    def body_edit(body):
        # Move h's payload one alignment unit later, zero-filled in between.
        h = open_mrc(mrc).record("h")
        start = h.offset - PREAMBLE.size - split(mrc)[1]
        return body[:start] + bytes(ALIGN) + body[start:]

    damaged(rebuild(mrc, edit, body_edit=body_edit), "gap between payloads is larger than the alignment")


def test_trailing_bytes_beyond_file_size(mrc):
    with open(mrc, "ab") as f:
        f.write(b"\0" * 3)
    damaged(mrc, r"file is longer than its header says")


def test_trailing_bytes_after_last_payload(mrc):
    size = mrc.stat().st_size
    damaged(rebuild(mrc, lambda d: d.update(file_size=size + 8), body_edit=lambda b: b + bytes(8)),
            "file has trailing bytes after the last payload")


def test_duplicate_names(mrc):
    damaged(rebuild(mrc, lambda d: record(d, "idx").update(name="b")), "tensor 'b' appears twice")


def test_duplicate_alias_name(mrc):
    damaged(rebuild(mrc, lambda d: record(d, "tied").update(name="w")), "tensor 'w' appears twice")


def test_dangling_alias(mrc):
    damaged(rebuild(mrc, lambda d: record(d, "tied").update(alias_of="nowhere")),
            "alias 'tied' points at 'nowhere', which is not a stored tensor")


def test_alias_of_an_alias(mrc):
    def edit(doc):
        doc["tensors"].append({"name": "tied2", "alias_of": "tied"})

    damaged(rebuild(mrc, edit), "alias 'tied2' points at 'tied', which is not a stored tensor")


def test_malformed_alias_record(mrc):
    damaged(rebuild(mrc, lambda d: record(d, "tied").update(shape=[1])), "alias record 'tied' is malformed")


def test_tensor_above_size_limit(mrc, monkeypatch):
    monkeypatch.setenv("MLCOMPRESS_MAX_TENSOR_BYTES", "1000")
    # "w" is 20x30 float32 = 2400 bytes; the others are smaller.
    damaged(mrc, "tensor 'w' would decode to 2400 bytes, above the limit of 1000")


def test_huge_declared_shape_is_refused_before_allocation(mrc):
    damaged(rebuild(mrc, lambda d: record(d, "w").update(shape=[1 << 30, 1 << 30])),
            "tensor 'w' would decode to")


def test_damage_messages_name_the_file(mrc):
    with pytest.raises(MrcFormatError) as info:
        open_mrc(rebuild(mrc, lambda d: record(d, "b").update(offset=record(d, "b")["offset"] + 4)))
    assert "damaged.mrc" in str(info.value)


# --------------------------------------------------------------------------------------------
# Random damage (property test)


@pytest.fixture(scope="module")
def reference_bytes(tmp_path_factory) -> tuple[Path, bytes]:
    directory = tmp_path_factory.mktemp("fuzz")
    data = write_reference(directory / "ref.mrc").read_bytes()
    return directory / "case.mrc", data


def _check_damage(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        out = open_mrc(path).tensors()
    except MrcFormatError as exc:
        assert "\n" not in exc.one_line()
        return
    # No error: the data must at least be right -- but the format promises detection, so fail.
    assert_same(out, reference_tensors())
    pytest.fail("damage went undetected (the decoded tensors happen to be right)")


_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_SETTINGS
@given(data=st.data())
def test_random_byte_flips_are_always_detected(reference_bytes, data):
    path, ref = reference_bytes
    flips = data.draw(
        st.lists(st.tuples(st.integers(0, len(ref) - 1), st.integers(1, 255)), min_size=1, max_size=3,
                 unique_by=lambda f: f[0])
    )
    buf = bytearray(ref)
    for pos, mask in flips:
        buf[pos] ^= mask
    _check_damage(path, bytes(buf))


@_SETTINGS
@given(data=st.data())
def test_random_truncations_are_always_detected(reference_bytes, data):
    path, ref = reference_bytes
    cut = data.draw(st.integers(0, len(ref) - 1))
    _check_damage(path, ref[:cut])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_flips_in_payloads_are_detected(reference_bytes, data):
    # Payload bytes are a minority of a small file: aim flips at them explicitly.
    path, ref = reference_bytes
    doc = decode_header(ref[PREAMBLE.size : PREAMBLE.size + PREAMBLE.unpack_from(ref)[3]])
    spans = [(r["offset"], r["length"]) for r in doc["tensors"] if "offset" in r and r["length"]]
    offset, length = data.draw(st.sampled_from(spans))
    pos = data.draw(st.integers(offset, offset + length - 1))
    buf = bytearray(ref)
    buf[pos] ^= data.draw(st.integers(1, 255))
    _check_damage(path, bytes(buf))


# --------------------------------------------------------------------------------------------
# Writing: refusal and interruption


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".part") or p.name.startswith("."))


def test_existing_destination_is_refused_without_force(mrc):
    before = mrc.read_bytes()
    with pytest.raises(InputError, match="already exists"):
        write_reference(mrc)
    assert mrc.read_bytes() == before


def test_force_replaces_the_destination(mrc):
    write_mrc(mrc, {"a": torch.ones(3)}, lambda n, t: ("raw", {}), {}, force=True)
    assert list(open_mrc(mrc).tensors()) == ["a"]


class _FailingFile:
    """Wraps a real file and fails after ``budget`` bytes have been written."""

    def __init__(self, f, budget: int, exc: BaseException) -> None:
        self._f, self._budget, self._exc = f, budget, exc

    def write(self, data) -> int:
        n = len(data)
        if n > self._budget:
            self._f.write(bytes(data)[: self._budget])
            self._f.flush()
            raise self._exc
        self._budget -= n
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._f.close()
        return False


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=["oserror", "ctrl-c"])
@pytest.mark.parametrize("force", [False, True])
def test_interrupted_file_write_leaves_destination_untouched(tmp_path, monkeypatch, exc, force):
    dest = tmp_path / "model.mrc"
    existing = b"previous contents"
    if force:
        dest.write_bytes(existing)
    seen_partial: list[int] = []

    def failing_open(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if "w" not in mode:
            return f
        seen_partial.append(1)
        return _FailingFile(f, 1000, exc)

    monkeypatch.setattr(container.writer, "open", failing_open, raising=False)
    with pytest.raises(type(exc)):
        write_reference(dest) if not force else write_mrc(
            dest, reference_tensors(), lambda n, t: (PLAN[n], {}), {"slack": SLACK}, force=True)
    assert seen_partial, "the write was not intercepted"
    if force:
        assert dest.read_bytes() == existing
    else:
        assert not dest.exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("exc", [RuntimeError("codec exploded"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_interrupted_encode_leaves_destination_untouched(tmp_path, monkeypatch, exc):
    dest = tmp_path / "model.mrc"
    dest.write_bytes(b"previous contents")
    lossless = codecs.get("lossless")
    real_encode = lossless.encode
    calls = []

    def encode(tensor, options):
        calls.append(1)
        if len(calls) == 2:  # fail on the second tensor, after the first was encoded
            raise exc
        return real_encode(tensor, options)

    monkeypatch.setattr(lossless, "encode", encode)
    with pytest.raises(type(exc)):
        write_mrc(dest, reference_tensors(), lambda n, t: (PLAN[n], {}), {}, force=True)
    assert len(calls) == 2
    assert dest.read_bytes() == b"previous contents"
    assert _leftovers(tmp_path) == []


def test_interrupt_while_encoding(tmp_path):
    dest = tmp_path / "model.mrc"

    def plan(name, tensor):
        if name == "emb":
            raise KeyboardInterrupt
        return PLAN[name], {}

    with pytest.raises(KeyboardInterrupt):
        write_mrc(dest, reference_tensors(), plan, {})
    assert list(tmp_path.iterdir()) == []


def test_unsupported_dtype_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="cannot be stored"):
        write_mrc(tmp_path / "c.mrc", {"z": torch.zeros(2, dtype=torch.complex64)}, lambda n, t: ("raw", {}), {})
    assert list(tmp_path.iterdir()) == []


def test_file_size_is_recorded_in_the_header(mrc):
    doc, _, _ = split(mrc)
    assert doc["file_size"] == os.path.getsize(mrc)
    assert doc["format"] == "mlcompress.mrc" and doc["version"] == VERSION


def test_raw_bool_bytes_must_be_0_or_1(tmp_path):
    p = write_mrc(tmp_path / "b.mrc", {"m": torch.tensor([True, False, True])}, {"m": ("raw", {})}, {"slack": SLACK})
    payload = bytes([1, 2, 1])

    def edit(doc):  # a valid CRC for the bad payload, so the decoder itself must catch it
        record(doc, "m")["crc32"] = zlib.crc32(payload)

    def body_edit(body):
        start = open_mrc(p).record("m").offset - PREAMBLE.size - split(p)[1]
        return body[:start] + payload + body[start + 3 :]

    damaged(rebuild(p, edit, body_edit=body_edit), "raw tensor 'm': bool bytes must be 0 or 1")


@pytest.mark.parametrize("run_bytes", [1, 1 << 30])
def test_tensors_read_in_runs_equal_tensors_read_one_by_one(tmp_path: Path, monkeypatch, run_bytes: int) -> None:
    """``tensors()`` reads consecutive payloads together and batches ``lossless3``'s: with runs
    of one tensor or of the whole file, mixed codecs give the same tensors as ``tensor()``, ties
    stay one object, and damage in a run is reported for its own tensor."""
    from mlcompress.codecs import lossless3
    from mlcompress.container import reader

    monkeypatch.setattr(reader, "RUN_BYTES", run_bytes)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 7, generator=g)
    tensors = {"a": torch.randn(1000, generator=g), "b": torch.arange(13), "w": w, "tied": w,
               "h": torch.randn(333, generator=g).bfloat16(), "c": torch.randn(50, generator=g).half()}
    fast = "lossless3" if lossless3.NATIVE else "lossless2"
    plan = {"a": (fast, {}), "b": ("raw", {}), "w": ("lossless2", {}), "tied": ("lossless2", {}),
            "h": (fast, {}), "c": ("raw", {})}
    path = tmp_path / "m.mrc"
    write_mrc(path, tensors, plan, {})
    f = open_mrc(path)
    for threads in (1, 3):
        together = f.tensors(threads=threads)
        assert together["tied"] is together["w"]
        assert_same_tensors(together, tensors)
        assert_same_tensors({n: f.tensor(n, threads=threads) for n in tensors}, tensors)
    rec = f.record("h")
    data = bytearray(path.read_bytes())
    data[rec.offset + rec.length // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(MrcFormatError, match="checksum mismatch in payload of 'h'"):
        open_mrc(path).tensors(threads=2)


@pytest.mark.parametrize("scratch_bytes", [0, 1 << 20])
@pytest.mark.parametrize("consecutive", [True, False])
@pytest.mark.parametrize("run_bytes", [1, 1 << 30])
def test_tensors_decoded_earlier_survive_later_reads(tmp_path: Path, monkeypatch, scratch_bytes: int,
                                                     consecutive: bool, run_bytes: int) -> None:
    """Reads reuse one scratch buffer per thread (and, within ``tensors()``, one buffer for the
    large reads of its runs): every decoded tensor owns its memory, so the tensors returned by
    earlier calls and runs are unchanged by later reads, whichever codec made them, and the
    payloads of a run that is not one contiguous read each get buffers of their own."""
    from mlcompress.codecs import lossless3
    from mlcompress.container import reader

    monkeypatch.setattr(reader, "SCRATCH_BYTES", scratch_bytes)
    monkeypatch.setattr(reader, "RUN_BYTES", run_bytes)
    monkeypatch.setattr(reader, "_SCRATCH", threading.local())
    if not consecutive:  # no gap counts as "within the alignment padding": one read per payload
        monkeypatch.setattr(reader, "ALIGN", 0)
    g = torch.Generator().manual_seed(1)
    fast = "lossless3" if lossless3.NATIVE else "lossless2"
    tensors = {"a": torch.randn(2000, generator=g), "b": torch.randn(40, 30, generator=g).bfloat16(),
               "c": torch.randn(500, generator=g), "d": torch.arange(77)}
    plan = {"a": (fast, {}), "b": ("lossless2", {}), "c": (fast, {}), "d": ("raw", {})}
    path = tmp_path / "m.mrc"
    write_mrc(path, tensors, plan, {})
    f = open_mrc(path)
    kept = [{n: f.tensor(n, threads=1) for n in tensors}, f.tensors(threads=1), f.tensors(threads=2)]
    for n in tensors:  # more reads through the same buffer
        f.tensor(n, threads=1)
    for got in kept:
        assert_same_tensors(got, tensors)
