"""The progress display: in place on a terminal, periodic lines in a log."""
import io

from sparsekern.cli.progress import Progress, format_duration


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_mode_prints_at_most_every_interval_and_the_final_state():
    stream = io.StringIO()
    progress = Progress(["dense", "sparse"], stream=stream, interval=3600)
    for step in range(1, 101):
        progress.update("dense", f"step {step}")
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines == ["dense   step 1", "dense   step 100"]  # the first, then the last at close
    assert "\x1b" not in stream.getvalue()


def test_terminal_mode_rewrites_the_block_in_place():
    stream = _Terminal()
    progress = Progress(["a", "b"], stream=stream, min_redraw=0)
    progress.update("a", "one")
    progress.update("b", "two")
    progress.close()
    text = stream.getvalue()
    assert "\x1b[2F" in text  # moved up over the two lines to redraw them
    assert text.rstrip().endswith("b  two")


def test_format_duration():
    assert format_duration(5) == "0:05"
    assert format_duration(65) == "1:05"
    assert format_duration(3725) == "1:02:05"
