"""Example projects assembled from a page's ``# doc-test: file=<path>`` blocks, run with pytest.

A project's pytest runs in a subprocess with a clean environment, as a user's CI would run it. It takes
several seconds (Airflow import, a database migration, a real ``dag.test()``), so the doc tests start it
as soon as collection ends and collect its result at the end: it overlaps with the in-process tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.docs.markdown import blocks, rel

_RUNNING: dict[Path, tuple[subprocess.Popen[str], Path]] = {}


def assemble(page: Path, dest: Path) -> list[str]:
    """Write the page's ``file=`` blocks under ``dest``; return the project's test files."""
    files = [b for b in blocks(page) if b.lang in ("python", "py") and b.file]
    for block in files:
        target = dest / block.file  # type: ignore[operator]
        if target.exists():
            raise AssertionError(f"{block.id}: {block.file} is given twice")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(block.code, encoding="utf-8")
    return [b.file for b in files if Path(b.file).name.startswith("test_")]  # type: ignore[arg-type,misc]


def start(page: Path) -> None:
    """Assemble and start the page's project in the background (once)."""
    if page in _RUNNING:
        return
    dest = Path(tempfile.mkdtemp(prefix="doc-project-"))
    if not assemble(page, dest):
        raise AssertionError(f"{rel(page)}: the example project has no test file to run")
    # A user's CI: nothing inherited from this test session's Airflow or pytest settings.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PYTEST", "IMAGEN"))}
    process = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning"],
        cwd=dest,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _RUNNING[page] = (process, dest)


def result(page: Path, timeout: float = 240) -> tuple[int, str]:
    """Wait for the page's project; return pytest's exit code and output."""
    start(page)
    process, _ = _RUNNING[page]
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def stop_all() -> None:
    """Kill projects still running (an interrupted session)."""
    for process, _ in _RUNNING.values():
        if process.poll() is None:
            process.kill()
            process.wait()
