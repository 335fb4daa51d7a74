"""Time limits of the front doors (request timeouts, stalled clients, resume windows) on one
thread: alarms are armed and disarmed by plain assignments, so a stream may re-arm its own
for every response it sends. Coarse by design: an alarm goes off within TICK_S of its time."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

TICK_S = 0.05


class Alarm:
    """A callback that runs (on the watchdog's thread) once an armed alarm's time has come."""

    def __init__(
        self,
        watchdog: Watchdog,
        action: Callable[[], None],
        once: bool,
        moot: Callable[[], bool] | None = None,
    ):
        self._watchdog = watchdog
        self.action = action
        self.once = once  # removed after it went off
        self.moot = moot  # true: the alarm is dropped without going off
        self.at: float | None = None  # time.monotonic() it goes off; None: disarmed

    def arm(self, delay_s: float) -> None:
        self.at = time.monotonic() + delay_s
        self._watchdog._wake()

    def disarm(self) -> None:
        self.at = None

    def close(self) -> None:
        self.at = None
        self._watchdog._remove(self)


class Watchdog:
    """One daemon thread for every alarm; it runs only while some alarm is registered."""

    def __init__(self, name: str = "watchdog", tick_s: float = TICK_S):
        self.name, self.tick_s = name, tick_s
        self._alarms: set[Alarm] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def alarm(self, action: Callable[[], None]) -> Alarm:
        """A disarmed alarm, kept until close()."""
        alarm = Alarm(self, action, once=False)
        with self._lock:
            self._alarms.add(alarm)
        return alarm

    def after(
        self, delay_s: float, action: Callable[[], None], moot: Callable[[], bool] | None = None
    ) -> Alarm:
        """action once, in delay_s, unless the alarm is closed before or moot() turns true
        (checked every tick: what it waits for ended, so it need not be kept)."""
        alarm = Alarm(self, action, once=True, moot=moot)
        with self._lock:
            self._alarms.add(alarm)
        alarm.arm(delay_s)
        return alarm

    def pending(self) -> int:
        with self._lock:
            return len(self._alarms)

    def _remove(self, alarm: Alarm) -> None:
        with self._lock:
            self._alarms.discard(alarm)

    def _wake(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self.tick_s)
            now = time.monotonic()
            with self._lock:
                if not self._alarms:
                    self._thread = None  # the next arm() starts another
                    return
                self._alarms -= {a for a in self._alarms if a.moot is not None and a.moot()}
                due = [a for a in self._alarms if a.at is not None and a.at <= now]
                for a in due:
                    a.at = None
                    if a.once:
                        self._alarms.discard(a)
            for a in due:
                try:
                    a.action()
                except Exception:
                    log.exception("a watchdog action failed")
