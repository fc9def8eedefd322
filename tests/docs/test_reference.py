"""The reference tables say what the code does: parameters, defaults, templated fields, XCom keys,
connection fields, emulator knobs and flags, ledger fields, the manifest schema and statuses, exceptions.

Each table is tagged in the Markdown (``<!-- doc-test: kind arg -->``, invisible on GitHub) and compared
with the code, both ways: nothing documented that does not exist, nothing existing that is not documented.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
from pathlib import Path
from typing import Any

import pytest

from tests.docs.conftest import FakeTaskInstance, fake_context
from tests.docs.markdown import DOCS, ROOT, Table, all_tables, code_spans, headings

_MISSING = object()


def _resolve(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _first_span(cell: str) -> str:
    spans = code_spans(cell)
    assert spans, f"expected a `name` in {cell!r}"
    return spans[0]


def _default_documented(cell: str, default: Any) -> bool:
    """Whether one of the cell's code spans is the default (a Python literal, or ``Factory()``)."""
    if default is _MISSING:
        return cell.strip().lower().startswith("required")
    for span in code_spans(cell):
        try:
            if repr(ast.literal_eval(span)) == repr(default):
                return True
        except (ValueError, SyntaxError):
            if callable(default) and span == f"{default.__name__}()":
                return True
    return False


def _check(
    table: Table, actual: dict[str, Any], *, name_column: str, default_column: str = "Default"
) -> None:
    documented = [_first_span(cell) for cell in table.column(name_column)]
    assert len(documented) == len(set(documented)), f"{table.id}: a name is listed twice"
    missing, extra = set(actual) - set(documented), set(documented) - set(actual)
    assert not missing, f"{table.id}: not documented: {sorted(missing)}"
    assert not extra, f"{table.id}: documented but not in the code: {sorted(extra)}"
    for row in table.rows:
        name = _first_span(row[name_column])
        assert _default_documented(row[default_column], actual[name]), (
            f"{table.id}: {name} defaults to {actual[name]!r}, the table says {row[default_column]!r}"
        )


# -- parameters -------------------------------------------------------------------------------------


PARAM_TABLES = all_tables("params")


def test_every_public_class_has_a_parameter_table() -> None:
    documented = {t.arg for t in PARAM_TABLES}
    assert documented == {
        "airflow_provider_imagen.operators.generate.ImagenGenerateOperator",
        "airflow_provider_imagen.operators.batch.ImagenBatchGenerateOperator",
        "airflow_provider_imagen.sensors.imagen.ImagenTaskSensor",
        "airflow_provider_imagen.triggers.imagen.ImagenTaskTrigger",
        "airflow_provider_imagen.hooks.imagen.ImagenHook",
    }


@pytest.mark.parametrize("table", PARAM_TABLES, ids=[t.arg.rsplit(".", 1)[-1] for t in PARAM_TABLES])
def test_parameter_table_matches_the_signature(table: Table) -> None:
    cls = _resolve(table.arg)
    parameters = inspect.signature(cls.__init__).parameters.values()
    actual = {
        p.name: (_MISSING if p.default is inspect.Parameter.empty else p.default)
        for p in parameters
        if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }
    _check(table, actual, name_column="Parameter")
    if "Templated" in table.header:
        templated = {_first_span(r["Parameter"]) for r in table.rows if r["Templated"].lower() == "yes"}
        assert templated == set(cls.template_fields), (
            f"{table.id}: templated fields are {cls.template_fields}"
        )
        assert all(r["Templated"].lower() in ("yes", "no") for r in table.rows)


# -- dataclass fields -------------------------------------------------------------------------------

FIELD_TABLES = all_tables("fields")


