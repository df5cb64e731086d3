"""Where things live by default: beside the registry file, so two registries never mix."""

from exp_pipeline import settings


def test_two_registries_get_their_own_warehouse_and_instance(monkeypatch, tmp_path):
    monkeypatch.delenv("EXP_PIPELINE_DUCKDB", raising=False)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    places = {}
    for team in ("growth", "checkout"):
        (tmp_path / team).mkdir()
        monkeypatch.setenv("EXP_PIPELINE_REGISTRY", str(tmp_path / team / "registry.yaml"))
        places[team] = (settings.duckdb_path(), settings.dagster_home(), str(settings.spark_location()))
    assert places["growth"] == (
        str(tmp_path / "growth" / "warehouse" / "warehouse.duckdb"),
        str(tmp_path / "growth" / ".dagster_home"),
        str(tmp_path / "growth" / "warehouse" / "spark" / "exp.db"),
    )
    assert all(a != b for a, b in zip(places["growth"], places["checkout"], strict=True))


def test_the_sample_registry_keeps_its_warehouse_under_data(monkeypatch):
    monkeypatch.delenv("EXP_PIPELINE_REGISTRY", raising=False)
    monkeypatch.delenv("EXP_PIPELINE_DUCKDB", raising=False)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    data = settings.PROJECT_ROOT / "data"
    assert settings.duckdb_path() == str(data / "warehouse" / "warehouse.duckdb")
    assert settings.dagster_home() == str(data / ".dagster_home")


def test_the_environment_overrides_both(monkeypatch, tmp_path):
    monkeypatch.setenv("EXP_PIPELINE_DUCKDB", str(tmp_path / "w.duckdb"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    assert (settings.duckdb_path(), settings.dagster_home()) == (str(tmp_path / "w.duckdb"), str(tmp_path / "home"))
