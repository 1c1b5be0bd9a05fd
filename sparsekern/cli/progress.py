"""Progress on stderr: one status line per task, rewritten in place on a terminal; elsewhere
(a pipe, a CI log) the lines are printed every ``interval`` seconds instead, so a log gets a
heartbeat without a line per step."""
import shutil
import sys
import time


def format_duration(seconds):
    """"1:05" (m:ss) or "1:02:05" (h:mm:ss)."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Status lines keyed by label: ``update(label, text)``; ``write(text)`` prints a result line on
    stdout above them; ``close()`` leaves the last state on screen (or in the log)."""

    def __init__(self, labels, *, stream=None, interval=10.0, min_redraw=0.1):
        self.labels = list(labels)
        self.stream = sys.stderr if stream is None else stream
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval, self.min_redraw = interval, min_redraw
        self.text = dict.fromkeys(self.labels, "waiting")
        self._drawn = 0  # lines of the block currently on the terminal
        self._last_draw = 0.0
        self._last_print = dict.fromkeys(self.labels, float("-inf"))
        self._printed = dict(self.text)  # the text last printed per label (log mode)
        self._width = max(map(len, self.labels), default=0)

    def _line(self, label):
        line = f"{label:<{self._width}}  {self.text[label]}"
        columns = shutil.get_terminal_size((100, 24)).columns
        return line[:max(columns - 1, 20)]  # a wrapped line would break the cursor arithmetic

    def _erase(self):
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")  # to the block's first line, clear below
            self._drawn = 0

    def _draw(self):
        self._erase()
        for label in self.labels:
            self.stream.write("\x1b[2K" + self._line(label) + "\n")
        self._drawn = len(self.labels)
        self.stream.flush()
        self._last_draw = time.monotonic()

    def update(self, label, text, *, force=False):
        self.text[label] = text
        now = time.monotonic()
        if self.tty:
            if force or now - self._last_draw >= self.min_redraw:
                self._draw()
        elif force or now - self._last_print[label] >= self.interval:
            self._print(label)
            self._last_print[label] = now

    def _print(self, label):
        self._printed[label] = self.text[label]
        self.stream.write(self._line(label) + "\n")
        self.stream.flush()

    def write(self, text, stream=None):
        """A line of results (stdout by default), kept above the status lines."""
        stream = sys.stdout if stream is None else stream
        if self.tty:
            self._erase()
            self.stream.flush()
        print(text, file=stream, flush=True)
        if self.tty:
            self._draw()

    def close(self):
        """Show the final state (terminal: in place; log: the lines not printed yet)."""
        if self.tty:
            self._draw()
            self._drawn = 0  # keep it: later output goes below
        else:
            for label in self.labels:
                if self.text[label] != self._printed[label]:
                    self._print(label)
