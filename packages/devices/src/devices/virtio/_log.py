"""Rate-limited logging of guest misbehaviour.

A hostile guest can submit millions of bad requests; logging each would let it fill the host's
disk and burn CPU. Each :class:`RateLimitedLog` logs the first event in full, then at most one line
per ``interval`` seconds with the count of events suppressed since.
"""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """One per device: ``warn(msg, *args)`` logs at most once per ``interval`` seconds."""

    def __init__(self, logger: logging.Logger, label: str, interval: float = 10.0) -> None:
        self._logger = logger
        self._label = label
        self._interval = interval
        self._lock = threading.Lock()
        self._last = float("-inf")
        self._suppressed = 0
        self.count = 0

    def warn(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            self.count += 1
            if now - self._last < self._interval:
                self._suppressed += 1
                return
            suppressed, self._suppressed = self._suppressed, 0
            self._last = now
        suffix = f" ({suppressed} similar events suppressed)" if suppressed else ""
        self._logger.warning("%s: " + msg + "%s", self._label, *args, suffix)
