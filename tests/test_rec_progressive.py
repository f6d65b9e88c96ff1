"""Progressive REC coding with retraining, every weight coded, and the fit's new budget options."""

from __future__ import annotations

import json

import pytest
import torch
from single_thread import one_thread  # noqa: F401  (autouse fixture)

from mlcompress.cli import main
from mlcompress.container import open_mrc
from mlcompress.inspection import summarize
from mlcompress.options import Rec
from mlcompress.posterior.evaluation import evaluate_file
from mlcompress.posterior.fit import FitConfig, fit_posterior, save_fit
from mlcompress.rec.compress import encode_rec
from mlcompress.rec.progressive import coding_order
from mlcompress.tasks import get_task


@pytest.fixture(scope="module")
def digits():
    return get_task("mlp-digits")


@pytest.fixture(scope="module")
def posterior(digits, tmp_path_factory):
    """A Mean-KL posterior of the digits MLP at ~900 bytes, every parameter coded."""
    from mlcompress.tasks.training import train_task_model

    torch.manual_seed(0)
    init = train_task_model(digits, seed=0, device="cpu").model.state_dict()
    config = FitConfig(bits_per_block=12, steps=300, eval_every=0, checkpoint_every=0, target_size=900)
    result = fit_posterior(digits, init, config, device="cpu")
    return save_fit(result, digits, tmp_path_factory.mktemp("post") / "post.safetensors")


def _accuracy(digits, path) -> float:
    return evaluate_file(digits, path, device="cpu")["accuracy"]


def test_every_tensor_is_rec_coded_within_the_target_size(posterior, tmp_path):
    report = encode_rec(posterior, tmp_path / "a.mrc")
    doc = summarize(tmp_path / "a.mrc")
    assert [t["codec"] for t in doc["tensors"]] == ["rec"] * 4  # biases included: nothing lossless
    assert report.file_bytes <= 900 and report.file_bytes > 800
    assert doc["totals"]["overhead_bytes"] <= 200


def test_retraining_between_groups_beats_one_shot_at_the_same_size(digits, posterior, tmp_path):
    one_shot = encode_rec(posterior, tmp_path / "one.mrc")
    progressive = encode_rec(posterior, tmp_path / "prog.mrc",
                             options=Rec(task="mlp-digits", retrain_steps=60, device="cpu"))
    # the same blocks: the files differ only by the header's CRC digits and its alignment padding
    assert progressive["blocks"] == one_shot["blocks"] and abs(progressive.file_bytes - one_shot.file_bytes) <= 8
    assert sum(progressive["group_sizes"]) == progressive["blocks"] and progressive["group_sizes"][-1] == 1
    assert len(progressive["history"]) == progressive["groups"]
    a_one, a_prog = _accuracy(digits, tmp_path / "one.mrc"), _accuracy(digits, tmp_path / "prog.mrc")
    assert a_prog > a_one + 0.01, (a_prog, a_one)
    # the accuracy the encoder reported for its last group is the decoded file's
    assert abs(progressive["history"][-1]["accuracy"] - a_prog) < 1e-6
    assert not (tmp_path / "prog.mrc.progress").exists()


def test_without_retraining_progressive_coding_is_one_shot_coding(posterior, tmp_path):
    encode_rec(posterior, tmp_path / "one.mrc")
    encode_rec(posterior, tmp_path / "zero.mrc", options=Rec(task="mlp-digits", retrain_steps=0, group_size=37,
                                                             device="cpu"))
    assert (tmp_path / "one.mrc").read_bytes() == (tmp_path / "zero.mrc").read_bytes()


def test_a_resumed_run_gives_the_same_file(posterior, tmp_path):
    options = Rec(task="mlp-digits", retrain_steps=15, group_size=60, device="cpu")
    encode_rec(posterior, tmp_path / "whole.mrc", options=options)

    def interrupt(update):
        if update.phase == "REC progressive" and update.done >= 180:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        encode_rec(posterior, tmp_path / "resumed.mrc", options=options, progress=interrupt)
    assert not (tmp_path / "resumed.mrc").exists() and (tmp_path / "resumed.mrc.progress").exists()
    done = []
    encode_rec(posterior, tmp_path / "resumed.mrc", options=options, progress=lambda u: done.append(u.done)
               if u.phase == "REC progressive" else None)
    assert done[0] > 180  # continued after the groups already coded
    assert (tmp_path / "whole.mrc").read_bytes() == (tmp_path / "resumed.mrc").read_bytes()


