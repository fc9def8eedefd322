"""Fixtures for the example DAGs' tests: copies of the sample data, a moderating emulator, DAG runs.

The DAGs read their data from params, so every test points them at its own ``tmp_path`` copies and its
own output root: tests never write next to the bundled data and never see each other's index.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "dags" / "data"


def load_sample_data_module() -> ModuleType:
    """Import ``dags/data/make_sample_data.py`` (not a package: it lives beside the DAGs)."""
    spec = importlib.util.spec_from_file_location("make_sample_data", DATA / "make_sample_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SAMPLE = load_sample_data_module()


@dataclass
class Sample:
    """Paths of one test's copies of the sample data and of its output roots."""

    catalog: Path
    dataset: Path
    catalog_out: Path
    backfill_out: Path


@pytest.fixture
def sample(tmp_path: Path) -> Sample:
    catalog = tmp_path / "data" / "catalog.parquet"
    catalog.parent.mkdir(parents=True)
    shutil.copy(DATA / "catalog" / "catalog.parquet", catalog)
    dataset = tmp_path / "data" / "prompt_dataset"
    shutil.copytree(DATA / "prompt_dataset", dataset)
    return Sample(catalog, dataset, tmp_path / "out" / "catalog", tmp_path / "out" / "backfill")


@pytest.fixture
def examples_env(
    emulator: Any, imagen_connection: str, airflow_db: None, monkeypatch: pytest.MonkeyPatch
) -> Any:
    """The emulator moderating the sample's "replica" product, and polls tuned to its fast renders."""
    emulator.configure(moderated_words=SAMPLE.MODERATED_WORDS)
    monkeypatch.setenv("IMAGEN_EXAMPLES_EXPECTED_RENDER", "0.25")
    return emulator


def dag_test(dag_id: str, *, logical_date: datetime | None = None, **conf: Any) -> Any:
    """Parse the dags folder afresh (module-level env is read at parse time) and run one DAG once."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    assert not bag.import_errors, bag.import_errors
    dag = bag.get_dag(dag_id)
    if logical_date is None:
        return dag.test(run_conf=conf)
    return dag.test(logical_date=logical_date, run_conf=conf)
