"""The two example DAGs of ``dags/``, as they ship, for the system tests of reruns.

The files are loaded as they are; only two things differ, both set here because the stack's
dag-processor and its task runners parse this file, not the test process:

- the emulator renders in ~0.5 s, so the first poll comes that soon (``IMAGEN_EXAMPLES_EXPECTED_RENDER``,
  the variable the example DAGs read for this);
- both DAGs end on 2026-01-04: they are ``@daily`` and unpaused at creation, so without an end the
  scheduler would start a run of yesterday as soon as it parsed them (the nightly one over the whole
  sample catalog, in the middle of other tests). The tests make every run themselves: backfills of the
  sample's dates, clears and manual runs.
"""

from __future__ import annotations

import importlib.util
import os
from datetime import datetime, timezone
from pathlib import Path

from airflow.sdk import DAG

os.environ.setdefault("IMAGEN_EXAMPLES_EXPECTED_RENDER", "0.5")

EXAMPLES = Path(__file__).resolve().parents[3] / "dags"
END = datetime(2026, 1, 4, tzinfo=timezone.utc)


def _example_dag(name: str) -> DAG:
    spec = importlib.util.spec_from_file_location(f"imagen_system_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dag = module.dag
    assert isinstance(dag, DAG)
    dag.end_date = END
    # Task runners parse the file the DAG came from: this one, with the settings above.
    dag.fileloc = __file__
    return dag


backfill_dag = _example_dag("imagen_prompt_backfill")
nightly_dag = _example_dag("imagen_catalog_nightly")
