"""Logs that survive (issue #18): the stack's repeated warnings said once, log lines never glued
onto a progress bar, each rank's log in the run directory (appended to by a resumed run)."""

import io
import logging

import pytest

from cctl_rec import logging_utils


@pytest.fixture
def cli_logging(monkeypatch):
    """``start(rank)``: the CLI's logging on a non-terminal stderr (a file, a pipe, torchx's log),
    returned; called in the test (pytest swaps sys.stderr between fixtures and the test). The root
    logger's handlers and level as they were afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level

    def start(rank=0):
        buf = io.StringIO()
        monkeypatch.setattr("sys.stderr", buf)
        monkeypatch.setenv("RANK", str(rank))
        logging_utils.setup_logging()
        return buf

    yield start
    logging_utils.detach_run_log(upload=False)
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def test_a_warning_the_stack_repeats_is_said_once_ours_every_time(cli_logging):
    stderr = cli_logging()
    tr = logging.getLogger("torchrec.distributed.utils")
    ours = logging.getLogger("cctl_rec.train.loop")
    for _ in range(8):  # TorchRec says this once per data_parallel table
        tr.warning("Sharding Type is data_parallel, caching params will be ignored")
    tr.warning("another text")
    for _ in range(3):
        ours.warning("checkpoint slow")
    tr.error("an error")
    tr.error("an error")
    lines = stderr.getvalue().splitlines()
    assert [ln.split(": ", 1)[1] for ln in lines] == [
        "Sharding Type is data_parallel, caching params will be ignored", "another text",
        "checkpoint slow", "checkpoint slow", "checkpoint slow", "an error", "an error"]
    assert lines[0].startswith("[rank0] ") and " WARNING torchrec.distributed.utils: " in lines[0]


def test_log_lines_are_never_glued_onto_a_progress_bar(cli_logging):
    stderr = cli_logging()
    log = logging.getLogger("cctl_rec.train.loop")
    bar = logging_utils.progress(total=5, desc="train", unit="step", mininterval=0, miniters=1)
    for i in range(5):
        bar.update(1)
        log.info("step=%d", i + 1)
    bar.close()
    lines = stderr.getvalue().splitlines()
    assert "\r" not in stderr.getvalue()
    logs = [ln for ln in lines if ln.startswith("[rank0] ")]
    bars = [ln for ln in lines if ln.startswith("train: ")]
    assert [ln.rsplit(": ", 1)[1] for ln in logs] == [f"step={i}" for i in range(1, 6)]
    assert len(logs) + len(bars) == len(lines) and not any("[rank0]" in ln for ln in bars)
    assert bars[-1].startswith("train: 100%|") and "5/5" in bars[-1]


def test_the_run_log_takes_info_on_every_rank_and_appends(tmp_path, cli_logging):
    stderr = cli_logging(rank=1)  # rank 1: WARNING on stderr
    log = logging.getLogger("cctl_rec.train.loop")
    run = str(tmp_path / "run")
    log.info("before the run directory")  # kept for the run log until it is attached
    assert logging_utils.attach_run_log(run) == f"{run}/logs/rank1.log"
    log.info("first attempt")
    logging.getLogger("torchrec.distributed.utils").info("torchrec chatter")  # below WARNING: kept out
    logging_utils.detach_run_log()
    log.info("not in the run log")
    logging_utils.attach_run_log(run)  # a restarted attempt appends
    log.warning("second attempt")
    logging_utils.attach_run_log(run)  # attaching again replaces the handler: no line twice
    log.info("third")
    logging_utils.detach_run_log()
    text = (tmp_path / "run" / "logs" / "rank1.log").read_text()
    assert [ln.split(" ", 1)[0] + " " + ln.rsplit(": ", 1)[1] for ln in text.splitlines()] == [
        "[rank1] before the run directory", "[rank1] first attempt", "[rank1] second attempt", "[rank1] third"]
    assert [ln.rsplit(": ", 1)[1] for ln in stderr.getvalue().splitlines()] == ["second attempt"]
