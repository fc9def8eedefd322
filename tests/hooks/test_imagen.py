"""ImagenHook: connection → clients, the connection form metadata, and the key kept out of sight."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources
from typing import Any

import jsonschema
import pytest
from airflow.sdk import Connection

from airflow_provider_imagen.api import ImagenError
from airflow_provider_imagen.get_provider_info import get_provider_info
from airflow_provider_imagen.hooks.imagen import ImagenHook, settings_from_connection


class TestSettingsFromConnection:
    @pytest.mark.parametrize(
        ("host", "expected"),
        [
            (None, "https://reapi.ai"),
            ("", "https://reapi.ai"),
            ("reapi.ai", "https://reapi.ai"),
            ("https://reapi.ai/", "https://reapi.ai"),
            ("https://reapi.ai/api/v1", "https://reapi.ai"),
            ("http://127.0.0.1:8930", "http://127.0.0.1:8930"),
        ],
    )
    def test_base_url_defaults_and_normalises(self, host: str | None, expected: str) -> None:
        conn = Connection(conn_id="c", conn_type="imagen", host=host, password="k")
        assert settings_from_connection(conn).base_url == expected

    def test_typed_extras(self) -> None:
        conn = Connection(
            conn_id="c", conn_type="imagen", password="k", extra=json.dumps({"timeout": 7, "max_retries": 2})
        )
        settings = settings_from_connection(conn)
        assert settings.timeout == 7.0 and settings.retry.max_attempts == 3

    def test_extras_as_strings_from_the_uri_form(self) -> None:
        conn = Connection.from_uri("imagen://:k@reapi.ai/?timeout=12&max_retries=0", conn_id="c")
        settings = settings_from_connection(conn)
        assert settings.timeout == 12.0 and settings.retry.max_attempts == 1

    def test_missing_key_names_the_connection_and_the_fix(self) -> None:
        conn = Connection(conn_id="my_imagen", conn_type="imagen", host="https://reapi.ai")
        with pytest.raises(ImagenError, match=r"'my_imagen' has no API key.*password"):
            settings_from_connection(conn)


class TestHookAgainstTheEmulator:
    def test_test_connection_reads_the_balance(self, imagen_connection: str, emulator: Any) -> None:
        ok, message = ImagenHook(imagen_connection).test_connection()
        assert ok, message
        assert "1000000 credits" in message
        assert emulator.ledger()["balance_reads"] == 1

    def test_test_connection_reports_a_wrong_key_without_showing_it(
        self, emulator: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        wrong = "rk_wrong_key_for_this_test"
        conn = {"conn_type": "imagen", "host": emulator.base_url, "password": wrong}
        monkeypatch.setenv("AIRFLOW_CONN_IMAGEN_WRONG", json.dumps(conn))
        ok, message = ImagenHook("imagen_wrong").test_connection()
        assert not ok and "10003" in message and wrong not in message

    def test_repr_shows_no_key(self, imagen_connection: str, emulator: Any) -> None:
        hook = ImagenHook(imagen_connection)
        client = hook.get_conn()
        assert emulator.api_key not in repr(hook) + repr(client) + repr(client.settings)

    async def test_async_client_comes_from_the_async_lookup(
        self, imagen_connection: str, emulator: Any
    ) -> None:
        async with await ImagenHook(imagen_connection).aget_conn() as client:
            assert await client.get_balance() == 1_000_000

    def test_key_is_registered_with_the_secrets_masker(self, imagen_connection: str, emulator: Any) -> None:
        from airflow.sdk._shared.secrets_masker import redact

        ImagenHook(imagen_connection).get_conn()
        assert emulator.api_key not in str(redact(f"Authorization: Bearer {emulator.api_key}"))


class TestProviderRegistration:
    def test_every_extra_the_form_offers_changes_the_client_settings(self) -> None:
        (conn_type,) = get_provider_info()["connection-types"]
        plain = settings_from_connection(Connection(conn_id="c", conn_type="imagen", password="k"))
        for name, field in conn_type["conn-fields"].items():
            extra = json.dumps({name: field["schema"]["minimum"] + 5})
            conn = Connection(conn_id="c", conn_type="imagen", password="k", extra=extra)
            assert settings_from_connection(conn) != plain, f"the form's {name!r} is ignored by the hook"

    def test_provider_info_matches_airflows_schema(self) -> None:
        """The schema file Airflow ships and validates every provider's info against at discovery."""
        schema = json.loads((resources.files("airflow") / "provider_info.schema.json").read_text())
        validator = jsonschema.validators.validator_for(schema)(schema)
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(get_provider_info())]
        assert errors == []
        # The checks reach the parts that matter: a config option of the wrong type is refused.
        broken = get_provider_info()
        broken["config"]["imagen"]["options"]["journal_root"]["type"] = 7
        assert list(validator.iter_errors(broken))

    @pytest.mark.parametrize(
        ("command", "expected"),
        [
            (["providers", "list", "-o", "json"], "airflow-provider-imagen"),
            (["providers", "hooks", "-o", "json"], "airflow_provider_imagen.hooks.imagen.ImagenHook"),
            (["config", "list", "--section", "imagen", "--include-examples"], "journal_root = s3://"),
        ],
    )
    def test_airflow_cli_lists_the_provider(self, command: list[str], expected: str) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "airflow", *command],
            capture_output=True,
            text=True,
            timeout=120,
            env=os.environ.copy(),
            check=False,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert expected in result.stdout
