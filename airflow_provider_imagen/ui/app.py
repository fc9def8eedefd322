"""The plugin's FastAPI app, mounted by Airflow's API server at ``/imagen``: two pages and their data.

Routes (every one behind Airflow's own auth-manager dependencies; none takes a path):

- ``GET /dags/{dag_id}/runs/{run_id}/gallery``: the run's gallery page (shown in the run's tab);
- ``GET /api/dags/{dag_id}/runs/{run_id}``: its tiles and header, as JSON;
- ``GET /api/dags/{dag_id}/runs/{run_id}/images/{sha256}`` and ``…/thumbs/{sha256}``: one listed image,
  full size or as a cached thumbnail;
- ``GET /spend`` and ``GET /api/spend?days=N``: the spend overview and its data.

Run routes require read access to the DAG's runs (``requires_access_dag("GET", RUN)``, the check
Airflow's own DAG-run endpoints use); the spend routes an authenticated user, and count only the DAGs
that user may read. An image is found by the sha256 a manifest row of that very run lists, so no value
of the request ever becomes a file name.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from functools import cache
from importlib import resources
from typing import Annotated, Any, Final

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from airflow_provider_imagen.ui import files, sources
from airflow_provider_imagen.ui.links import spend_url
from airflow_provider_imagen.ui.summary import run_summary, spend_summary

#: The spend overview's default period, in days (``[imagen] ui_spend_days``).
DEFAULT_SPEND_DAYS: Final = 30
#: The longest period the spend overview reads.
MAX_SPEND_DAYS: Final = 366

_SHA256 = Annotated[str, Path(pattern=r"^[0-9a-f]{64}$", description="sha256 of a listed image")]
_READ_RUN = [Depends(requires_access_dag(method="GET", access_entity=DagAccessEntity.RUN))]
#: Content-addressed: an image or thumbnail of a sha256 never changes.
_IMMUTABLE = {"Cache-Control": "private, max-age=604800, immutable", "X-Content-Type-Options": "nosniff"}


def create_app() -> FastAPI:
    """Return the app the plugin mounts (one per API server process)."""
    app = FastAPI(
        title="Imagen",
        description="The Imagen provider's gallery and spend pages, and their data.",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    @app.get("/dags/{dag_id}/runs/{run_id}/gallery", dependencies=_READ_RUN, response_class=HTMLResponse)
    def gallery_page(request: Request, dag_id: str, run_id: str) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        api = f"{root}/api/dags/{_q(dag_id)}/runs/{_q(run_id)}"
        return _page("gallery.html", {"api": api, "spend": spend_url()}, root=root)

    @app.get("/api/dags/{dag_id}/runs/{run_id}", dependencies=_READ_RUN)
    def run_data(dag_id: str, run_id: str, session: SessionDep) -> JSONResponse:
        state = _run_state(session, dag_id, run_id)
        tasks = sources.find_image_tasks(session, dag_id=dag_id, run_id=run_id)
        found = sources.read_run_rows(tasks)
        tiles = [sources.public_row(row) for row in found.rows]
        sizes: dict[str, int] = {}
        for tile in tiles:
            sizes[tile["size"]] = sizes.get(tile["size"], 0) + 1
        body = {
            "dag_id": dag_id,
            "run_id": run_id,
            "state": state,
            "header": run_summary(found.rows, tasks),
            "sizes": dict(sorted(sizes.items())),
            "tiles": tiles,
            "problems": found.problems,
        }
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    @app.get("/api/dags/{dag_id}/runs/{run_id}/images/{key}", dependencies=_READ_RUN)
    def image(dag_id: str, run_id: str, key: _SHA256, session: SessionDep) -> Response:
        row = _listed(session, dag_id, run_id, key)
        try:
            data, kind = files.read_listed_image(str(row["image_uri"]), key)
        except files.ImageUnavailable as exc:
            raise HTTPException(status_code=410, detail=f"image not available: {exc}") from exc
        return Response(data, media_type=kind, headers=_IMMUTABLE)

    @app.get("/api/dags/{dag_id}/runs/{run_id}/thumbs/{key}", dependencies=_READ_RUN)
    def thumb(dag_id: str, run_id: str, key: _SHA256, session: SessionDep) -> Response:
        row = _listed(session, dag_id, run_id, key)
        try:
            data = files.thumbnail(str(row["image_uri"]), key)
        except files.ImageUnavailable as exc:
            raise HTTPException(status_code=410, detail=f"image not available: {exc}") from exc
        return Response(data, media_type="image/jpeg", headers=_IMMUTABLE)

    @app.get("/spend", response_class=HTMLResponse)
    def spend_page(request: Request, user: GetUserDep) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _page("spend.html", {"api": f"{root}/api/spend", "days": spend_days()}, root=root)

    @app.get("/static/cjk.ttf")
    def cjk_font(user: GetUserDep) -> Response:
        # Prompts in Chinese must read as text on machines without a CJK font: the emulator's subset
        # (GB 2312 level 1, Apache-2.0) serves here too, for those characters only (unicode-range).
        return Response(_font(), media_type="font/ttf", headers=_IMMUTABLE)

    @app.get("/api/spend")
    def spend_data(
        user: GetUserDep,
        session: SessionDep,
        days: Annotated[int | None, Query(ge=1, le=MAX_SPEND_DAYS)] = None,
    ) -> JSONResponse:
        from airflow.api_fastapi.app import get_auth_manager

        period = days or spend_days()
        readable = get_auth_manager().get_authorized_dag_ids(user=user, method="GET")
        since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=period)
        tasks = sources.find_image_tasks(session, dag_ids=sorted(readable), since=since) if readable else []
        pairs, seen = [], set()
        for task in tasks:
            if task.manifest_uri is not None:
                if task.manifest_uri in seen:
                    continue  # named by two tasks of a run (a publish step's result, say): counted once
                seen.add(task.manifest_uri)
            pairs.append((task, sources.read_run_rows([task]).rows))
        body = {"period_days": period, **spend_summary(pairs)}
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    return app


def spend_days() -> int:
    """Return the spend overview's default period (``[imagen] ui_spend_days``)."""
    from airflow.configuration import conf

    days = conf.getint("imagen", "ui_spend_days", fallback=DEFAULT_SPEND_DAYS)
    return min(max(days, 1), MAX_SPEND_DAYS)


