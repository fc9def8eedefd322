"""``make demo``: run the nightly catalog DAG twice with ``airflow dags test`` and show what it made and cost.

What it does, from a fresh clone (``make demo`` first builds ``.venv``):

1. starts the reAPI emulator as a subprocess on a free port (renders take 3 ± 1 s, like a fast real
   API), configured to refuse the sample catalog's "replica" handbag the way a content policy would;
   with ``REAPI_API_KEY`` set it uses the real API instead and says what night one will cost first;
2. makes a local Airflow home in ``.demo/airflow`` (SQLite) and migrates it;
3. night one: ``airflow dags test imagen_catalog_nightly`` over the bundled 40-product catalog, then a
   summary (rows, completed, moderated, credits, where the manifest, images and contact sheet are);
4. night two: the same catalog again, which must send nothing: the emulator's ledger shows zero new
   submissions (the demo fails if it does not);
5. stops the emulator.

Airflow's own output goes to ``.demo/logs/``; each night's output (images, manifests, index, contact
sheet, gallery) to ``.demo/output/catalog``, wiped at the start so night one always starts empty.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / ".demo"
AIRFLOW_HOME = DEMO / "airflow"
LOGS = DEMO / "logs"
OUTPUT = DEMO / "output"
CATALOG_OUT = OUTPUT / "catalog"
DAGS = ROOT / "dags"
DAG_ID = "imagen_catalog_nightly"
#: What the demo's emulator refuses: its usual marker, and the word in the sample's one counterfeit product.
MODERATED_WORDS = ("[[moderate]]", "replica")
CREDITS_PER_IMAGE = 46


@dataclass
class Api:
    """Where the DAG's ``imagen_default`` connection points, and the emulator's ledger if there is one."""

    base_url: str
    api_key: str
    emulated: bool

    def ledger(self) -> dict[str, Any] | None:
        if not self.emulated:
            return None
        return httpx.get(f"{self.base_url}/_emulator/ledger", timeout=10).json()


def say(text: str = "") -> None:
    print(text, flush=True)


def rel(path: Path | str) -> str:
    """Return ``path`` relative to the repository when it is inside it (shorter lines)."""
    path = Path(str(path).removeprefix("file://"))
    with contextlib.suppress(ValueError):
        return str(path.relative_to(ROOT))
    return str(path)


# -- the API: emulator subprocess or the real thing ------------------------------------------------


@contextlib.contextmanager
def api() -> Iterator[Api]:
    key = os.environ.get("REAPI_API_KEY", "").strip()
    if key:
        base_url = os.environ.get("REAPI_BASE_URL", "https://reapi.ai").rstrip("/")
        images = planned_images()
        credits = images * CREDITS_PER_IMAGE
        say(f"REAPI_API_KEY is set: this demo uses the REAL reAPI at {base_url} and spends real credits.")
        say(
            f"Night one generates {images} images: {images} × {CREDITS_PER_IMAGE} = {credits:,} credits "
            f"(${credits / 1000:.2f}) at most; night two should spend nothing."
        )
        say("Starting in 10 s; press Ctrl-C to stop without spending anything.")
        time.sleep(10)
        yield Api(base_url, key, emulated=False)
        return
    LOGS.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "airflow_provider_imagen.emulator",
        "--port",
        "0",
        "--latency-mean",
        "3",
        "--latency-jitter",
        "1",
        "--seed",
        "7",
    ]
    with (LOGS / "emulator.log").open("w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT)
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            found = re.search(r"running at (http://\S+) ", line)
            if not found:
                raise RuntimeError(f"the emulator did not start: {line.strip() or 'no output'}; see {LOGS}")
            base_url = found.group(1)
            httpx.post(
                f"{base_url}/_emulator/config", json={"moderated_words": list(MODERATED_WORDS)}, timeout=10
            ).raise_for_status()
            say(f"No REAPI_API_KEY: using the reAPI emulator at {base_url} (3 ± 1 s renders, free).")
            yield Api(base_url, "rk_emulator_key", emulated=True)
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            say("Emulator stopped.")


def planned_images() -> int:
    """Return how many images night one asks for: the DAG's own surface mapping over the catalog."""
    from airflow_provider_imagen.batch.specs import expand_specs
    from airflow_provider_imagen.batch.table import read_prompt_table

    module = runpy.run_path(str(DAGS / f"{DAG_ID}.py"))
    table = read_prompt_table(module["SAMPLE_CATALOG"])
    table["sizes"] = [module["surface_sizes"](cell) for cell in table["surfaces"]]
    return sum(1 for spec in expand_specs(table, size_column="sizes") if spec.valid)


# -- Airflow -------------------------------------------------------------------------------------------


def airflow_env(target: Api) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW") and k != "VIRTUAL_ENV"}
    env.update(
        AIRFLOW_HOME=str(AIRFLOW_HOME),
        AIRFLOW__CORE__DAGS_FOLDER=str(DAGS),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{AIRFLOW_HOME / 'airflow.db'}",
        AIRFLOW_CONN_IMAGEN_DEFAULT=json.dumps(
            {"conn_type": "imagen", "host": target.base_url, "password": target.api_key}
        ),
        IMAGEN_EXAMPLES_OUTPUT=str(OUTPUT),
    )
    if target.emulated:
        env["IMAGEN_EXAMPLES_EXPECTED_RENDER"] = "3"
    return env


