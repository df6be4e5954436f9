"""Progress lines on stderr for steps that take longer than a second."""
from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Iterator, TextIO


class Progress:
    """``with progress.step("importing model.onnx"):`` prints nothing for quick steps.

    A step still running after ``delay`` seconds announces itself; when it ends its duration is
    printed. Quiet (``enabled=False``) for tests and ``--json``.
    """

    def __init__(self, stream: TextIO | None = None, delay: float = 1.0, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.delay = delay
        self.enabled = enabled
        self._timer: threading.Timer | None = None
        self._announced = False
        self._lock = threading.Lock()

    def _announce(self, label: str) -> None:
        with self._lock:
            self._announced = True
            print(f"[tapeout] {label} ...", file=self.stream, flush=True)

    @contextlib.contextmanager
    def step(self, label: str) -> Iterator[None]:
        t0 = time.perf_counter()
        self._announced = False
        if self.enabled:
            self._timer = threading.Timer(self.delay, self._announce, args=(label,))
            self._timer.daemon = True
            self._timer.start()
        try:
            yield
        finally:
            self._cancel()
        dt = time.perf_counter() - t0
        with self._lock:
            if self.enabled and (self._announced or dt >= self.delay):
                print(f"[tapeout] {label}: done in {dt:.1f} s", file=self.stream, flush=True)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def abort(self) -> None:
        self._cancel()