def test_default_groups_halve_what_is_left():
    from mlcompress.rec.progressive import group_sizes

    assert group_sizes(1400, None) == [700, 350, 175, 87, 44, 22, 11, 5, 3, 1, 1, 1]
    assert group_sizes(10, 4) == [4, 4, 2] and group_sizes(1, None) == [1]


def test_coding_order_interleaves_tensors():
    order = coding_order([4, 2]).tolist()
    assert sorted(order) == list(range(6))
    assert order[:3] == [0, 4, 1]  # ranks 1/8, 1/4, 3/8: each group takes a share of both tensors


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("argv, code, message", [
    (["--hash", "nosuch.weight=4"], 1, "--hash names 'nosuch.weight'"),
    (["--hash", "fc1.weight=0.5"], 2, "at least 1"),
    (["--hash", "fc1.weight"], 2, "cannot read --hash item"),
    (["--target-size", "60"], 1, "too small"),
    (["--pretrain-steps", "5"], 2, "needs --hash"),
])
def test_fit_bad_budgets_are_one_line_errors_and_write_nothing(posterior, tmp_path, capsys, argv, code, message):
    out = tmp_path / "q.safetensors"
    init = tmp_path / "init.safetensors"
    from safetensors.torch import save_file

    from mlcompress.posterior.file import load_posterior

    post = load_posterior(posterior)
    save_file({n: t.mean.reshape(t.tensor_shape).contiguous() for n, t in post.tensors.items()}, str(init))
    got, _, err = _run(capsys, "fit-posterior", "--task", "mlp-digits", "--init", init, "-o", out, "--steps", "2",
                       "--bits-per-block", "12", *argv)
    assert got == code and message in err and err.count("\n") <= 2, err
    assert not out.exists()


def test_retrain_steps_without_task_is_a_usage_error(posterior, tmp_path, capsys):
    got, _, err = _run(capsys, "encode", posterior, "-o", tmp_path / "x.mrc", "--retrain-steps", "10")
    assert got == 2 and "--task" in err and not (tmp_path / "x.mrc").exists()


def test_hashing_and_pretraining_fit(digits, tmp_path):
    from mlcompress.tasks.training import train_task_model

    init = train_task_model(digits, seed=1, steps=200, device="cpu").model.state_dict()
    config = FitConfig(bits_per_block=10, steps=40, eval_every=0, checkpoint_every=0, hash={"fc1.weight": 4},
                       pretrain_steps=30, bits_per_weight=2.0)
    result = fit_posterior(digits, init, config, device="cpu")
    assert result.model.sizes[0] == 1024  # 4096 weights tied 4:1
    path = save_fit(result, digits, tmp_path / "h.safetensors")
    encode_rec(path, tmp_path / "h.mrc")
    f = open_mrc(tmp_path / "h.mrc")
    assert f.record("fc1.weight").params["free"] == 1024
    w = f.tensors()["fc1.weight"].reshape(-1)
    # tied weights are equal up to their sign
    from mlcompress.codecs.rec.hashing import Tying

    index, sign = Tying(4096, 1024, f.record("fc1.weight").params["layout_seed"]).index_and_sign()
    free = torch.zeros(1024).index_put_((index,), w * sign)
    assert torch.equal(free[index] * sign, w)
    assert json.dumps(summarize(tmp_path / "h.mrc"))  # inspect reads it


def test_progressive_coding_of_a_plain_checkpoint_is_refused_before_any_work(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"w": torch.randn(64, 64)}, str(tmp_path / "m.safetensors"))
    got, _, err = _run(capsys, "encode", tmp_path / "m.safetensors", "--task", "mlp-digits", "-o", tmp_path / "m.mrc")
    assert got == 2 and "needs a posterior file" in err and not (tmp_path / "m.mrc").exists()
