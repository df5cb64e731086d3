"""What every benchmark worker process shares: its peak memory, an RSS sampler, the result file.

Each implementation runs in a process of its own (run_benchmark.py starts one per implementation
and run), so the process's peak resident set size is the implementation's peak memory.
Linux only: ru_maxrss is in KiB there, and the sampler reads /proc/self/statm.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import threading
import time
from collections.abc import Callable
from pathlib import Path

_PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def peak_rss_kib() -> int:
    """Peak RSS of this process and of any child it waited for, KiB (ru_maxrss).

    Caveat: Linux carries the high-water mark of the process image replaced by exec into
    ru_maxrss, so a child's figure is never below its parent's peak RSS before it started the
    child. run_benchmark.py keeps itself small for that reason, and `hwm_rss_kib` cross-checks.
    """
    return max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    )


def hwm_rss_kib() -> int:
    """Peak RSS of this process image only (VmHWM: counted from its exec, nothing inherited), KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def current_rss_kib() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE_KIB


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def tree_rss_kib() -> int:
    """RSS of this process and every live descendant (Spark's JVM is a child of the Python driver), KiB."""
    total, pending = 0, [os.getpid()]
    while pending:
        pid = pending.pop()
        try:
            with open(f"/proc/{pid}/statm") as statm:
                total += int(statm.read().split()[1]) * _PAGE_KIB
        except OSError:
            continue  # it ended meanwhile
        pending += _children(pid)
    return total


class RssSampler:
    """Samples this process's RSS in a background thread, to attribute memory to steps.

    ru_maxrss only says how high the whole process went; the samples say during which step.
    DuckDB releases the GIL while it runs a query, so the thread keeps sampling then. A sample
    can miss a short spike: the process peak (ru_maxrss) stays the authoritative figure.
    """

    def __init__(self, interval_seconds: float = 0.02, whole_tree: bool = False):
        self.interval = interval_seconds
        self.read = tree_rss_kib if whole_tree else current_rss_kib
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), self.read()))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def peak_between(self, start: float, end: float) -> int | None:
        """Highest sampled RSS (KiB) in [start, end] (time.time() seconds), None without a sample."""
        inside = [rss for at, rss in self.samples if start <= at <= end]
        return max(inside) if inside else None

    def peak(self) -> int | None:
        return max((rss for _, rss in self.samples), default=None)


def worker_args(extra: Callable[[argparse.ArgumentParser], None] | None = None) -> tuple[argparse.Namespace, dict]:
    """Every worker's command line (--config --scratch --result, plus `extra`'s) and its configuration."""
    parser = argparse.ArgumentParser()
    if extra is not None:
        extra(parser)
    parser.add_argument("--config", required=True)
    parser.add_argument("--scratch", required=True)
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    return args, json.loads(Path(args.config).read_text())


def write_result(path: str | Path, result: dict) -> None:
    """The worker's answer to run_benchmark.py: one JSON file (stdout is left to the logs), with the
    process's peak memory added as measured at the end (`peak_rss_kib`, `vm_hwm_kib`; a worker whose
    engine runs in a child process reports the sampled peak of the whole tree as
    `sampled_tree_peak_kib`, and peak_rss_kib is then the higher of the two)."""
    peak = max(peak_rss_kib(), result.get("sampled_tree_peak_kib") or 0)
    result = {**result, "peak_rss_kib": peak, "vm_hwm_kib": hwm_rss_kib()}
    Path(path).write_text(json.dumps(result, indent=1) + "\n")
