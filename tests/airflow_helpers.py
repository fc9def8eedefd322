"""Run test DAGs with ``dag.test()`` and read back what Airflow recorded (states, XCom, DB bytes)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def run_dag(dag_id: str, **conf: Any) -> Any:
    """Parse the test DAGs afresh (module-level env is read at parse time) and run one with ``conf``."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    assert not bag.import_errors, bag.import_errors
    return bag.get_dag(dag_id).test(run_conf=conf)


def task_states(dag_run: Any) -> dict[str, str]:
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter_by(dag_id=dag_run.dag_id, run_id=dag_run.run_id).all()
        return {ti.task_id: str(ti.state.value if hasattr(ti.state, "value") else ti.state) for ti in tis}


def try_numbers(dag_run: Any) -> dict[str, int]:
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter_by(dag_id=dag_run.dag_id, run_id=dag_run.run_id).all()
        return {ti.task_id: ti.try_number for ti in tis}


def xcoms(dag_run: Any) -> dict[tuple[str, str], Any]:
    """Return every XCom of the run as {(task_id, key): value}."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(XComModel).filter_by(dag_id=dag_run.dag_id, run_id=dag_run.run_id).all()
        return {(row.task_id, row.key): XComModel.deserialize_value(row) for row in rows}


def metadata_db_bytes() -> bytes:
    """Return the raw SQLite file: trigger kwargs, events, XCom and logs-in-DB all live in it."""
    conn = os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    return Path(conn.removeprefix("sqlite:///")).read_bytes()
