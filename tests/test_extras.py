"""The optional parts say which extra to install when a library they need is missing."""

from __future__ import annotations

import importlib
import sys

import pytest

import airflow_provider_imagen.emulator
import airflow_provider_imagen.publish
from airflow_provider_imagen._extras import require_extra


@pytest.mark.parametrize(
    ("package", "hidden", "extra", "named"),
    [
        (airflow_provider_imagen.publish, "pandas", "publish", "pandas"),
        (airflow_provider_imagen.publish, "PIL", "publish", "pillow"),
        (airflow_provider_imagen.emulator, "fastapi", "emulator", "fastapi"),
    ],
)
def test_importing_an_optional_part_without_its_library_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, package: object, hidden: str, extra: str, named: str
) -> None:
    monkeypatch.setitem(sys.modules, hidden, None)  # what ``import`` does for a module not installed
    with pytest.raises(ImportError, match=rf"needs {named}.*airflow-provider-imagen\[{extra}\]") as info:
        importlib.reload(package)  # type: ignore[arg-type]
    assert info.value.name == hidden


def test_nothing_is_raised_when_the_extra_is_installed() -> None:
    require_extra("publish", feature="publishing")
    require_extra("emulator", feature="the emulator")
