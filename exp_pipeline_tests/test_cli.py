"""The main command, run as a user runs it (a subprocess with its environment)."""

import os
import re
import subprocess
import sys
from contextlib import contextmanager

import pytest

from exp_pipeline_tests.conftest import write_tiny_workspace

pytestmark = pytest.mark.e2e


def run_cli(workspace, tmp_path, *args):
    home = tmp_path / "dagster_home"
    home.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "exp_pipeline.cli", "run", *args],
        env=cli_env(workspace, home), capture_output=True, text=True, timeout=600,
    )


def test_the_main_command_prints_results_and_check_failures(tmp_path):
    workspace = write_tiny_workspace(
        tmp_path, arms={"exp_a": {"control": 400, "treatment": 200}, "exp_b": {"control": 300, "treatment": 300}}
    )
    done = run_cli(workspace, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "experiment" in out and "CUPED lift" in out
    assert out.count("revenue") == 2  # one treatment row per experiment
    assert "WARN  exp_a: deduped_assignments.no_sample_ratio_mismatch" in out
    assert "SRM (p=" in out


def test_blocked_experiments_are_not_shown_as_fresh_and_the_command_fails(tmp_path):
    workspace = write_tiny_workspace(
        tmp_path,
        arms={"exp_a": {"control": 400, "treatment": 200}, "exp_b": {"control": 300, "treatment": 300}},
        srm_blocks=True,
    )
    done = run_cli(workspace, tmp_path)
    assert done.returncode == 1
    assert "No fresh results for exp_a" in done.stdout
    assert "ERROR exp_a: deduped_assignments.no_sample_ratio_mismatch" in done.stdout
    # Only exp_b's results are shown: its heading, then its one comparison.
    headings = [line for line in done.stdout.splitlines() if " · sample ratio " in line]
    assert [h.split(" · ")[0] for h in headings] == ["exp_b"]
    assert len([line for line in done.stdout.splitlines() if "revenue" in line]) == 1
    assert "FAILED: exp_a" in done.stderr


def test_an_unknown_experiment_is_refused_by_name(tmp_path):
    workspace = write_tiny_workspace(tmp_path)
    done = run_cli(workspace, tmp_path, "--experiment", "nope")
    assert done.returncode == 2
    assert done.stderr.strip() == "error: experiment 'nope' is not in the registry"


def test_an_invalid_registry_is_one_clear_message(tmp_path):
    workspace = write_tiny_workspace(tmp_path)
    workspace.registry_path.write_text(workspace.registry_path.read_text().replace("weight: 0.5}", "weight: 0.7}", 1))
    done = run_cli(workspace, tmp_path)
    assert done.returncode == 2
    assert "experiment 'exp_a', field 'variants': variant weights must sum to 1, they sum to 1.2" in done.stderr
    assert "Traceback" not in done.stderr


def cli_env(workspace, home):
    return {
        **os.environ,
        "EXP_PIPELINE_REGISTRY": str(workspace.registry_path),
        "EXP_PIPELINE_DUCKDB": str(workspace.database),
        "DAGSTER_HOME": str(home),
        "DAGSTER_DISABLE_TELEMETRY": "1",
    }


@contextmanager
def instance_at(home):
    from dagster import DagsterInstance
    from dagster._core.instance.ref import InstanceRef

    with DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
        yield instance


def slot_holders(instance) -> set[str]:
    return set(instance.event_log_storage.get_concurrency_run_ids())


def test_a_run_killed_holding_the_pool_slot_does_not_block_the_next_on_the_same_instance(tmp_path):
    import signal
    import time

    workspace = write_tiny_workspace(tmp_path)
    home = tmp_path / "dagster_home"
    assert run_cli(workspace, tmp_path).returncode == 0  # the instance exists, as after a first run
    env = cli_env(workspace, home)
    with instance_at(home) as instance:
        for _attempt in range(5):  # a loaded machine can finish a run between two looks
            process = subprocess.Popen(
                [sys.executable, "-m", "exp_pipeline.cli", "run"], env=env,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 120
            while not slot_holders(instance) and time.monotonic() < deadline and process.poll() is None:
                time.sleep(0.01)
            process.send_signal(signal.SIGKILL)
            process.wait()
            if slot_holders(instance):
                break
        # The dead run still holds the slot: this is the state that used to hang the next run.
        assert slot_holders(instance), "no run was killed while it held the warehouse pool slot"
        done = run_cli(workspace, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "belonged to a process that died: marked failed, its pool slot freed" in done.stdout
        assert "All checks passed." in done.stdout and done.stdout.count("revenue") == 2
        assert slot_holders(instance) == set()


def test_four_first_runs_at_once_on_a_fresh_instance_all_succeed(tmp_path):
    workspace = write_tiny_workspace(tmp_path)
    home = tmp_path / "fresh_home"  # does not exist yet: the state after clone and setup
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "exp_pipeline.cli", "run"], env=cli_env(workspace, home),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(4)
    ]
    outputs = [process.communicate(timeout=900) for process in processes]
    for process, (out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-3000:]
        assert "All checks passed." in out and out.count("revenue") == 2
    later = subprocess.run(
        [sys.executable, "-m", "exp_pipeline.cli", "run"], env=cli_env(workspace, home),
        capture_output=True, text=True, timeout=600,
    )
    assert later.returncode == 0, later.stderr[-3000:]  # the instance was left usable


def test_an_experiment_named_twice_is_analysed_once(tmp_path):
    workspace = write_tiny_workspace(tmp_path)
    done = run_cli(workspace, tmp_path, "--experiment", "exp_a", "--experiment", "exp_a")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("analysing exp_a") == 1 and done.stdout.count("revenue") == 1


@pytest.mark.parametrize("kind", ["directory", "garbage"])
def test_a_warehouse_path_that_is_no_database_is_one_message(tmp_path, kind):
    workspace = write_tiny_workspace(tmp_path)
    workspace.database.parent.mkdir(parents=True, exist_ok=True)
    if kind == "directory":
        workspace.database.mkdir()
    else:
        workspace.database.write_bytes(b"this is not a duckdb file" * 100)
    done = run_cli(workspace, tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: the warehouse DuckDB {workspace.database} (schema exp) cannot be opened (")
    assert "Traceback" not in done.stderr and "All checks passed" not in done.stdout


def test_a_wrong_column_mapping_is_one_error_line_and_no_run_is_launched(tmp_path):
    workspace = write_tiny_workspace(tmp_path)
    registry = workspace.registry_path.read_text()
    workspace.registry_path.write_text(registry.replace("experiment_id: experiment_key", "experiment_id: nowhere"))
    done = run_cli(workspace, tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"error: {workspace.registry_path}: sources.assignments.columns.experiment_id: column 'nowhere' is not in "
        f"{tmp_path / 'logs' / 'assignments.parquet'}; its columns are: user_id, experiment_key, variation, exposed_at, device_type",
        "nothing was run; fix the registry (or the warehouse) and run again",
    ]
    assert done.stdout == "" and "All checks passed" not in done.stdout
    with instance_at(tmp_path / "dagster_home") as instance:
        assert instance.get_runs() == []


def test_two_registries_keep_their_runs_partitions_and_warehouses_apart_by_default(tmp_path):
    """No EXP_PIPELINE_DUCKDB or DAGSTER_HOME: each registry's main command uses the folder beside it."""
    env = {k: v for k, v in os.environ.items() if k not in ("EXP_PIPELINE_DUCKDB", "DAGSTER_HOME")}
    homes = {}
    for team, arms in (("growth", {"exp_a": {"control": 300, "treatment": 300}}),
                       ("checkout", {"exp_b": {"control": 300, "treatment": 300}})):
        workspace = write_tiny_workspace(tmp_path / team, arms=arms)
        done = subprocess.run(
            [sys.executable, "-m", "exp_pipeline.cli", "run", "--experiment", next(iter(arms))],
            env={**env, "EXP_PIPELINE_REGISTRY": str(workspace.registry_path), "DAGSTER_DISABLE_TELEMETRY": "1"},
            capture_output=True, text=True, timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"warehouse: DuckDB {tmp_path / team / 'warehouse' / 'warehouse.duckdb'} (schema exp)" in done.stdout
        homes[team] = tmp_path / team / ".dagster_home"
        assert workspace.rows("variant_metrics").experiment_id.unique().tolist() == [next(iter(arms))]
    for team, experiment_id in (("growth", "exp_a"), ("checkout", "exp_b")):
        with instance_at(homes[team]) as instance:
            assert instance.get_dynamic_partitions("experiment") == [experiment_id]
            assert len(instance.get_runs()) == 2  # refresh_registry and the analysis, of this registry only


def results_of(workspace):
    frame = workspace.rows("variant_metrics")
    return frame.sort_values(["experiment_id", "variant_id"])[["experiment_id", "variant_id", "n", "sum_y"]].reset_index(
        drop=True
    )


@pytest.mark.parametrize("log", ["assignments", "events"])
def test_a_header_only_export_after_a_good_run_keeps_the_results_and_fails_the_check(tmp_path, log):
    import pandas as pd

    workspace = write_tiny_workspace(tmp_path)
    assert run_cli(workspace, tmp_path).returncode == 0
    before = results_of(workspace)
    path = tmp_path / "logs" / f"{log}.parquet"
    pd.read_parquet(path).iloc[0:0].to_parquet(path)  # the header (schema) and no rows
    done = run_cli(workspace, tmp_path)
    assert done.returncode == 1
    asset = "raw_assignments" if log == "assignments" else "post_assignment_events"
    assert f"ERROR exp_a: {asset}.rows_read_not_dropped: " in done.stdout
    kept = "the experiment's stored 600 rows of raw_assignments" if log == "assignments" else (
        "the experiment's stored variant_metrics rows (analysed on 2400 event rows)")
    assert f"{kept} were kept" in done.stdout
    assert "exp_a: stopped by its blocking check (see Failed checks); earlier results stay" in done.stdout
    assert "All checks passed" not in done.stdout
    pd.testing.assert_frame_equal(results_of(workspace), before)
    active = workspace.rows("deduped_assignments")
    assert active.is_active.all()  # no assignment was closed


def test_a_large_drop_in_rows_read_between_runs_warns(tmp_path):
    import pandas as pd

    workspace = write_tiny_workspace(tmp_path)
    assert run_cli(workspace, tmp_path).returncode == 0
    path = tmp_path / "logs" / "events.parquet"
    events = pd.read_parquet(path)
    events.iloc[: len(events) // 4].to_parquet(path)  # three quarters of the files went missing
    done = run_cli(workspace, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        f"WARN  exp_a: post_assignment_events.rows_read_not_dropped: the event log: {len(events) // 4} rows, "
        f"75% fewer than the {len(events)} of the previous run (warn above 50%)"
    ) in done.stdout


def test_epoch_millisecond_exposures_and_float_ids_in_the_event_log_give_the_true_figures(tmp_path):
    """The export accidents of real logs: exposure times as epoch milliseconds, integer user ids
    in the exposure log and the same ids as floats in the event log, ids and variants in another
    case. The figures must equal those computed here from the logs directly."""
    import numpy as np
    import pandas as pd

    workspace = write_tiny_workspace(tmp_path)
    rng = np.random.default_rng(11)
    users = np.arange(100_000, 100_600)
    exposed = pd.Timestamp("2026-10-02T00:00:00Z") + pd.to_timedelta(rng.integers(0, 7 * 86_400, len(users)), unit="s")
    variants = np.where(rng.random(len(users)) < 0.5, "control", "treatment")
    exposures = pd.DataFrame({
        "user_id": users, "experiment_key": np.where(users % 2 == 0, "exp_a", "EXP_B"),
        "variation": [f"{v} " if i % 3 == 0 else v.upper() for i, v in enumerate(variants)],
        "exposed_at": exposed.astype("int64") // 1_000_000,  # epoch milliseconds
        "device_type": "ios",
    })
    buyer = rng.random(len(users)) < 0.6
    amount = rng.gamma(2.0, 10.0, len(users))
    events = pd.DataFrame({
        "user_id": users[buyer].astype(float),  # 100000.0: the same ids, written as floats
        "event_ts": (exposed + pd.Timedelta(hours=3))[buyer], "event_type": "purchase", "amount": amount[buyer],
    })
    exposures.to_parquet(tmp_path / "logs" / "assignments.parquet")
    events.to_parquet(tmp_path / "logs" / "events.parquet")

    done = run_cli(workspace, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    got = workspace.rows("variant_metrics").set_index(["experiment_id", "variant_id"])
    truth = pd.DataFrame({
        "experiment_id": np.where(users % 2 == 0, "exp_a", "exp_b"), "variant_id": variants,
        "revenue": np.where(buyer, amount, 0.0),
    })
    for (experiment_id, variant), group in truth.groupby(["experiment_id", "variant_id"]):
        row = got.loc[(experiment_id, variant)]
        assert row["n"] == len(group)
        assert row["sum_y"] == pytest.approx(group.revenue.sum(), rel=1e-12)
    assert "metric_events_match_subjects" not in done.stdout


def test_ids_that_do_not_line_up_and_an_event_name_never_logged_warn(tmp_path):
    import pandas as pd

    workspace = write_tiny_workspace(tmp_path)
    events = pd.read_parquet(tmp_path / "logs" / "events.parquet")
    events["user_id"] = "u-" + events["user_id"]  # another id scheme in the event log
    events.to_parquet(tmp_path / "logs" / "events.parquet")
    registry = workspace.registry_path.read_text()
    registry = registry.replace(
        "  revenue: {event_name: purchase, aggregation: sum, window_end_days: 14}",
        "  revenue: {event_name: purchase, aggregation: sum, window_end_days: 14}\n"
        "  refunds: {event_name: refund, aggregation: count}",
    ).replace("    metrics: [revenue]\n", "    metrics: [revenue, refunds]\n", 1)
    workspace.registry_path.write_text(registry)
    done = run_cli(workspace, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if "exp_a: post_assignment_events.metric_events_match_subjects" in x)
    assert line.startswith("  WARN")
    assert "no event named 'refund' (metrics ['refunds']) in the event log in the experiment's span" in line
    assert re.search(r"100.0% of \d+ metric events in the experiment's span fall in no analysable subject's window", line)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda text, path: path.unlink() or path.mkdir(), "is a directory, not a YAML file"),
        (lambda text, path: path.write_bytes(text.encode() + "# caf\u00e9\n".encode("latin-1")), "is not UTF-8 text"),
        (lambda text, path: path.write_text(text + "\nexperiments: []\n"), "key 'experiments' appears twice"),
        (lambda text, path: path.write_text(text.split("experiments:")[0] + "experiments: []\n"),
         "field 'experiments': List should have at least 1 item"),
        (lambda text, path: path.write_text(text.replace("window_end_days: 14", "window_end_days: .inf")),
         "metric 'revenue', field 'window_end_days': Input should be a finite number"),
        (lambda text, path: path.write_text(text.replace("properties: [device_type]", "properties: [source_file]")),
         "are names of columns the pipeline adds"),
    ],
    ids=["directory", "latin-1", "repeated key", "no experiments", "infinite window", "reserved property"],
)
def test_a_registry_problem_is_one_message_without_a_traceback(tmp_path, edit, message):
    workspace = write_tiny_workspace(tmp_path)
    edit(workspace.registry_path.read_text(), workspace.registry_path)
    done = run_cli(workspace, tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and message in done.stderr
    assert "Traceback" not in done.stderr


def test_rows_set_aside_are_counted_in_the_summary(tmp_path):
    import pandas as pd

    workspace = write_tiny_workspace(tmp_path)
    path = tmp_path / "logs" / "assignments.parquet"
    exposures = pd.read_parquet(path)
    extra = exposures.head(3).copy()
    extra["experiment_key"] = "exp_retired"  # an experiment the registry does not know
    purple = exposures.head(2).copy()
    purple["variation"] = "purple"  # a variant exp_a does not have
    pd.concat([exposures, extra, purple, exposures.head(1)]).to_parquet(path)  # and one exact duplicate
    done = run_cli(workspace, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Rows set aside (kept with their reason in rejected_rows / rejected_source_rows):" in done.stdout
    assert "  exp_a assignments: duplicate_row 1, unknown_variant 2" in done.stdout
    assert "  assignments log as a whole: unknown_experiment 3" in done.stdout
