"""The preflight: every problem that would stop a run, found from file footers, header lines and
stored schemas, each said once with the registry field, the file and the fix."""

import duckdb
import ibis
import pandas as pd
import pytest

from exp_pipeline import preflight
from exp_pipeline.registry import load_registry
from exp_pipeline.warehouse.duckdb_engine import DuckDBWarehouseSession
from exp_pipeline_tests.conftest import write_tiny_workspace


@pytest.fixture()
def workspace(tmp_path):
    return write_tiny_workspace(tmp_path)


@pytest.fixture()
def session():
    return DuckDBWarehouseSession(duckdb.connect(), "exp")


def problems(workspace, session) -> list[str]:
    path = str(workspace.registry_path)
    return preflight.preflight(session, load_registry(path), path)


def edit_registry(workspace, old: str, new: str) -> None:
    text = workspace.registry_path.read_text()
    assert old in text
    workspace.registry_path.write_text(text.replace(old, new))


def test_a_clean_workspace_has_no_problem(workspace, session):
    assert problems(workspace, session) == []


def test_a_wrong_column_mapping_is_one_line_naming_the_field_the_file_and_the_columns(workspace, session):
    edit_registry(workspace, "variant_id: variation", "variant_id: arm")
    [problem] = problems(workspace, session)
    assert problem == (
        f"{workspace.registry_path}: sources.assignments.columns.variant_id: column 'arm' is not in "
        f"{workspace.root / 'logs' / 'assignments.parquet'}; its columns are: user_id, experiment_key, variation, "
        "exposed_at, device_type"
    )


def test_a_property_missing_from_the_log_names_the_properties_field(workspace, session):
    edit_registry(workspace, "properties: [device_type]", "properties: [device_type, plan]")
    [problem] = problems(workspace, session)
    assert problem.startswith(f"{workspace.registry_path}: sources.assignments.properties: column 'plan' is not in ")


def test_a_secondary_id_missing_from_the_log_names_its_mapping(workspace, session):
    edit_registry(workspace, "properties: [device_type]", "properties: [device_type]\n    secondary_ids: {user_id: login_id}")
    [problem] = problems(workspace, session)
    assert problem.startswith(
        f"{workspace.registry_path}: sources.assignments.secondary_ids.user_id: column 'login_id' is not in "
    )


def test_an_unmapped_canonical_column_missing_from_the_log_says_which_name_is_expected(workspace, session):
    edit_registry(workspace, "event_at: event_ts, ", "")
    [problem] = problems(workspace, session)
    assert "sources.events.columns (no mapping for 'event_at', so a column named 'event_at' is expected)" in problem


def test_a_summed_metric_needs_a_value_column(workspace, session):
    edit_registry(workspace, ", value: amount", "")
    [problem] = problems(workspace, session)
    assert "column 'value' is not in" in problem and "sources.events.columns" in problem


def test_a_path_matching_nothing_and_an_unreadable_file_are_named(workspace, session):
    (workspace.root / "logs" / "assignments.parquet").unlink()
    (workspace.root / "logs" / "events.parquet").write_bytes(b"garbage")
    found = problems(workspace, session)
    assert len(found) == 2
    assert found[0].startswith(f"{workspace.registry_path}: sources.assignments.path: no non-empty file matches 'logs/assignments.parquet'")
    assert found[1].startswith(f"{workspace.registry_path}: sources.events.path: {workspace.root / 'logs' / 'events.parquet'} is not a readable parquet file (")


def test_a_csv_source_is_checked_from_its_header_line(workspace, session):
    logs = workspace.root / "logs"
    pd.read_parquet(logs / "assignments.parquet").rename(columns={"variation": "arm"}).to_csv(logs / "assignments.csv", index=False)
    edit_registry(workspace, "path: logs/assignments.parquet", "path: logs/assignments.csv")
    [problem] = problems(workspace, session)
    assert "sources.assignments.columns.variant_id: column 'variation' is not in" in problem and "arm" in problem


def test_a_warehouse_table_source_is_checked_from_its_schema(workspace, session):
    exposures = pd.read_parquet(workspace.root / "logs" / "assignments.parquet").drop(columns=["device_type"])
    session.raw.register("exposures_frame", exposures)
    session.raw.execute("CREATE TABLE main.exposures AS SELECT * FROM exposures_frame")
    edit_registry(workspace, "path: logs/assignments.parquet", "table: main.exposures")
    [problem] = problems(workspace, session)
    assert "sources.assignments.properties: column 'device_type' is not in table main.exposures" in problem


def test_a_stored_column_whose_type_would_change_is_named_with_the_fix(workspace, session):
    rows = pd.DataFrame({"experiment_id": ["exp_a"], "subject_id": ["u"], "device_type": [3]})
    session.replace_partition("raw_assignments", "exp_a", ibis.memtable(rows))
    [problem] = problems(workspace, session)
    assert problem.startswith(
        "table exp.raw_assignments cannot take this run's rows: column 'device_type' is stored as int64 but this "
        "run writes string."
    )
    assert "ALTER TABLE exp.raw_assignments ALTER COLUMN device_type TYPE TEXT" in problem


def test_names_are_matched_exactly_as_the_run_matches_them(workspace, session):
    edit_registry(workspace, "variant_id: variation", "variant_id: Variation")
    [problem] = problems(workspace, session)
    assert "sources.assignments.columns.variant_id: column 'Variation' is not in" in problem


def test_a_directory_matched_by_the_glob_is_named(workspace, session):
    (workspace.root / "logs" / "old.parquet").mkdir()
    edit_registry(workspace, "path: logs/assignments.parquet", "path: logs/*.parquet")
    found = problems(workspace, session)
    assert any(f"{workspace.root / 'logs' / 'old.parquet'} is not a readable parquet file" in p for p in found), found


def test_a_stored_view_over_files_that_are_gone_does_not_stop_the_run(workspace, session, tmp_path):
    gone = tmp_path / "gone.parquet"
    pd.DataFrame({"x": [1]}).to_parquet(gone)
    session.raw.execute(f"CREATE VIEW exp.post_assignment_events AS SELECT * FROM read_parquet('{gone}')")
    gone.unlink()
    assert problems(workspace, session) == []
