"""The front doors' timers: alarms go off once, disarmed or closed ones do not, moot ones are
dropped, and the thread runs only while some alarm is registered."""

from __future__ import annotations

import threading
import time

from distspec.server.watchdog import TICK_S, Watchdog


def running(dog: Watchdog) -> bool:
    return any(t.name == dog.name for t in threading.enumerate())


def until(condition, timeout_s: float = 10.0) -> None:
    """Wait for what must happen, however loaded the machine (no fixed sleeps)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(TICK_S)


def settle(dog: Watchdog, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while running(dog):
        assert time.monotonic() < deadline
        time.sleep(TICK_S)


def test_alarms():
    dog = Watchdog("test-watchdog")
    fired: list[str] = []
    dog.after(0.1, lambda: fired.append("once"))
    dog.after(0.1, lambda: fired.append("closed")).close()
    dog.after(0.1, lambda: fired.append("moot"), moot=lambda: True)
    rearmed = dog.alarm(lambda: fired.append("rearmed"))
    rearmed.arm(0.1)
    rearmed.disarm()
    rearmed.arm(0.2)
    disarmed = dog.alarm(lambda: fired.append("disarmed"))
    disarmed.arm(0.1)
    disarmed.disarm()
    # "rearmed" is due last: once it fired, every alarm that was to fire has
    until(lambda: "rearmed" in fired)
    assert sorted(fired) == ["once", "rearmed"]
    assert dog.pending() == 2  # the two kept alarms, disarmed now
    rearmed.close()
    disarmed.close()
    settle(dog)  # nothing registered: the thread is gone
    dog.after(0.05, lambda: fired.append("again"))
    until(lambda: fired[-1] == "again")
    settle(dog)


def test_a_failing_action_does_not_stop_the_others():
    dog = Watchdog("test-watchdog-2")
    fired: list[int] = []
    dog.after(0.05, lambda: 1 / 0)
    dog.after(0.05, lambda: fired.append(1))
    until(lambda: fired == [1])
    settle(dog)
