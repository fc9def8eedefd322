"""The known issues the docs describe are still real; when one is fixed, this fails so the docs follow.

Each test reproduces one issue stated in ``docs/troubleshooting.md``. A failure here is good news: the
bug is gone, so delete its paragraph from the docs and the test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.docs.conftest import FakeTaskInstance, fake_context
from tests.docs.markdown import DOCS

TROUBLESHOOTING = (DOCS / "troubleshooting.md").read_text(encoding="utf-8")


def test_image_link_keeps_the_connection_id_in_the_bucket() -> None:
    from airflow_provider_imagen.operators.generate import browsable_uri

    assert "aws_default@" in browsable_uri("s3://aws_default@my-bucket/imagery/x.png"), (
        "fixed: remove the 'Imagen image link' known issue from docs/troubleshooting.md"
    )
    assert 'The "Imagen image" link does not open for `s3://conn_id@bucket/…` images.' in TROUBLESHOOTING


def test_batch_whose_submits_are_all_rejected_ends_in_a_value_error(
    emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow_provider_imagen.operators.batch import ImagenBatchGenerateOperator

    conn = {"conn_type": "imagen", "host": emulator.base_url, "password": "rk_wrong_key"}
    monkeypatch.setenv("AIRFLOW_CONN_IMAGEN_DEFAULT", json.dumps(conn))
    operator = ImagenBatchGenerateOperator(
        task_id="generate",
        prompts=[{"prompt_id": "a", "prompt": "a teapot"}],
        output_path=str(tmp_path),
        deferrable=False,
    )
    with pytest.raises(ValueError, match="was never submitted and no override_status says why"):
        operator.execute(fake_context(FakeTaskInstance("generate")))  # type: ignore[arg-type]
    assert emulator.ledger()["tasks_created"] == 0  # nothing was paid, as the docs say
    assert '`ValueError`: "request … was never submitted and no override_status says why"' in TROUBLESHOOTING
