"""The device queue: one job (or model switch) holds the device at a time; jobs take it in arrival order, and a
waiting job can say where it stands and about how long until it starts."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from engine.jobs.results import LiveStatus, QueuePlace


@dataclass
class Waiting:
    """A job waiting for the device: its thread, its task, when it came."""

    thread: int
    task: str
    since: float = field(default_factory=time.perf_counter)


class DeviceQueue:
    """`hold()` for a switch (re-entrant: a switch inside a held comparison), `turn(task)` for a job."""

    def __init__(self, typical_s: Callable[[str], float | None]):
        self._lock = threading.RLock()
        self._owner: int | None = None  # the thread holding the device, and how deep
        self._depth = 0
        self._turns = threading.Condition()
        self._waiting: list[Waiting] = []  # jobs in arrival order; only the first may take the device
        self._typical_s = typical_s  # a task's usual seconds (from the history), for estimates

    @contextmanager
    def hold(self) -> Iterator[None]:
        with self._lock:
            self._owner, self._depth = threading.get_ident(), self._depth + 1
            try:
                yield
            finally:
                self._depth -= 1
                if not self._depth:
                    self._owner = None

    @property
    def held_here(self) -> bool:
        """Does this thread hold the device (a comparison running its columns)?"""
        return self._owner == threading.get_ident()

    @contextmanager
    def turn(self, task: str) -> Iterator[None]:
        """Hold the device for one job, in arrival order (a bare lock wakes waiters in any order, so a place in
        the queue would mean nothing). A thread already holding it goes straight in."""
        if self.held_here:
            with self.hold():
                yield
            return
        me = Waiting(threading.get_ident(), task)
        with self._turns:
            self._waiting.append(me)
        try:
            with self._turns:
                self._turns.wait_for(lambda: self._waiting[0] is me)
            self._lock.acquire()  # released by hold() below, re-entered once
        finally:
            with self._turns:
                self._waiting.remove(me)
                self._turns.notify_all()
        try:
            with self.hold():
                yield
        finally:
            self._lock.release()

    def waiting(self) -> int:
        """Jobs waiting for the device (the running one not counted)."""
        with self._turns:
            return len(self._waiting)

    def place(self, thread: int, live: LiveStatus) -> QueuePlace | None:
        """Where the job of this thread stands while it waits (None: it is not waiting), and how long until it
        starts: the running job's time left plus the usual time of each task ahead."""
        with self._turns:
            waiting = list(self._waiting)
        index = next((i for i, w in enumerate(waiting) if w.thread == thread), None)
        if index is None:
            return None
        ahead = ([live.task] if live.running else []) + [w.task for w in waiting[:index]]
        wait = 0.0
        if live.running:
            left = live.eta_s if live.eta_s is not None else self._typical_s(live.task)
            wait = None if left is None else max(0.0, left)
        for w in waiting[:index]:
            typical = self._typical_s(w.task)
            wait = None if wait is None or typical is None else wait + typical
        return QueuePlace(index + 1, ahead, wait)
