"""The ``lm`` task: a tiny GPT-2 built here (1 layer, width 32, a BPE vocabulary trained on a few
KB of the machine's licence texts), through the library and the CLI (in-process ``main``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from single_thread import one_thread  # noqa: F401  (autouse fixture)

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from mlcompress.checkpoint import load_checkpoint  # noqa: E402
from mlcompress.cli import main  # noqa: E402
from mlcompress.errors import CheckpointError, InputError  # noqa: E402
from mlcompress.posterior.file import load_posterior  # noqa: E402
from mlcompress.quant.calibrate import L2Config  # noqa: E402
from mlcompress.quant.quantize import quantize_checkpoint  # noqa: E402
from mlcompress.tasks import evaluate_model, get_task, load_task_model, train_task_model  # noqa: E402
from mlcompress.tasks.protocol import higher_is_better  # noqa: E402

LICENSES = Path("/usr/share/common-licenses")
WINDOW = 32


def _licence_text(chars: int) -> str:
    parts = []
    for path in sorted(LICENSES.glob("*")):
        if path.is_file():
            parts.append(path.read_text(encoding="utf-8", errors="ignore"))
        if sum(map(len, parts)) >= chars:
            break
    return "\n".join(parts)[:chars]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    """A GPT-2 directory as save_pretrained writes it: config, safetensors (tied head stored
    once), tokenizer.json and tokenizer_config.json."""
    if not LICENSES.is_dir():
        pytest.skip("no /usr/share/common-licenses to train a tokenizer on")
    root = tmp_path_factory.mktemp("tiny-gpt2")
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator([_licence_text(6000)], vocab_size=300, min_frequency=2, special_tokens=["<|endoftext|>"])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    fast.save_pretrained(root)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(fast), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                     tie_word_embeddings=True)
    transformers.GPT2LMHeadModel(config).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text(_licence_text(12000))
    return path


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_task_windows_split_and_metric(lm_dir, text_file):
    task = get_task(f"lm:window={WINDOW}", text_file, lm_dir)
    tok = transformers.AutoTokenizer.from_pretrained(str(lm_dir))
    ids = torch.tensor(tok(text_file.read_text())["input_ids"])
    count = (len(ids) - 1) // WINDOW
    assert task.input_shape == (WINDOW,) and task.metric_name == "perplexity" and not higher_is_better(task)
    assert len(task.test_inputs) == max(1, count // 10) and len(task.train_inputs) + len(task.test_inputs) == count
    # Consecutive windows, targets shifted by one; the test set is the end of the stream.
    assert torch.equal(task.train_inputs[1], ids[WINDOW : 2 * WINDOW])
    assert torch.equal(task.train_targets[1], ids[WINDOW + 1 : 2 * WINDOW + 1])
    assert torch.equal(task.test_targets[-1], ids[count * WINDOW - WINDOW + 1 : count * WINDOW + 1])
    # The same file gives the same split; calibration windows are training windows.
    again = get_task(f"lm:window={WINDOW}", text_file, lm_dir)
    assert torch.equal(again.test_inputs, task.test_inputs)
    calibration = task.calibration(4)
    assert torch.equal(calibration, task.calibration(4))
    assert all(any(torch.equal(row, w) for w in task.train_inputs) for row in calibration)
    # Default window: n_positions (64) under the cap of 256.
    assert get_task("lm", text_file, lm_dir).input_shape == (64,)


def test_perplexity_is_exp_of_the_mean_token_cross_entropy(lm_dir, text_file):
    task = get_task(f"lm:window={WINDOW}", text_file, lm_dir)
    model = load_task_model(task, load_checkpoint(lm_dir))
    result = evaluate_model(task, model, device="cpu")
    reference = transformers.GPT2LMHeadModel.from_pretrained(str(lm_dir)).eval()
    with torch.no_grad():
        logits = reference(task.test_inputs).logits
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), task.test_targets.reshape(-1))
    assert result.examples == len(task.test_inputs)
    assert result.loss == pytest.approx(float(ce), rel=1e-5)
    assert result.metric == pytest.approx(math.exp(float(ce)), rel=1e-5)


def test_tied_head_stays_tied_and_is_stored_once(lm_dir, text_file):
    task = get_task(f"lm:window={WINDOW}", text_file, lm_dir)
    state = load_checkpoint(lm_dir)
    assert "lm_head.weight" not in state  # save_pretrained stores the tied tensor once
    model = load_task_model(task, state)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert "lm_head.weight" not in model.state_dict()
    assert torch.equal(model.lm_head.weight, state["transformer.wte.weight"])
    both = dict(state, **{"lm_head.weight": state["transformer.wte.weight"].clone()})
    assert load_task_model(task, both).lm_head.weight is not None  # the same values under both names
    both["lm_head.weight"] = both["lm_head.weight"] + 1
    with pytest.raises(CheckpointError, match="tied"):
        load_task_model(task, both)


def test_training_lowers_the_loss(lm_dir, text_file):
    task = get_task(f"lm:window={WINDOW}", text_file, lm_dir)
    before = evaluate_model(task, load_task_model(task, load_checkpoint(lm_dir)), device="cpu").loss
    result = train_task_model(task, steps=30, lr=3e-3, batch_size=8, device="cpu")
    assert result.test.loss < before - 0.3
    assert result.test.metric == pytest.approx(math.exp(result.test.loss), rel=1e-6)


def test_jsonl_data_is_the_same_stream_as_the_joined_text(lm_dir, text_file, tmp_path):
    lines = text_file.read_text().split("\n")
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": line}) for line in lines) + "\n")
    from_jsonl = get_task(f"lm:window={WINDOW}", jsonl, lm_dir)
    from_text = get_task(f"lm:window={WINDOW}", text_file, lm_dir)
    assert torch.equal(from_jsonl.train_inputs, from_text.train_inputs)
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(InputError, match="no 'text' field") as info:
        get_task("lm", tmp_path / "bad.jsonl", lm_dir)
    assert "--field" not in info.value.one_line()


def test_l2_on_the_lm_task_keeps_the_head_tied_and_learns(lm_dir, text_file, tmp_path):
    """quantize --method l2 --task lm, below the CLI (the CLI's L² runs 800 steps: minutes here)."""
    task = f"lm:window={WINDOW}"
    kd: dict[str, list[float]] = {}

    def progress(update):
        if "kd" in update.info:
            kd.setdefault(update.phase, []).append(update.info["kd"])

    mrc = tmp_path / "l2.mrc"
    config = L2Config(target_ratio=8.0, rounds=1, transform_steps=10, weight_steps=40, remeasure_every=25,
                      batch_size=4, weight_lr=3e-3)
    summary = quantize_checkpoint(lm_dir, method="l2", task=task, data=text_file, calib_samples=8,
                                  l2_config=config, device="cpu", output=mrc, progress=progress).to_json()
    assert summary["metric"] == "perplexity" and summary["ratio"] > 7.5  # the header's few bytes count on 98 kB
    # The weight phase distils: its loss falls (first against last 10 steps).
    assert sum(kd["weights"][-10:]) < sum(kd["weights"][:10])
    decoded = load_checkpoint(mrc)
    assert "lm_head.weight" not in decoded  # the tied head is coded once
    lm = get_task(task, text_file, lm_dir)
    model = load_task_model(lm, decoded)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert evaluate_model(lm, model, device="cpu").metric == pytest.approx(summary["metric_after"], rel=1e-5)


def test_quantize_eval_and_fit_posterior_through_the_cli(lm_dir, text_file, tmp_path, capsys):
    task = f"lm:window={WINDOW}"
    mrc = tmp_path / "q4.mrc"
    code, out, err = _run(capsys, "quantize", lm_dir, "--bits", "4", "--task", task, "--data", text_file,
                          "--device", "cpu", "-o", mrc, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["metric"] == "perplexity" and 1 < summary["metric_before"] and 1 < summary["metric_after"]
    # An .mrc holds no architecture: eval takes it from lm:model=DIR.
    code, out, err = _run(capsys, "eval", mrc, "--task", f"{task},model={lm_dir}", "--data", text_file,
                          "--device", "cpu", "--json")
    assert code == 0, err
    assert json.loads(out)["perplexity"] == pytest.approx(summary["metric_after"], rel=1e-5)

    posterior = tmp_path / "q.safetensors"
    code, out, err = _run(capsys, "fit-posterior", "--task", task, "--init", lm_dir, "--data", text_file,
                          "--steps", "5", "--bits-per-weight", "4", "--device", "cpu", "-o", posterior, "--json")
    assert code == 0, err
    fitted = json.loads(out)
    assert fitted["steps"] == 5 and fitted["metric_name"] == "perplexity" and fitted["perplexity"] > 1
    loaded = load_posterior(posterior)
    assert "transformer.wte.weight" in loaded.tensors
    assert "lm_head.weight" not in loaded.tensors and "lm_head.weight" not in loaded.fixed
    code, out, err = _run(capsys, "eval", posterior, "--task", task, "--data", text_file, "--device", "cpu",
                          "--json")
    assert code == 1 and "needs a Hugging Face model directory" in err and "is a file" in err  # no architecture
    code, out, err = _run(capsys, "eval", posterior, "--task", f"{task},model={lm_dir}", "--data", text_file,
                          "--device", "cpu", "--json")
    assert code == 0, err
    assert json.loads(out)["perplexity"] == pytest.approx(fitted["perplexity"], rel=1e-4)


@pytest.mark.parametrize(
    "spec, model, message",
    [
        ("lm", "empty", "needs a Hugging Face model directory"),
        ("lm", None, "none was given"),
        ("lm:window=1", "model", "window must be an integer of at least 2"),
        ("lm:window=999", "model", "longer than the model's 64 positions"),
        ("lm:depth=3", "model", "has no option 'depth'"),
        ("lenet5:window=3", "model", "lenet5 has no option"),
    ],
)
def test_bad_specs_are_one_line_errors(lm_dir, text_file, tmp_path, spec, model, message):
    (tmp_path / "empty").mkdir()
    path = {"empty": tmp_path / "empty", "model": lm_dir, None: None}[model]
    with pytest.raises(InputError, match=message) as info:
        get_task(spec, text_file, path)
    assert "\n" not in info.value.one_line()


def test_cli_without_config_json_exits_1_with_one_line(tmp_path, text_file, capsys):
    (tmp_path / "weights").mkdir()
    torch.save({"w": torch.zeros(64, 64)}, tmp_path / "weights" / "pytorch_model.bin")
    out_path = tmp_path / "q.safetensors"
    code, out, err = _run(capsys, "fit-posterior", "--task", "lm", "--init", tmp_path / "weights", "--data",
                          text_file, "--steps", "5", "-o", out_path)
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "needs a Hugging Face model directory" in err and "config.json" in err
    assert not out_path.exists()