@pytest.mark.parametrize("table", FIELD_TABLES, ids=[t.arg.rsplit(".", 1)[-1] for t in FIELD_TABLES])
def test_field_table_matches_the_dataclass(table: Table) -> None:
    cls = _resolve(table.arg)
    actual: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.compare:  # internal hooks for tests (e.g. RetryPolicy.rand)
            continue
        if f.default is not dataclasses.MISSING:
            actual[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            actual[f.name] = f.default_factory
        else:
            actual[f.name] = _MISSING
    _check(table, actual, name_column=table.header[0])


# -- XCom -------------------------------------------------------------------------------------------


def _types_match(cell: str, value: Any) -> bool:
    allowed = {span.split("[")[0] for span in code_spans(cell)}
    return ("None" in allowed) if value is None else type(value).__name__ in allowed


def _xcom_table(cls_name: str) -> Table:
    (table,) = [t for t in all_tables("xcom") if t.arg.endswith(f".{cls_name}")]
    return table


def _check_xcom(table: Table, result: dict[str, Any]) -> None:
    keys = [_first_span(cell) for cell in table.column("Key")]
    assert sorted(keys) == sorted(result), f"{table.id}: the operator returns {sorted(result)}"
    for row in table.rows:
        key = _first_span(row["Key"])
        assert _types_match(row["Type"], result[key]), f"{table.id}: {key}={result[key]!r} vs {row['Type']}"


@pytest.mark.usefixtures("imagen_connection")
def test_generate_operator_xcom_is_documented(tmp_path: Path) -> None:
    from airflow_provider_imagen.operators.generate import IMAGE_URI_XCOM_KEY, ImagenGenerateOperator

    operator = ImagenGenerateOperator(
        task_id="hero",
        prompt="A teapot",
        output_path=str(tmp_path) + "/",
        expected_render=0.2,
        poll_interval=0.1,
        deferrable=False,
    )
    ti = FakeTaskInstance("hero")
    result = operator.execute(fake_context(ti))  # type: ignore[arg-type]
    _check_xcom(_xcom_table("ImagenGenerateOperator"), result)
    page = (DOCS / "reference" / "generate-operator.md").read_text(encoding="utf-8")
    assert f"`{IMAGE_URI_XCOM_KEY}`" in page and set(ti.pushed) == {IMAGE_URI_XCOM_KEY}


def test_batch_operator_xcom_is_documented(batch_output: Any) -> None:
    _check_xcom(_xcom_table("ImagenBatchGenerateOperator"), batch_output.result)
    assert set(batch_output.result["counts"]) <= {*_statuses(), "total"}


def test_sensor_xcom_is_documented() -> None:
    from airflow_provider_imagen.sensors.imagen import ImagenTaskSensor

    sensor = ImagenTaskSensor(task_id="wait", imagen_task_id="task_1")
    event = {"status": "success", "tasks": {"task_1": {"status": "completed", "error_code": None}}}
    _check_xcom(_xcom_table("ImagenTaskSensor"), sensor.execute_complete({}, event))  # type: ignore[arg-type]


# -- the connection ---------------------------------------------------------------------------------


def test_connection_fields_match_the_provider_info() -> None:
    from airflow_provider_imagen.get_provider_info import get_provider_info

    (conn_type,) = get_provider_info()["connection-types"]
    (table,) = all_tables("conn-fields")
    behaviour, extras = conn_type["ui-field-behaviour"], conn_type["conn-fields"]
    documented_extras = set()
    for row in table.rows:
        label, attribute = row["Field in the UI"], _first_span(row["Connection attribute"])
        if attribute.startswith("extra."):
            name = attribute.removeprefix("extra.")
            documented_extras.add(name)
            assert extras[name]["label"] == label, (
                f"{table.id}: extra {name} is labelled {extras[name]['label']!r}"
            )
        else:
            assert behaviour["relabeling"][attribute] == label, f"{table.id}: {attribute} is not {label!r}"
    assert documented_extras == set(extras)
    assert set(behaviour["relabeling"]) <= {_first_span(c) for c in table.column("Connection attribute")}
    assert conn_type["connection-type"] == "imagen"


# -- the emulator -----------------------------------------------------------------------------------


def test_emulator_cli_flags_are_documented() -> None:
    from airflow_provider_imagen.emulator.__main__ import build_parser

    (table,) = all_tables("emulator-cli")
    actions = {
        opt: action
        for action in build_parser()._actions
        for opt in action.option_strings
        if opt.startswith("--")
    }
    actions.pop("--help")
    documented = {_first_span(cell): row for cell, row in zip(table.column("Flag"), table.rows, strict=True)}
    assert set(documented) == set(actions), f"{table.id}: flags differ from the parser's"
    for flag, row in documented.items():
        knob = code_spans(row["Knob"])
        if knob:
            assert actions[flag].dest == knob[0], f"{table.id}: {flag} sets {actions[flag].dest}"


def test_ledger_fields_are_documented() -> None:
    from airflow_provider_imagen.emulator.state import EmulatorState

    (table,) = all_tables("ledger")
    documented = [_first_span(cell) for cell in table.column("Field")]
    assert documented == list(EmulatorState().ledger()), f"{table.id}: the ledger's fields, in order"


# -- the manifest -----------------------------------------------------------------------------------


def _statuses() -> tuple[str, ...]:
    from airflow_provider_imagen.batch.manifest import STATUSES

    return STATUSES


def test_manifest_schema_is_documented_exactly() -> None:
    from airflow_provider_imagen.batch.manifest import MANIFEST_SCHEMA, SCHEMA_VERSION, SCHEMA_VERSION_KEY

    (table,) = all_tables("manifest-schema")
    documented = [
        (_first_span(r["Column"]), _first_span(r["Type"]), r["Nullable"].strip().lower()) for r in table.rows
    ]
    actual = [(f.name, str(f.type), "yes" if f.nullable else "no") for f in MANIFEST_SCHEMA]
    assert documented == actual, f"{table.id}: the schema, in order"
    page = (DOCS / "manifest.md").read_text(encoding="utf-8")
    assert f"Schema version **{SCHEMA_VERSION}**" in page and f"`{SCHEMA_VERSION_KEY.decode()}`" in page


def test_manifest_statuses_and_credits_are_documented_exactly() -> None:
    from airflow_provider_imagen.batch.manifest import credits_for

    (table,) = all_tables("manifest-statuses")
    documented = [(_first_span(r["Status"]), int(r["Credits"])) for r in table.rows]
    assert documented == [(s, credits_for(s)) for s in _statuses()], f"{table.id}: statuses and credits"


# -- exceptions -------------------------------------------------------------------------------------


def _exception_classes() -> dict[str, type]:
    from airflow_provider_imagen.api import errors
    from airflow_provider_imagen.batch import journal, table

    found = {
        name: obj
        for module in (errors, table)
        for name, obj in vars(module).items()
        if inspect.isclass(obj) and issubclass(obj, errors.ImagenError) and obj.__module__ == module.__name__
    }
    found["JournalReadError"] = journal.JournalReadError
    return found


def test_every_exception_is_in_the_reference() -> None:
    (table,) = all_tables("exceptions")
    classes = _exception_classes()
    documented = {_first_span(r["Exception"]): _first_span(r["Parent"]) for r in table.rows}
    assert set(documented) == set(classes), f"{table.id}: exceptions differ from the code"
    for name, parent in documented.items():
        assert classes[name].__bases__[0].__name__ == parent, f"{table.id}: {name} derives from {parent}?"


def test_every_exception_has_a_troubleshooting_section() -> None:
    titles = " ".join(headings(DOCS / "troubleshooting.md"))
    missing = [name for name in _exception_classes() if f"`{name}`" not in titles]
    assert not missing, f"docs/troubleshooting.md has no section for {missing}"


# -- example DAG parameters -------------------------------------------------------------------------

DAG_PARAM_TABLES = all_tables("dag-params")


@pytest.mark.parametrize("table", DAG_PARAM_TABLES, ids=[t.arg.split()[-1] for t in DAG_PARAM_TABLES])
def test_example_dag_params_are_documented(table: Table) -> None:
    from airflow.dag_processing.dagbag import DagBag

    path, dag_id = table.arg.split()
    bag = DagBag(dag_folder=ROOT / path)
    assert not bag.import_errors, bag.import_errors
    params = bag.dags[dag_id].params
    documented = [_first_span(cell) for cell in table.column("Param")]
    assert sorted(documented) == sorted(params.keys()), f"{table.id}: params are {sorted(params.keys())}"
    for row in table.rows:
        name = _first_span(row["Param"])
        default = params[name]
        literal = [s for s in code_spans(row["Default"]) if _is_literal(s)]
        if literal:  # paths computed from the environment are described in words
            assert repr(ast.literal_eval(literal[0])) == repr(default), f"{table.id}: {name}={default!r}"


def _is_literal(span: str) -> bool:
    try:
        ast.literal_eval(span)
    except (ValueError, SyntaxError):
        return False
    return True
