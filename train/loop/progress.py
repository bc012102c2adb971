"""A small progress bar: position, ETA and whatever numbers the caller passes.

On a terminal it redraws one line; in a log file (not a TTY) it prints a line at most every
`min_interval` seconds, so CI logs stay readable. The caller names the stream (the commands pass
stderr); with `file=None` the bar draws nothing, which is what library callers get.
"""

import time


class Progress:
    def __init__(self, total, desc, file=None, start=0):
        # start: where a resumed job begins; the rate counts only what this process did
        self.total, self.desc, self.file, self.start = total, desc, file, start
        self.tty = file is not None and file.isatty()
        self.min_interval = 0.2 if self.tty else 30
        self.t0 = time.time()
        self.last = 0.0
        self.n = start

    def update(self, n, **stats):
        self.n = n
        if self.file is None:
            return
        now = time.time()
        if now - self.last < self.min_interval and n < self.total:
            return
        self.last = now
        rate = (n - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - n) / rate if rate > 0 else float("inf")
        parts = [f"{self.desc} {n}/{self.total}", f"{100 * n / max(self.total, 1):3.0f}%",
                 f"eta {_fmt_time(eta)}"]
        parts += [f"{k} {_fmt(v)}" for k, v in stats.items() if v is not None]
        line = " | ".join(parts)
        if self.tty:
            self.file.write("\r" + line[:200].ljust(120))
        else:
            self.file.write(line + "\n")
        self.file.flush()

    def close(self):
        if self.file is not None and self.tty:
            self.file.write("\n")
            self.file.flush()


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def _fmt_time(s):
    if s == float("inf"):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
