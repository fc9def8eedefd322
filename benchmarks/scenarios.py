"""The benchmark suite: every scenario in one list, so one command runs them side by side in one session.

Why a list of plain records: ours and the baselines are only comparable when run on the same machine,
against the same emulator settings, in the same session. Adding a scenario (ours:
``benchmarks/dags/imagen_batch.py``) is one line here; the harness only needs a DAG id and a conf.
Settings (see :class:`Scenario`): ``name``, ``dag_id``, ``n``, ``max_in_flight``, ``parallelism``,
``latency_mean``/``latency_jitter`` (emulator), ``timeout_s``, ``expect`` (the DAG-run state that counts
as the expected outcome), extra ``conf``, ``airflow_config`` (``AIRFLOW__…`` variables), ``emulator_args``
(extra emulator CLI flags), ``note``.
"""

from __future__ import annotations

from benchmarks.harness import Scenario

SUITE: list[Scenario] = [
    Scenario("stock_http_400", dag_id="stock_http", n=400, timeout_s=1800,
             note="HttpOperator + HttpSensor + download, mapped per prompt"),
    Scenario("hand_loop_400", dag_id="hand_loop", n=400, timeout_s=600,
             note="one @task: submit all, poll all every 2 s, download"),
    Scenario("stock_http_1500", dag_id="stock_http", n=1500, timeout_s=600, expect="failed",
             note="beyond [core] max_map_length = 1024"),
    Scenario("imagen_batch_400", dag_id="imagen_batch_w400", n=400, max_in_flight=400, timeout_s=600,
             note="ours: ImagenBatchGenerateOperator, one task, window 400"),
    Scenario("imagen_defaults_400", dag_id="imagen_batch_defaults", n=400, timeout_s=600,
             note="ours with every default (window from 100 up to 1,000, no rate cap), vs the hand loop"),
    Scenario("imagen_batch_2000", dag_id="imagen_batch_w100", n=2000, max_in_flight=100, timeout_s=900,
             note="ours: throughput (scenario 1), ideal bound 2000 / 100 x 10 s = 200 s"),
    Scenario("imagen_slotfree_2000", dag_id="imagen_batch_w100", n=2000, max_in_flight=100, timeout_s=900,
             airflow_config={"IMAGEN_BENCH_REFILL": "0"},
             note="ours: every refill deferred (slot-free), Airflow's default heartbeat interval: 7 s holds"),
    Scenario("imagen_slotfree_hb1_2000", dag_id="imagen_batch_w100", n=2000, max_in_flight=100,
             timeout_s=900,
             airflow_config={"IMAGEN_BENCH_REFILL": "0", "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1"},
             note="ours: slot-free with [workers] min_heartbeat_interval = 1, so 3 s holds"),
    Scenario("imagen_footprint_2000", dag_id="imagen_batch_w2000", n=2000, max_in_flight=2000,
             timeout_s=900, airflow_config={"IMAGEN_BENCH_LINGER": "0"},
             note="ours: 2,000 tasks in one trigger (scenario 3; linger 0 keeps the whole wait there)"),
]  # fmt: skip
"""The full suite (scenarios 1 to 5 of docs/benchmarks.md). About 25 minutes for one repeat."""

SCALING: list[Scenario] = [
    Scenario(f"imagen_batch_{n}", dag_id="imagen_batch_w100", n=n, max_in_flight=100, timeout_s=900,
             note=f"ours: scaling curve (scenario 6), ideal bound {n // 10} s")
    for n in (250, 500, 1000)
]  # fmt: skip
"""Scenario 6, with ``imagen_batch_2000`` of the suite: wall time and polls per image against N."""

QUICK: list[Scenario] = [
    Scenario("stock_http_40", dag_id="stock_http", n=40, timeout_s=300),
    Scenario("hand_loop_40", dag_id="hand_loop", n=40, timeout_s=180),
    Scenario("stock_http_1500", dag_id="stock_http", n=1500, timeout_s=300, expect="failed"),
    Scenario("imagen_batch_40", dag_id="imagen_batch_w40", n=40, max_in_flight=40, timeout_s=180),
]  # fmt: skip
"""A smoke-sized suite that fits in a few minutes (the same DAGs and settings, N = 40)."""


def by_name(names: list[str]) -> list[Scenario]:
    """Pick scenarios from both lists by name, in the order given; unknown names raise ``KeyError``."""
    known = {scenario.name: scenario for scenario in [*SUITE, *SCALING, *QUICK]}
    missing = [name for name in names if name not in known]
    if missing:
        raise KeyError(f"unknown scenario(s): {', '.join(missing)}; known: {', '.join(sorted(known))}")
    return [known[name] for name in names]
