# SPDX-License-Identifier: MIT
"""Each worker samples its host in a background thread and reports to the store.

Every ``interval`` seconds a :class:`LoadSampler` reads CPU percent (psutil's non-blocking form:
the average since the previous reading), memory percent, the share of busy pool slots and any
custom signals; records the sample in the store (where it lives a few intervals, so a dead
worker drops out); reads back every live worker's sample; and reports the factor its policy
calls for. The store applies the hysteresis, so all workers move one shared factor. Nothing
here is on the admission path: an admission reads the factor in force inside its own script.

A failing signal or an unreachable store is logged and skipped; the thread never dies of it.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Mapping

import psutil

from throttle.adaptive.policy import LoadPolicy, Sample
from throttle.errors import ThrottleError
from throttle.store.base import BaseStore, LoadFactor

__all__ = ["LoadSampler"]

logger = logging.getLogger("throttle.adaptive")

#: A sample lives this many intervals; the computed factor this many without any report.
SAMPLE_LIFE = 3
FACTOR_LIFE = 5


def _cpu() -> float:
    return float(psutil.cpu_percent(interval=None))


def _memory() -> float:
    return float(psutil.virtual_memory().percent)


class LoadSampler:
    """Samples one worker's host and reports its load (see the module docstring).

    ``cpu``, ``memory``, ``busy`` and ``signals`` are the readings (callables; the defaults read
    psutil, and ``busy`` defaults to none). :meth:`tick` runs one round and can be called
    directly (tests do, with injected readings); :meth:`start` runs it every ``interval``
    seconds in a daemon thread until :meth:`stop`.
    """

    def __init__(
        self,
        store: Callable[[], BaseStore],
        worker: str,
        policy: LoadPolicy,
        *,
        interval: float = 1.0,
        cpu: Callable[[], float] = _cpu,
        memory: Callable[[], float] = _memory,
        busy: Callable[[], float] | None = None,
        signals: Mapping[str, Callable[[], float]] | None = None,
    ) -> None:
        self.store = store
        self.worker = worker
        self.policy = policy
        self.interval = interval
        self._cpu = cpu
        self._memory = memory
        self._busy = busy
        self._signals = dict(signals or {})
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: The latest sample taken here, the live samples of the cluster and the factor the
        #: store answered with (for ``celery inspect throttle_status``).
        self.last: Sample | None = None
        self.cluster: list[Sample] = []
        self.factor: LoadFactor | None = None

    def sample(self) -> Sample:
        """This host's readings now."""
        signals = {}
        for name, read in self._signals.items():
            value = _reading(name, read)
            if value is not None:
                signals[name] = min(max(value, 0.0), 1.0)
        return Sample(
            self.worker,
            _reading("cpu", self._cpu) or 0.0,
            _reading("memory", self._memory) or 0.0,
            (_reading("busy", self._busy) or 0.0) if self._busy is not None else 0.0,
            signals,
        )

    def tick(self, *, now_us: int | None = None) -> LoadFactor | None:
        """One round: sample, record, read the cluster's samples, report the target. Returns
        the factor the store answered with, or None when it could not be reached."""
        sample = self.last = self.sample()
        policy = self.policy
        try:
            store = self.store()
            texts = store.record_sample(
                self.worker,
                sample.to_json(),
                max_age=SAMPLE_LIFE * self.interval,
                now_us=now_us,
            )
            live = [s for s in map(Sample.from_json, texts) if s is not None]
            self.cluster = live
            self.factor = store.report_load(
                policy.target(live),
                floor=policy.floor,
                step=policy.step,
                relax=policy.relax,
                ttl=FACTOR_LIFE * self.interval,
                now_us=now_us,
            )
        except ThrottleError as exc:
            logger.debug("throttle load report failed: %s", exc)
            return None
        return self.factor

    def start(self) -> None:
        _cpu_prime(self._cpu)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="throttle-load", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception:  # never let the sampler die: the factor would freeze
                logger.exception("throttle load sampler round failed")


def _reading(name: str, read: Callable[[], float] | None) -> float | None:
    if read is None:
        return None
    try:
        value = float(read())
    except Exception as exc:  # a user's signal: log it, leave it out of this round
        logger.debug("throttle load signal %s failed: %r", name, exc)
        return None
    if not math.isfinite(value):
        logger.debug("throttle load signal %s gave %r; left out", name, value)
        return None
    return value


def _cpu_prime(read: Callable[[], float]) -> None:
    """psutil's non-blocking CPU percent measures since the previous call: make one now, so
    the first round measures its own interval."""
    if read is _cpu:
        psutil.cpu_percent(interval=None)
