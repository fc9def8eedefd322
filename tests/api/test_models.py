"""Request validation and task parsing: the contract's rules, checked before any network call."""

from __future__ import annotations

import pytest

from airflow_provider_imagen.api import (
    MAX_PROMPT_CHARS,
    SIZES,
    ImagenInputError,
    ImageRequest,
    RequestValidationError,
    Task,
)
from airflow_provider_imagen.api.errors import ContentModeratedError, TaskFailedError, task_failure
from airflow_provider_imagen.api.models import credits_to_usd, estimate_credits


class TestImageRequestValidation:
    def test_defaults_match_the_contract(self) -> None:
        body = ImageRequest("a red bicycle").to_json()
        assert body == {"model": "imagen-4-0", "prompt": "a red bicycle", "size": "16:9", "n": 1}

    @pytest.mark.parametrize("size", SIZES)
    def test_every_documented_ratio_is_accepted(self, size: str) -> None:
        assert ImageRequest("x", size=size).size == size

    @pytest.mark.parametrize(
        ("kwargs", "field", "rule_part"),
        [
            ({"prompt": ""}, "prompt", "empty"),
            ({"prompt": "   \n\t"}, "prompt", "whitespace"),
            ({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "prompt", "4001 characters; at most 4000"),
            ({"prompt": None}, "prompt", "must be a string"),
            ({"prompt": b"bytes"}, "prompt", "must be a string"),
            ({"prompt": "bad \udcff surrogate"}, "prompt", "UTF-8"),
            ({"prompt": "nul\x00"}, "prompt", "NUL"),
            ({"prompt": "ok", "size": "2:1"}, "size", "one of 1:1, 4:3, 3:4, 16:9, 9:16"),
            ({"prompt": "ok", "size": "1024x1024"}, "size", "one of"),
            ({"prompt": "ok", "n": 2}, "n", "must be 1"),
            ({"prompt": "ok", "n": True}, "n", "must be 1"),
            ({"prompt": "ok", "model": "flux-2"}, "model", "imagen-4-0"),
        ],
    )
    def test_each_violation_names_field_value_and_rule(
        self, kwargs: dict, field: str, rule_part: str
    ) -> None:
        with pytest.raises(RequestValidationError) as info:
            ImageRequest(**kwargs)
        err = info.value
        assert err.field == field
        assert rule_part in err.rule
        assert str(err).startswith(f"{field}=")
        assert isinstance(err, ImagenInputError) and isinstance(err, ValueError)

    def test_limit_counts_characters_not_bytes(self) -> None:
        chinese = "猫" * MAX_PROMPT_CHARS  # 12,000 UTF-8 bytes, 4,000 characters
        assert len(chinese.encode()) == 3 * MAX_PROMPT_CHARS
        assert ImageRequest(chinese).prompt == chinese
        with pytest.raises(RequestValidationError, match="4001 characters"):
            ImageRequest(chinese + "猫")

    def test_long_values_are_shortened_in_the_message(self) -> None:
        with pytest.raises(RequestValidationError) as info:
            ImageRequest("y" * 5000)
        assert len(str(info.value)) < 200
        assert "5000 long" in str(info.value)


class TestTaskParsing:
    def test_processing_with_nulls(self) -> None:
        task = Task.from_json(
            {"id": "task_1", "model": "imagen-4-0", "status": "processing", "created_at": 1, "output": None}
        )
        assert (task.status, task.is_terminal, task.image_url, task.error_code) == (
            "processing",
            False,
            None,
            None,
        )

    def test_processing_with_fields_absent(self) -> None:
        assert not Task.from_json({"id": "task_1", "status": "processing"}).is_terminal

    def test_task_id_alias_is_accepted(self) -> None:
        assert Task.from_json({"task_id": "task_01HXYZ", "status": "processing"}).id == "task_01HXYZ"

    def test_completed_carries_the_first_image_url_but_hides_it_from_repr(self) -> None:
        url = "https://cdn.example/media/tasks/abc/0.png?sig=secret"
        task = Task.from_json(
            {"id": "t", "status": "completed", "output": {"image_urls": [url]}, "error": None}
        )
        assert task.is_terminal and task.image_url == url
        assert "sig=secret" not in repr(task)

    def test_failed_carries_code_and_message(self) -> None:
        task = Task.from_json(
            {"id": "t", "status": "failed", "output": None, "error": {"code": 80006, "message": "policy"}}
        )
        assert (task.is_terminal, task.error_code, task.error_message) == (True, 80006, "policy")

    @pytest.mark.parametrize("status", ["queued", "running", "succeeded", "", None, 3])
    def test_unknown_status_is_never_finished(self, status: object) -> None:
        assert not Task.from_json({"id": "t", "status": status}).is_terminal

    @pytest.mark.parametrize("body", [{}, {"status": "processing"}, {"id": ""}, [], "task_1"])
    def test_answer_without_id_is_rejected(self, body: object) -> None:
        with pytest.raises(ValueError):
            Task.from_json(body)


def test_failure_codes_map_to_typed_errors() -> None:
    assert type(task_failure("t", 80006, "policy")) is ContentModeratedError
    assert type(task_failure("t", 60001, "boom")) is TaskFailedError


def test_price() -> None:
    assert estimate_credits(300) == 13_800
    assert credits_to_usd(13_800) == 13.8
