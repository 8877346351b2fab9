"""Every test writes task caches into its own temporary folder, never into ~/.cache."""
import pytest


@pytest.fixture(autouse=True)
def _task_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DIAGSSM_CACHE", str(tmp_path_factory.mktemp("cache")))
