"""urlvr.progress: a long job's progress reads in a log file (plain lines on a clock), not only on a terminal."""

from __future__ import annotations

import io

from urlvr.progress import JobProgress, format_seconds


class FakeClock:
    """Seconds that a test advances by hand: the lines depend on time, the test must not wait for it."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_not_a_terminal_prints_a_start_line_a_line_per_interval_and_the_end():
    clock, log = FakeClock(), io.StringIO()
    with JobProgress("urlvr probe: sampling m", 64, unit="prompts", stream=log, every_seconds=30, clock=clock) as bar:
        for _ in range(8):  # 8 prompts every 10 s
            clock.now += 10
            bar.advance(8)
    assert log.getvalue().splitlines() == [
        "urlvr probe: sampling m: 64 prompts",
        "urlvr probe: sampling m: 24/64 prompts (38%), 30 s elapsed, ~50 s left",
        "urlvr probe: sampling m: 48/64 prompts (75%), 1 min 0 s elapsed, ~20 s left",
        "urlvr probe: sampling m: 64/64 prompts (100%), 1 min 20 s elapsed",
    ]


def test_a_job_faster_than_the_interval_still_ends_with_its_line():
    clock, log = FakeClock(), io.StringIO()
    bar = JobProgress("job", 3, stream=log, every_seconds=30, clock=clock)
    for _ in range(3):
        clock.now += 1
        bar.advance()
    bar.close()
    assert log.getvalue().splitlines() == ["job: 3 items", "job: 3/3 items (100%), 3 s elapsed"]


def test_a_stream_that_is_not_a_terminal_gets_lines_without_being_told():
    log = io.StringIO()  # isatty() is False: no bar, which would show nothing in a file
    bar = JobProgress("job", 2, stream=log)
    assert bar.bar is None
    bar.advance(2)
    bar.close()
    assert log.getvalue().splitlines()[-1].startswith("job: 2/2 items (100%)")


def test_format_seconds():
    assert [format_seconds(s) for s in (0.4, 42, 185, 7620)] == ["0 s", "42 s", "3 min 5 s", "2 h 07 min"]
