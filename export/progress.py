"""Phase-by-phase progress for long exports and engine builds: name, live elapsed time, result."""
import contextlib
import sys
import threading
import time
from typing import IO, Iterator


class Progress:
    """Prints "name ... done (12.3 s)" per phase; on a terminal the elapsed time ticks live."""

    def __init__(self, stream: IO[str] | None = None, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        ticker = self._start_ticker(name, start) if self.enabled else None
        ok = False
        try:
            yield
            ok = True
        finally:
            if ticker is not None:
                ticker.set()
            self.seconds[name] = time.perf_counter() - start
            # On a terminal the ticker rewrote the line; elsewhere the line is still open.
            prefix = f"\r{name} ... " if ticker is not None else ""
            self._print(f"{prefix}{'done' if ok else 'failed'} ({self.seconds[name]:.1f} s)\n")

    def note(self, text: str) -> None:
        self._print(text + "\n")

    def _print(self, text: str) -> None:
        if self.enabled:
            self.stream.write(text)
            self.stream.flush()

    def _start_ticker(self, name: str, start: float) -> threading.Event | None:
        self._print(f"{name} ... ")
        if not getattr(self.stream, "isatty", lambda: False)():
            return None
        stop = threading.Event()

        def tick() -> None:
            while not stop.wait(1.0):
                self._print(f"\r{name} ... {time.perf_counter() - start:.0f} s")

        threading.Thread(target=tick, daemon=True).start()
        return stop
