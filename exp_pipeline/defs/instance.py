"""Care of the Dagster instance the main command runs in: safe when several first runs start at
once, and never blocked by a run whose process died (kill -9, a lost machine) holding the
`warehouse_writer` pool slot that every step needs.

Runs of the main command carry the pid and host of their process. Before it starts, a run looks
for runs of this host that are not finished although their process is gone: it marks them failed
and frees their pool slots (runs launched by `dagster dev` are the daemon's run monitoring's).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from exp_pipeline.defs.partitions import WRITER_POOL, experiment_partitions
from exp_pipeline.settings import INSTANCE_CONFIG_TEMPLATE, dagster_home

PID_TAG = "exp_pipeline/pid"
HOST_TAG = "exp_pipeline/host"
# With the pid, when the process started (clock ticks since boot, /proc/<pid>/stat): a pid reused by
# any later process has another start time.
STARTED_TAG = "exp_pipeline/process_started"
LOCK_FILE = ".exp_pipeline.lock"
UNFINISHED = [
    DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING,
]


def run_tags() -> dict[str, str]:
    """Tags of a run of this process: who to ask whether it is still alive."""
    pid = os.getpid()
    return {PID_TAG: str(pid), HOST_TAG: socket.gethostname(), STARTED_TAG: _process_start(pid) or ""}


@contextmanager
def instance_lock(home: Path) -> Iterator[None]:
    """One process at a time sets up the instance: Dagster creates and migrates its SQLite storage
    on first use, and two processes doing it at once can crash (or leave it half-migrated)."""
    home.mkdir(parents=True, exist_ok=True)
    with open(home / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the process dies, whatever the cause
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ready_home() -> Path:
    """The registry's Dagster home (settings.dagster_home), created with the project's configuration."""
    home = Path(dagster_home())
    with instance_lock(home):
        ensure_instance_config(home)
    return home


def ensure_instance_config(home: Path) -> None:
    """A DAGSTER_HOME without a dagster.yaml gets the project's (pool limit, no telemetry)."""
    config = home / "dagster.yaml"
    if not config.exists():
        shutil.copyfile(INSTANCE_CONFIG_TEMPLATE, config)


def _process_start(pid: int) -> str | None:
    """When the process started (field 22 of /proc/<pid>/stat); None if there is no such process
    (or no /proc), or it is a zombie (dead, not yet reaped by its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count from its closing one.
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else fields[19]


def _process_alive(pid: int, started: str) -> bool:
    """Whether the process that ran a run still runs: same pid and same start time."""
    if started and Path("/proc").is_dir():
        return _process_start(pid) == started
    try:  # no /proc (macOS): the pid alone
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def release_dead_runs(instance: DagsterInstance) -> list[str]:
    """Fail the unfinished runs of this host whose process is gone and free their pool slots;
    returns their run ids."""
    host = socket.gethostname()
    released = []
    for run in instance.get_runs(filters=RunsFilter(statuses=UNFINISHED, tags={HOST_TAG: host})):
        pid = run.tags.get(PID_TAG, "")
        if not pid.isdigit() or _process_alive(int(pid), run.tags.get(STARTED_TAG, "")):
            continue
        instance.report_run_failed(
            run, message=f"the process that ran it (pid {pid} on {host}) is gone; marked failed by a later run"
        )
        released.append(run.run_id)
    # Finished runs free their slots as they end; a run killed mid-step never does.
    holding = instance.event_log_storage.get_concurrency_run_ids()
    for run_id in holding:
        run = instance.get_run_by_id(run_id)
        if run is None or run.is_finished:
            instance.event_log_storage.free_concurrency_slots_for_run(run_id)
    return released


def prepare_instance(instance: DagsterInstance, experiment_ids: list[str]) -> list[str]:
    """Call under `instance_lock`: create every storage now (not concurrently in the runs),
    release dead runs, and add the experiments' partitions. Returns the released run ids."""
    instance.get_runs(limit=1)
    instance.all_instigator_state()
    if instance.event_log_storage.supports_global_concurrency_limits:
        instance.event_log_storage.initialize_concurrency_limit_to_default(WRITER_POOL)
    released = release_dead_runs(instance)
    add_partitions(instance, experiment_ids)
    return released


def add_partitions(instance: DagsterInstance, experiment_ids: list[str]) -> None:
    """Add the experiments' partitions that are missing. The lock keeps other main commands out,
    not the `register_new_experiments` sensor of a running `dagster dev`: if it adds a key between
    our read and our insert (a UNIQUE error), read again and add what is still missing."""
    for attempt in range(3):
        known = set(instance.get_dynamic_partitions(experiment_partitions.name))
        new = [e for e in experiment_ids if e not in known]
        if not new:
            return
        try:
            instance.add_dynamic_partitions(experiment_partitions.name, new)
            return
        except sqlalchemy.exc.IntegrityError:
            if attempt == 2:
                raise
