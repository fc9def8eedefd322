"""The write probe of a local output folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_imagen.batch import preflight


def test_a_local_probe_survives_a_sibling_probe_removing_the_shared_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two tasks probe ``out/run0`` and ``out/run1`` under a fresh ``out``; the other's clean-up removes
    ``out`` (empty for an instant) between this probe making it and making ``run1``. The probe makes it
    again instead of failing the task, and leaves nothing behind."""
    real_makedirs = os.makedirs
    calls = {"n": 0}

    def racing_makedirs(name: str, mode: int = 0o777, exist_ok: bool = False) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:  # the parent appeared, then the sibling's clean-up removed it
            real_makedirs(os.path.dirname(name), exist_ok=True)
            os.rmdir(os.path.dirname(name))
            raise FileNotFoundError(2, "No such file or directory", name)
        return real_makedirs(name, mode, exist_ok)

    monkeypatch.setattr(preflight.os, "makedirs", racing_makedirs)
    folder = tmp_path / "out" / "run1"
    preflight._probe_local(str(folder))
    assert calls["n"] >= 2  # made again after the first attempt lost its parent
    assert not (tmp_path / "out").exists()  # the probe removes what it made, as before


def test_a_local_probe_still_fails_where_nothing_can_be_made(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError):
        preflight._probe_local(str(blocker / "out"))