def _listed(session: Any, dag_id: str, run_id: str, key: str) -> dict[str, Any]:
    tasks = sources.find_image_tasks(session, dag_id=dag_id, run_id=run_id)
    row = sources.find_listed(sources.read_run_rows(tasks).rows, key)
    if row is None:
        raise HTTPException(status_code=404, detail="no image with this sha256 is listed for this run")
    return dict(row)


def _run_state(session: Any, dag_id: str, run_id: str) -> str | None:
    from airflow.models.dagrun import DagRun
    from sqlalchemy import select

    state = session.scalar(select(DagRun.state).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
    if state is None:
        raise HTTPException(status_code=404, detail="no such DAG run")
    return str(state)


def _q(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")


@cache
def _asset(name: str) -> str:
    return (
        resources.files("airflow_provider_imagen.ui")
        .joinpath("static")
        .joinpath(name)
        .read_text(encoding="utf-8")
    )


@cache
def _font() -> bytes:
    fonts = resources.files("airflow_provider_imagen.emulator").joinpath("fonts")
    return fonts.joinpath("WenQuanYiMicroHei-subset.ttf").read_bytes()


def _page(name: str, config: dict[str, Any], *, root: str = "") -> HTMLResponse:
    """Return a page with its styles and scripts inline, allowed by a per-response nonce only."""
    nonce = secrets.token_urlsafe(16)
    # "</" cannot close the script element from inside the JSON.
    data = json.dumps(config).replace("</", "<\\/")
    html = (
        _asset(name)
        .replace("__COMMON_CSS__", _asset("common.css").replace("__FONT_URL__", f"{root}/static/cjk.ttf"))
        .replace("__COMMON_JS__", _asset("common.js"))
        .replace("__CONFIG__", data)
        .replace("__NONCE__", nonce)
    )
    policy = (
        "default-src 'none'; img-src 'self'; connect-src 'self'; font-src 'self'; "
        f"style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; "
        "frame-ancestors 'self'; base-uri 'none'; form-action 'none'"
    )
    headers = {
        "Content-Security-Policy": policy,
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
    }
    return HTMLResponse(html, headers=headers)
