"""The figures the pages show, computed from manifest rows without I/O (so tests need no server).

- :func:`run_summary`: a run's header: counts per status, credits and dollars, images, wall time;
- :func:`spend_summary`: credits and images per day and per DAG, with the failure and moderation share
  per day.

Shares are of the requests that were sent (rows ``invalid``, ``skipped_budget``, ``not_submitted`` and
``rejected`` never reached the API, so they neither fail nor get moderated): *moderated* is the
``moderated`` rows, *failed* every other sent row that did not end ``completed``.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from airflow_provider_imagen.api.models import credits_to_usd
from airflow_provider_imagen.batch.status import STATUSES
from airflow_provider_imagen.ui.sources import NOT_SENT, WITH_IMAGE, ImageTask


def run_summary(rows: Iterable[Mapping[str, Any]], tasks: Iterable[ImageTask]) -> dict[str, Any]:
    """Return the header of a run's gallery."""
    rows = list(rows)
    tasks = list(tasks)
    counts = dict.fromkeys(STATUSES, 0)
    for row in rows:
        status = str(row.get("status"))
        counts[status] = counts.get(status, 0) + 1
    credits = sum(int(row.get("credits") or 0) for row in rows)
    starts = [t.start_date for t in tasks if t.start_date is not None]
    ends = [t.end_date for t in tasks if t.end_date is not None]
    wall = None
    if starts:
        running = any(t.end_date is None for t in tasks)
        end = dt.datetime.now(dt.timezone.utc) if running or not ends else max(ends)
        wall = max((end - min(starts)).total_seconds(), 0.0)
    return {
        "rows": len(rows),
        "images": sum(1 for row in rows if row.get("status") in WITH_IMAGE),
        "counts": {k: v for k, v in counts.items() if v},
        "credits": credits,
        "usd": credits_to_usd(credits),
        "wall_seconds": wall,
        "tasks": [
            {"task_id": t.task_id, "map_index": t.map_index, "state": t.state, "kind": t.kind} for t in tasks
        ],
    }


def spend_summary(runs: Iterable[tuple[ImageTask, Sequence[Mapping[str, Any]]]]) -> dict[str, Any]:
    """Return spend per day (of the run's start, UTC) and per DAG, over (task, its rows) pairs."""
    days: dict[str, dict[str, Any]] = defaultdict(_empty_day)
    dags: dict[str, dict[str, Any]] = defaultdict(_empty_dag)
    for task, rows in runs:
        when = task.run_start or task.start_date
        day = when.astimezone(dt.timezone.utc).date().isoformat() if when is not None else "unknown"
        bucket, dag = days[day], dags[task.dag_id]
        dag["runs"].add(task.run_id)
        for row in rows:
            status = row.get("status")
            credits = int(row.get("credits") or 0)
            for target in (bucket, dag):
                target["credits"] += credits
                target["requested"] += 1
                target["images"] += status in WITH_IMAGE
            if status not in NOT_SENT:
                bucket["sent"] += 1
                bucket["moderated"] += status == "moderated"
                bucket["failed"] += status not in ("completed", "moderated")
    day_rows = []
    for day in sorted(days, reverse=True):
        item = days[day]
        sent = item["sent"]
        day_rows.append(
            {
                "day": day,
                **item,
                "usd": credits_to_usd(item["credits"]),
                "failed_share": item["failed"] / sent if sent else 0.0,
                "moderated_share": item["moderated"] / sent if sent else 0.0,
            }
        )
    dag_rows = [
        {
            "dag_id": dag_id,
            "runs": len(item["runs"]),
            "requested": item["requested"],
            "images": item["images"],
            "credits": item["credits"],
            "usd": credits_to_usd(item["credits"]),
        }
        for dag_id, item in sorted(dags.items(), key=lambda kv: (-kv[1]["credits"], kv[0]))
    ]
    credits = sum(d["credits"] for d in day_rows)
    return {
        "days": day_rows,
        "dags": dag_rows,
        "credits": credits,
        "usd": credits_to_usd(credits),
        "images": sum(d["images"] for d in day_rows),
    }


def _empty_day() -> dict[str, Any]:
    return {"credits": 0, "requested": 0, "images": 0, "sent": 0, "failed": 0, "moderated": 0}


def _empty_dag() -> dict[str, Any]:
    return {"credits": 0, "requested": 0, "images": 0, "runs": set()}
