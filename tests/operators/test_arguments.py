"""The operators' argument checks, without Airflow running anything: fast, and each rule named."""

from __future__ import annotations

from typing import Any

import pytest
from airflow.sdk import ObjectStoragePath

from airflow_provider_imagen.api.errors import ImagenInputError
from airflow_provider_imagen.operators import _arguments as args


@pytest.mark.parametrize(
    ("value", "credits"),
    [(None, None), (46, 46), ("4600", 4600), (" 92 ", 92)],
)
def test_budget_accepts_whole_credits_and_rendered_digits(value: Any, credits: int | None) -> None:
    assert args.budget(value) == credits


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (True, "max_credits=True: must be a whole number of credits or None, not bool"),
        (45, "max_credits=45: is less than one image (46 credits)"),
        (0, "max_credits=0: must be a positive number of credits"),
        ("None", "max_credits='None': must be a whole number of credits"),
        ("", "max_credits='': must be a whole number of credits"),
        ("1e3", "max_credits='1e3'"),
        ("-46", "max_credits='-46'"),
        ("٤٦", "max_credits='٤٦'"),  # digits, but not ASCII ones: int() would take them
        (100.0, "max_credits=100.0: must be a whole number of credits or None, not float"),
    ],
)
def test_budget_refuses_what_is_not_a_budget(value: Any, fragment: str) -> None:
    with pytest.raises(ImagenInputError) as caught:
        args.budget(value)
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("rel", "must be absolute"),
        ("./out", "must be absolute"),
        ("~/out", "'~' is not expanded"),
        ("file://host/out", "a file:// URI needs an absolute path after it"),
        ("", "must not be empty"),
        ("  ", "must not be empty"),
        (42, "must be a path or URI (str or ObjectStoragePath), not int"),
    ],
)
def test_a_location_must_be_absolute_text(value: Any, fragment: str) -> None:
    with pytest.raises(ImagenInputError) as caught:
        args.location("output_path", value)
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    "value", ["/data/out", "file:///data/out", "s3://bucket/prefix", "gs://b/p", "s3://conn@bucket/p"]
)
def test_absolute_paths_and_object_store_uris_are_locations(value: str) -> None:
    args.location("output_path", value)
    args.location("output_path", ObjectStoragePath(value))


def test_optional_locations_take_none_and_empty() -> None:
    args.location("journal_path", None, optional=True)
    args.location("journal_path", "", optional=True)
    with pytest.raises(ImagenInputError):
        args.location("journal_path", "rel", optional=True)


@pytest.mark.parametrize(
    ("value", "template"),
    [
        ("{{ ds }}", True),
        ("{% if x %}a{% endif %}", True),
        ("{# note #}", True),
        ("/data/{x}", False),
        (3, False),
    ],
)
def test_what_counts_as_a_template(value: Any, template: bool) -> None:
    assert args.is_template(value) is template


def test_numbers_refuse_booleans_text_and_nan() -> None:
    with pytest.raises(ImagenInputError, match=r"max_in_flight=True: must be an integer, not bool"):
        args.whole_number("max_in_flight", True, minimum=1)
    with pytest.raises(ImagenInputError, match=r"linger='5': must be a number, not str"):
        args.real_number("linger", "5", minimum=0)
    with pytest.raises(ImagenInputError, match=r"must be a number, not NaN"):
        args.real_number("timeout", float("nan"), positive=True)
    assert args.real_number("max_submit_rate", None, positive=True, optional=True) is None


def test_records_are_left_out_of_rendering_but_paths_are_not() -> None:
    class Op:
        prompts: Any = None

    fields = ("prompts", "output_path", "max_credits")
    op = Op()
    for records in ([{"prompt": "{{ ds }}"}], ({"prompt": "{{ ds }}"},)):
        op.prompts = records
        assert args.without_records(op, fields) == ["output_path", "max_credits"]
    op.prompts = "{{ params.table }}"
    assert args.without_records(op, fields) == list(fields)
    op.prompts = ObjectStoragePath("s3://bucket/{{ ds }}/prompts.parquet")
    assert args.without_records(op, fields) == list(fields)


def test_the_single_image_output_is_a_png_file_or_a_folder() -> None:
    for fine in (None, "", "/data/hero.png", "/data/images/", "s3://bucket/images"):
        args.image_location("output_path", fine)
    with pytest.raises(ImagenInputError, match=r"the API renders PNG"):
        args.image_location("output_path", "/data/hero.JPG")


def test_an_error_from_a_template_names_the_template() -> None:
    with pytest.raises(ImagenInputError) as caught:
        args._checked("output_path", "", "{{ params.out }}", args.location)
    assert str(caught.value).endswith("(rendered from '{{ params.out }}')")