def airflow(args: list[str], env: dict[str, str], log_name: str) -> float:
    """Run one ``airflow`` command with its output in ``.demo/logs``; return its wall time."""
    log_path = LOGS / log_name
    started = time.monotonic()
    with log_path.open("w") as log:
        code = subprocess.call(
            [str(Path(sys.executable).parent / "airflow"), *args], env=env, stdout=log, stderr=log, cwd=ROOT
        )
    if code != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-40:]
        say("\n".join(tail))
        raise SystemExit(f"`airflow {' '.join(args)}` failed (exit {code}); full log: {rel(log_path)}")
    return time.monotonic() - started


def night(number: int, logical_date: dt.date, env: dict[str, str], target: Api) -> dict[str, Any]:
    """Run one night with ``airflow dags test``; return its plan, publish result and ledger change."""
    before = target.ledger()
    say(f"\nNight {number} (logical date {logical_date}): airflow dags test {DAG_ID} …")
    seconds = airflow(["dags", "test", DAG_ID, logical_date.isoformat()], env, f"night-{number}.log")
    plan = newest_plan()
    after = target.ledger()
    posts = None if before is None or after is None else after["posts"] - before["posts"]
    credits = None if before is None or after is None else after["net_credits"] - before["net_credits"]
    return {"seconds": seconds, "plan": plan, "posts": posts, "ledger_credits": credits, "ledger": after}


def newest_plan() -> dict[str, Any]:
    plans = sorted(CATALOG_OUT.glob("plans/*/*/plan.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(plans[-1].read_text()) if plans else {}


# -- the story -----------------------------------------------------------------------------------------


def summary_of_night_one(result: dict[str, Any]) -> None:
    from airflow_provider_imagen.batch.manifest import read_manifest

    latest = json.loads((CATALOG_OUT / "latest.json").read_text())
    manifest = read_manifest(latest["manifest_uri"])
    plan = result["plan"]
    counts = latest["counts"]
    moderated = manifest[manifest["status"] == "moderated"]
    images = CATALOG_OUT / "images"
    say(f"Night 1 done in {result['seconds']:.1f} s:")
    say(
        f"  rows           {plan['rows']} catalog products → {plan['requested']} images in "
        f"{manifest['size'].nunique()} sizes (one per storefront surface)"
    )
    say(f"  completed      {counts.get('completed', 0)}")
    if len(moderated):
        ids = ", ".join(sorted(set(moderated["prompt_id"])))
        say(f"  moderated      {len(moderated)} ({ids}: refused by the content policy, refunded)")
    else:
        say("  moderated      0")
    others = {k: v for k, v in counts.items() if k not in ("completed", "moderated", "total")}
    if others:
        say(f"  other          {others}")
    credits = latest["credits"]
    ledger = ""
    if result["posts"] is not None:
        ledger = f"; emulator ledger: {result['posts']} POSTs, {result['ledger_credits']:,} net credits"
    say(f"  credits        {credits:,} (${credits / 1000:.2f}){ledger}")
    say(f"  images         {rel(images)}/ ({len(list(images.glob('*.png')))} PNG files)")
    say(f"  run folder     {rel(Path(rel(latest['manifest_uri'])).parent)}/")
    say(f"    manifest       {Path(latest['manifest_uri']).name}  (the Asset imagen_catalog_manifests)")
    say(f"    contact sheet  {Path(latest['contact_sheet_uri']).name}")
    say(f"    gallery        {Path(latest['gallery_uri']).name}")
    say(f"  index          {rel(latest['index_uri'])} ({latest['index_entries']} entries)")


def summary_of_night_two(result: dict[str, Any]) -> int:
    plan = result["plan"]
    say(
        f"Night 2 done in {result['seconds']:.1f} s: catalog unchanged → {plan.get('images')} images planned "
        f"({plan.get('unchanged')} already made, {plan.get('known_moderated')} refused before and not "
        "resent); generate skipped."
    )
    if result["posts"] is None:
        say("  real API: no ledger to read; the plan above sent nothing.")
        return 0 if plan.get("images") == 0 else 1
    total = result["ledger"]["posts"]
    say(
        f"  emulator ledger: {result['posts']} new submissions ({total} in total, all from night 1), "
        f"{result['ledger_credits']} new credits."
    )
    if result["posts"] != 0 or plan.get("images") != 0:
        say("  UNEXPECTED: the incremental night sent requests; this is a bug.")
        return 1
    return 0


def main() -> int:
    started = time.monotonic()
    os.environ["AIRFLOW_HOME"] = str(AIRFLOW_HOME)  # this process reads manifests with Airflow's storage
    say("Imagen provider demo: the nightly catalog DAG, twice (see dags/imagen_catalog_nightly.py).")
    shutil.rmtree(CATALOG_OUT, ignore_errors=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    AIRFLOW_HOME.mkdir(parents=True, exist_ok=True)
    with api() as target:
        env = airflow_env(target)
        say(f"Migrating the Airflow metadata DB (SQLite in {rel(AIRFLOW_HOME)}) …")
        seconds = airflow(["db", "migrate"], env, "db-migrate.log")
        say(f"  done in {seconds:.1f} s.")
        today = dt.datetime.now(dt.timezone.utc).date()
        first = night(1, today - dt.timedelta(days=1), env, target)
        summary_of_night_one(first)
        second = night(2, today, env, target)
        status = summary_of_night_two(second)
    say(f"\nDemo done in {time.monotonic() - started:.0f} s. Airflow logs: {rel(LOGS)}/")
    latest = json.loads((CATALOG_OUT / "latest.json").read_text())
    say(f"Look at the night: {rel(latest['contact_sheet_uri'])}")
    return status


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
