"""Where the journal goes by default: inside the output folder, whatever its name looks like."""

from __future__ import annotations

import pytest

from airflow_provider_imagen.batch.journal import resolve_journal_root


@pytest.mark.parametrize(
    ("output_path", "journal_root"),
    [
        ("/data/imagery/catalog", "/data/imagery/catalog/_journal"),
        ("/data/imagery/catalog.v2", "/data/imagery/catalog.v2/_journal"),  # a dot in a folder name
        ("/data/imagery/2026.01.05/", "/data/imagery/2026.01.05/_journal"),
        ("s3://bucket/imagery/catalog.v2", "s3://bucket/imagery/catalog.v2/_journal"),
        ("/data/imagery/hero.png", "/data/imagery/_journal"),  # one image file: beside it
        ("/data/imagery/HERO.PNG", "/data/imagery/_journal"),
    ],
)
def test_the_default_journal_is_in_the_output_folder(
    output_path: str, journal_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AIRFLOW__IMAGEN__JOURNAL_ROOT", raising=False)
    assert str(resolve_journal_root(None, output_path)).rstrip("/") == journal_root


def test_an_explicit_journal_path_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRFLOW__IMAGEN__JOURNAL_ROOT", raising=False)
    assert str(resolve_journal_root("/j", "/data/out.v2")) == "/j"
