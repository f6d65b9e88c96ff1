"""Progress as commands show it: per-phase rates and ETAs, log lines off a terminal, silence with
--json and --quiet, and never a byte of it on stdout.

The receivers are driven with fake updates on a fake clock (rates must ignore time spent before
a phase began); a few real commands run as subprocesses, whose stderr is a pipe, not a terminal.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlcompress.cli.progress_display import (
    INTERVAL_VARIABLE, PROGRESS_INTERVAL_S, Bars, LogLines, PhaseMeters, clock_time, progress_interval,
)
from mlcompress.errors import UsageError
from mlcompress.progress import Update

REPO = Path(__file__).resolve().parents[1]
#: A progress line: ``phase: done[/total] ...`` (phase names belong to the library and may change).
PROGRESS_LINE = re.compile(r"^[\w][\w .()-]*: \d[\d.]*(/\d[\d.]*)?\b")


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def feed(receiver, clock: FakeClock, steps: list[tuple[float, Update]]) -> None:
    for at, update in steps:
        clock.now = at
        receiver(update)


def blocks(done: float, total: float | None = 5000) -> Update:
    return Update("REC blocks", done, total, "blocks")


def test_rate_and_eta_count_from_the_phase_not_the_command():
    clock, lines = FakeClock(), []
    log = LogLines(lines.append, interval=0.0, clock=clock)
    # 100 s of loading first, then the blocks: 1000 in 10 s is 100 blocks/s, not 1000/110 s.
    feed(log, clock, [(0.0, Update("loading", 0, 2, "shards")), (100.0, Update("loading", 2, 2, "shards")),
                      (100.0, blocks(0)), (110.0, blocks(1000))])
    assert lines[-1] == "REC blocks: 1000/5000 blocks (20.0%), 100 blocks/s, ETA 0:40"
    assert lines[1] == "loading: 2/2 shards (100.0%), 0.02 shards/s, done in 1:40"  # on its own clock


def test_a_phase_is_not_charged_for_preparing_before_it_moves():
    # "REC blocks 0/N" announced, then 50 s of setup: the rate starts when blocks start moving.
    clock, lines = FakeClock(), []
    log = LogLines(lines.append, interval=0.0, clock=clock)
    feed(log, clock, [(0.0, blocks(0)), (50.0, blocks(0)), (60.0, blocks(600))])
    assert "60.0 blocks/s" in lines[-1] and "ETA 1:13" in lines[-1]


def test_log_lines_are_throttled_per_phase_with_a_line_at_completion():
    clock, lines = FakeClock(), []
    log = LogLines(lines.append, interval=10.0, clock=clock)
    feed(log, clock, [(float(t), blocks(100 * t, 2500)) for t in range(26)])  # one update per second
    assert [line.split(":")[1].split()[0] for line in lines] == ["1000/2500", "2000/2500", "2500/2500"]
    assert lines[-1] == "REC blocks: 2500/2500 blocks (100.0%), 100 blocks/s, done in 0:25"
    feed(log, clock, [(30.0, blocks(2500, 2500))])  # a repeated final update says nothing new
    assert len(lines) == 3


def test_a_phase_shorter_than_the_interval_prints_nothing():
    clock, lines = FakeClock(), []
    log = LogLines(lines.append, interval=10.0, clock=clock)
    feed(log, clock, [(0.0, Update("tensors", 0, 3, "tensors")), (1.0, Update("tensors", 3, 3, "tensors"))])
    assert lines == []


def test_unknown_figures_are_left_out_and_a_rerun_phase_starts_over():
    clock, lines = FakeClock(), []
    log = LogLines(lines.append, interval=0.0, clock=clock)
    feed(log, clock, [(0.0, Update("train", 0, None, "steps", {"loss": 2.5})),
                      (10.0, Update("train", 30, None, "steps", {"loss": 0.125}))])
    assert lines == ["train: 0 steps, loss 2.5", "train: 30 steps, 3.00 steps/s, loss 0.125"]
    # Round two of the same phase: its count goes back, its clock starts again.
    feed(log, clock, [(100.0, Update("train", 1, 10, "steps")), (101.0, Update("train", 5, 10, "steps"))])
    assert lines[-1] == "train: 5/10 steps (50.0%), 4.00 steps/s, ETA 0:01"


def test_meters_restart_when_the_count_goes_back():
    meters, first = PhaseMeters(), Update("weights", 8, 10)
    meter, fresh = meters.observe(first, 0.0)
    assert fresh and meters.observe(Update("weights", 9, 10), 1.0) == (meter, False)
    again, fresh = meters.observe(Update("weights", 1, 10), 2.0)
    assert fresh and again is not meter and again.started == 2.0


@pytest.mark.parametrize("seconds, shown", [(0, "0:00"), (59.4, "0:59"), (75, "1:15"), (3725, "1:02:05")])
def test_clock_time(seconds, shown):
    assert clock_time(seconds) == shown


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(INTERVAL_VARIABLE, raising=False)
    assert progress_interval() == PROGRESS_INTERVAL_S == 10.0
    monkeypatch.setenv(INTERVAL_VARIABLE, "0.5")
    assert progress_interval() == 0.5
    for bad in ("soon", "-1", "nan", "inf"):
        monkeypatch.setenv(INTERVAL_VARIABLE, bad)
        with pytest.raises(UsageError, match=INTERVAL_VARIABLE):
            progress_interval()


def test_bars_on_a_terminal_measure_each_phase_and_show_it_done():
    from rich.console import Console
    from rich.text import Text

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=160, color_system=None)
    clock = FakeClock()
    with Bars(console, detail=lambda u: Text(f"detail at {u.done:g}") if u.phase == "REC blocks" else None,
              clock=clock) as bars:
        feed(bars, clock, [(0.0, Update("loading", 0, 2, "shards")), (100.0, Update("loading", 2, 2, "shards")),
                           (100.0, blocks(0)), (110.0, blocks(1000))])
        tasks = {t.description: t for t in bars.board.tasks}
        assert tasks["REC blocks"].elapsed == pytest.approx(10.0)  # the phase's clock, not the command's
        assert tasks["loading"].finished and tasks["loading"].fields["eta"] == "done"
        assert tasks["REC blocks"].fields["figures"] == "100 blocks/s"
        assert tasks["REC blocks"].fields["eta"] == "ETA 0:40"
        bars.board.refresh()
        assert "detail at 1000" in screen.getvalue()
    text = screen.getvalue()
    final = text[text.rindex("REC blocks"):]  # the last frame stays on the screen
    assert "1000/5000 blocks" in final and "done" in final


# --- real commands, stderr a pipe --------------------------------------------------------------


def run(*args: str | Path, cwd: Path, interval: str = "0") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLCOMPRESS_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env[INTERVAL_VARIABLE] = interval
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, "-m", "mlcompress", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("progress")
    g = torch.Generator().manual_seed(0)
    torch.save({f"layer{i}.weight": torch.randn(64, 64, generator=g) * 0.05 for i in range(4)}, d / "m.pt")
    return d


def progress_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if PROGRESS_LINE.match(line)]


@pytest.mark.parametrize("method", [["--lossless"], ["--bits-per-block", "8"]])
def test_without_a_terminal_progress_lines_go_to_stderr_only(model, tmp_path, method):
    proc = run("encode", model / "m.pt", *method, "-o", tmp_path / "a.mrc", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = progress_lines(proc.stderr)
    assert lines, proc.stderr
    assert any("(100.0%)" in line for line in lines)  # every phase gets to the end
    assert all("\x1b" not in line for line in proc.stderr.splitlines())  # no terminal codes in a log
    assert proc.stdout.startswith("wrote ") and len(proc.stdout.splitlines()) == 1
    assert not progress_lines(proc.stdout)


def test_json_and_quiet_show_no_progress(model, tmp_path):
    proc = run("encode", model / "m.pt", "--bits-per-block", "8", "-o", tmp_path / "j.mrc", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1 and isinstance(json.loads(proc.stdout), dict)
    assert proc.stderr == ""

    proc = run("encode", model / "m.pt", "--lossless", "-o", tmp_path / "q.mrc", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""


def test_at_the_default_interval_a_short_run_prints_no_progress(model, tmp_path):
    proc = run("encode", model / "m.pt", "--lossless", "-o", tmp_path / "d.mrc", cwd=tmp_path, interval="")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # every phase took far less than 10 s


def test_a_bad_interval_is_a_usage_error(model, tmp_path):
    proc = run("encode", model / "m.pt", "--lossless", "-o", tmp_path / "b.mrc", cwd=tmp_path, interval="often")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and INTERVAL_VARIABLE in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and not (tmp_path / "b.mrc").exists()


def test_evaluate_reports_the_examples_it_has_scored(tmp_path):
    """``eval`` has a phase too: the examples done, rising to the test set's size."""
    import torch

    import mlcompress
    from mlcompress.tasks import get_task

    torch.manual_seed(0)
    path = tmp_path / "digits.pt"
    torch.save(get_task("mlp-digits").make_model().state_dict(), path)
    updates = []
    summary = mlcompress.evaluate("mlp-digits", path, device="cpu", progress=updates.append)
    done = [u.done for u in updates if u.phase == "eval"]
    assert done and done == sorted(done) and done[-1] == summary["examples"]
