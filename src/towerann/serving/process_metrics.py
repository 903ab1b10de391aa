"""Process metrics in /metrics: resident memory, CPU seconds, open file descriptors (Linux /proc).

One process (`towerann serve`, or a server in a thread): prometheus_client's ProcessCollector, the
standard families without labels (process_resident_memory_bytes, process_cpu_seconds_total,
process_open_fds, process_max_fds, process_virtual_memory_bytes, process_start_time_seconds).

Several workers (`towerann serve --workers N`): ProcessCollector reads only the process that answers the
scrape, and prometheus_client's multiprocess mode has no process metrics. So whichever worker answers
reads /proc for every process of the server - the parent and each worker - and labels each sample
with `worker` ("parent", "0", "1", ...): the same family names, one series per process.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

from prometheus_client.metrics_core import Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector


class ServerProcesses(Collector):
    """The process families of several processes, a `worker` label on each sample. `processes()` says
    which: {label: pid} (a pid of 0 or less is left out: a worker that has not started yet)."""

    def __init__(self, processes: Callable[[], dict[str, int]]) -> None:
        self.processes = processes
        self._collectors: dict[int, ProcessCollector] = {}

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        live = {label: pid for label, pid in self.processes().items() if pid > 0}
        for pid in set(self._collectors) - set(live.values()):
            del self._collectors[pid]
        for label, pid in live.items():
            collector = self._collectors.get(pid)
            if collector is None:
                collector = self._collectors[pid] = ProcessCollector(pid=functools.partial(int, pid), registry=None)
            for family in collector.collect():  # nothing when the process is gone or /proc unreadable
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type)
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, "worker": label}, sample.value)
        return list(families.values())
