"""Every code snippet of the docs (and the README) is exercised, so the docs cannot rot.

- ``python`` blocks: all compile; every block without ``# doc-test: skip`` runs, in an empty working
  directory, with the ``imagen_default`` connection pointing at the emulator. A block that defines DAGs is
  loaded the way Airflow loads a DAG file (a ``DagBag``): no import errors, every ``task_id="…"`` it
  names exists, and each DAG serialises as the DAG processor would.
- ``# doc-test: file=<path>`` blocks of one page form an example project; when it has tests, it runs with
  pytest in a subprocess with a clean environment, as a user's CI would run it.
- ``bash`` blocks: every command they name must exist (make targets, emulator flags, Airflow CLI
  commands and options, configuration options, connection JSON, emulator routes).
- ``json`` and ``yaml`` blocks parse.

The example project is the slow part (a real pytest run with ``dag.test()``, ~15 s of CPU); it starts when
collection ends and runs alongside the rest. ``-k "not example_project"`` leaves it out while editing.
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.docs import projects
from tests.docs.conftest import copy_tree
from tests.docs.markdown import DOCS, ROOT, Block, all_blocks, blocks, rel

PYTHON_BLOCKS = all_blocks("python", "py")
RUNNABLE = [b for b in PYTHON_BLOCKS if not b.skip and b.file is None and "include" not in b.directives]
INCLUDED = [b for b in PYTHON_BLOCKS if "include" in b.directives]
PROJECT_PAGES = sorted({b.path for b in PYTHON_BLOCKS if b.file}, key=str)
SHELL_BLOCKS = all_blocks("bash", "sh", "shell", "console")


def _ids(items: list[Block]) -> list[str]:
    return [b.id for b in items]


def test_the_docs_have_snippets_of_every_kind() -> None:
    assert len(PYTHON_BLOCKS) >= 20 and len(RUNNABLE) >= 15 and PROJECT_PAGES and SHELL_BLOCKS


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=_ids(PYTHON_BLOCKS))
def test_python_snippet_compiles(block: Block) -> None:
    compile(block.code, block.id, "exec")
    known = {"skip", "file", "needs", "include"}
    assert set(block.directives) <= known, f"{block.id}: unknown doc-test directive(s) {block.directives}"


# -- running python snippets --------------------------------------------------------------------------

_DAG_DEFINITION = re.compile(r"\bDAG\(|@dag\b")
_TASK_ID = re.compile(r"""\btask_id\s*=\s*["']([\w.-]+)["']""")


@pytest.mark.usefixtures("imagen_connection")
@pytest.mark.parametrize("block", RUNNABLE, ids=_ids(RUNNABLE))
def test_python_snippet_runs(block: Block, snippet_dir: Path, request: pytest.FixtureRequest) -> None:
    needs = block.directives.get("needs")
    if needs == "batch-output":
        copy_tree(request.getfixturevalue("batch_output").root, snippet_dir)
    elif needs == "s3":
        request.getfixturevalue("s3_as_aws_default")
    elif needs is not None:
        pytest.fail(f"{block.id}: unknown needs={needs}")
    if _DAG_DEFINITION.search(block.code):
        _check_dag_file(block, snippet_dir)
    else:
        namespace: dict[str, Any] = {"__name__": "doc_snippet"}
        exec(compile(block.code, block.id, "exec"), namespace)


def _check_dag_file(block: Block, folder: Path) -> None:
    """Load the snippet as Airflow loads a DAG file, and check what it defines."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.serialization.serialized_objects import DagSerialization

    path = folder / f"doc_snippet_{block.line}.py"
    path.write_text(block.code, encoding="utf-8")
    bag = DagBag(dag_folder=path)
    assert not bag.import_errors, f"{block.id}: {bag.import_errors}"
    assert bag.dags, f"{block.id}: defines no DAG"
    task_ids = {t for dag in bag.dags.values() for t in dag.task_ids}
    named = set(_TASK_ID.findall(block.code))
    assert named <= task_ids, f"{block.id}: tasks {sorted(named - task_ids)} are named but not in the DAG"
    for dag in bag.dags.values():
        assert dag.tasks, f"{block.id}: DAG {dag.dag_id} has no tasks"
        DagSerialization.to_dict(dag)  # what the DAG processor stores; fails on unserialisable args


# -- code quoted from files -----------------------------------------------------------------------

_REGION = re.compile(r"^\s*# \[START (?P<name>\S+)\]\n(?P<body>.*?)^\s*# \[END (?P=name)\]", re.S | re.M)


@pytest.mark.parametrize("block", INCLUDED, ids=_ids(INCLUDED))
def test_quoted_code_matches_its_source(block: Block) -> None:
    """``# doc-test: include=<file>#<name>`` quotes the ``# [START name]`` … ``# [END name]`` region."""
    path, _, name = block.directives["include"].partition("#")
    source = (ROOT / path).read_text(encoding="utf-8")
    regions = {m.group("name"): textwrap.dedent(m.group("body")) for m in _REGION.finditer(source)}
    assert name in regions, f"{block.id}: no region {name!r} in {path} (has {sorted(regions)})"
    quoted = "".join(line + "\n" for line in block.code.splitlines() if not line.startswith("# doc-test:"))
    assert textwrap.dedent(quoted).strip() == regions[name].strip(), f"{block.id}: differs from {path}#{name}"


# -- example projects ---------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PROJECT_PAGES, ids=[rel(p) for p in PROJECT_PAGES])
def test_example_project_runs(page: Path) -> None:
    """The page's ``file=`` blocks, assembled into a project: its tests pass, as in a user's CI."""
    code, output = projects.result(page)
    assert code == 0, f"{rel(page)}: pytest failed\n{output[-8000:]}"


# -- shell snippets -----------------------------------------------------------------------------------

_ALLOWED_TOOLS = {"pip", "uv", "git", "cd", "curl", "pytest", "ruff", "sleep", "kill", "echo", "ls", "cat"}
_PYTHONS = {"python", "python3", ".venv/bin/python"}


def _commands(code: str) -> list[list[str]]:
    """Split a shell block into commands (continuations joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", code)
    out: list[list[str]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        words = shlex.split(line, comments=True)
        current: list[str] = []
        for word in [*words, ";"]:
            if word in ("&&", "||", ";", "|", "&"):
                if current:
                    out.append(current)
                current = []
            else:
                current.append(word)
    return out


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z][\w-]*):", text, flags=re.MULTILINE))


_AIRFLOW_PARSER: Any = None


def _airflow_parser() -> Any:
    global _AIRFLOW_PARSER
    if _AIRFLOW_PARSER is None:
        from airflow.cli.cli_parser import get_parser

        _AIRFLOW_PARSER = get_parser()
    return _AIRFLOW_PARSER


def _check_env(name: str, value: str, where: str) -> None:
    if name.startswith("AIRFLOW_CONN_") and value.lstrip().startswith("{"):
        conn = json.loads(value)
        assert conn.get("conn_type"), f"{where}: {name} has no conn_type"
    elif name.startswith("AIRFLOW__"):
        section, _, key = name.removeprefix("AIRFLOW__").partition("__")
        from airflow.configuration import conf

        known = conf.has_option(section.lower(), key.lower()) or (section, key) == ("IMAGEN", "JOURNAL_ROOT")
        assert known, f"{where}: {name} is not an Airflow option"


def _check_command(words: list[str], where: str) -> None:
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):  # VAR=value command
        name, _, value = words.pop(0).partition("=")
        _check_env(name, value, where)
    if not words:
        return
    tool, args = words[0], words[1:]
    if tool == "export":
        for arg in args:
            name, _, value = arg.partition("=")
            _check_env(name, value, where)
    elif tool == "make":
        targets = [a for a in args if not a.startswith("-") and "=" not in a]
        missing = set(targets) - _make_targets()
        assert not missing, f"{where}: make target(s) {sorted(missing)} not in the Makefile"
    elif tool in _PYTHONS:
        if args[:2] == ["-m", "airflow_provider_imagen.emulator"]:
            from airflow_provider_imagen.emulator.__main__ import build_parser

            try:
                build_parser().parse_args(args[2:])
            except SystemExit:
                pytest.fail(f"{where}: the emulator does not accept {args[2:]}")
        elif args[:1] == ["-m"]:
            assert args[1] in ("pytest", "pip", "airflow"), f"{where}: python -m {args[1]}?"
        else:
            assert args and (ROOT / args[0]).is_file(), f"{where}: no script {args[:1]}"
    elif tool == "airflow":
        try:
            _airflow_parser().parse_args(args)
        except SystemExit:
            pytest.fail(f"{where}: Airflow's CLI rejects `airflow {' '.join(args)}`")
    elif tool == "curl":
        from airflow_provider_imagen.emulator import create_app

        paths = {route.path for route in create_app().routes}  # type: ignore[attr-defined]
        for url in (a for a in args if "://" in a):
            path = re.sub(r"^\w+://[^/]+", "", url).split("?")[0]
            assert path in paths, f"{where}: the emulator has no route {path}"
    else:
        assert tool in _ALLOWED_TOOLS, (
            f"{where}: unknown command {tool!r} (extend the doc test if it is real)"
        )


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=_ids(SHELL_BLOCKS))
def test_shell_snippet_names_real_commands(block: Block) -> None:
    for words in _commands(block.code):
        _check_command(words, block.id)


# -- data snippets ------------------------------------------------------------------------------------

DATA_BLOCKS = all_blocks("json", "yaml", "yml", "ini", "cfg")


@pytest.mark.parametrize("block", DATA_BLOCKS, ids=_ids(DATA_BLOCKS))
def test_data_snippet_parses(block: Block) -> None:
    if block.lang == "json":
        json.loads(block.code)
    elif block.lang in ("yaml", "yml"):
        yaml.safe_load(block.code)
    else:
        configparser.ConfigParser().read_string(block.code)


def test_no_untyped_code_fences() -> None:
    """A fence without a language escapes every check above; plain text must say ``text``."""
    bare = [b.id for path in DOCS.rglob("*.md") for b in blocks(path) if not b.lang]
    assert not bare, f"code fences without a language: {bare}"
