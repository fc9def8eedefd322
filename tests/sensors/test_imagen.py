"""ImagenTaskSensor in real ``dag.test()`` runs: deferrable, poke and reschedule; soft_fail; timeout."""

from __future__ import annotations

from typing import Any

import pytest

from tests.airflow_helpers import run_dag, task_states, xcoms

pytestmark = pytest.mark.usefixtures("airflow_db", "imagen_connection")


@pytest.mark.parametrize("mode", ["deferrable", "poke", "reschedule"])
def test_waits_for_a_task_submitted_upstream(mode: str, emulator: Any) -> None:
    dr = run_dag(f"imagen_test_sensor_{mode}", prompt="sensor target")
    assert task_states(dr) == {"submit": "success", "wait": "success"}
    submitted = xcoms(dr)[("submit", "return_value")]
    assert xcoms(dr)[("wait", "return_value")] == {"task_id": submitted, "status": "completed"}
    ledger = emulator.ledger()
    assert ledger["posts"] == 1 and ledger["polls"] >= 1
    assert "http" not in repr(xcoms(dr))


@pytest.mark.parametrize("mode", ["deferrable", "poke"])
def test_a_moderated_task_fails_the_sensor(
    mode: str, emulator: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    dr = run_dag(f"imagen_test_sensor_{mode}", prompt="[[moderate]] nope")
    assert task_states(dr) == {"submit": "success", "wait": "failed"}
    assert "ContentModeratedError" in capfd.readouterr().out


@pytest.mark.parametrize("mode", ["deferrable", "poke"])
def test_soft_fail_skips_instead(mode: str, emulator: Any) -> None:
    dr = run_dag(f"imagen_test_sensor_{mode}_soft", prompt="[[fail]] nope")
    assert task_states(dr) == {"submit": "success", "wait": "skipped"}


@pytest.mark.parametrize(("mode", "state"), [("deferrable", "failed"), ("deferrable_soft", "skipped")])
def test_timeout_fails_or_skips_with_soft_fail(
    mode: str, state: str, emulator: Any, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IMAGEN_TEST_TIMEOUT", "0.5")
    emulator.configure(latency_mean=3.0, latency_jitter=0.0)
    dr = run_dag(f"imagen_test_sensor_{mode}", prompt="too slow")
    assert task_states(dr) == {"submit": "success", "wait": state}
    if state == "failed":
        assert "AirflowSensorTimeout" in capfd.readouterr().out
