"""Free checks made right before the first paid POST: can we write the results, can the account pay.

Why: a POST is paid at submit. An image paid for and then not writable (a read-only output folder, a
bucket the worker's role may not write) is money spent on nothing, and a submit that the account cannot
pay for is refused only after it reached the API. Both are found here for free:
- every location the run writes to (output, journal) gets a probe object written and deleted. On the
  local disk the folders the probe had to create are removed again, so a run stopped here leaves no trace;
- the balance read (a free GET) catches a wrong key, a wrong base URL or an unreachable API, and an
  account that cannot pay for a single image.

Nothing here writes to the journal: a try stopped by a preflight check has paid nothing to remember.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Mapping
from typing import Final

from airflow.sdk import ObjectStoragePath

from airflow_provider_imagen.api.errors import InsufficientCreditsError, LocationNotWritableError
from airflow_provider_imagen.api.models import CREDITS_PER_IMAGE
from airflow_provider_imagen.batch.storage import local_file

#: Name prefix of probe objects; starts with ``.`` so table readers and listings skip a leftover one.
PROBE_PREFIX: Final = ".imagen-write-probe-"
#: Tries of a local probe whose parent folder vanished meanwhile (a concurrent probe's clean-up).
_PROBE_ATTEMPTS: Final = 5


def probe_writable(path: ObjectStoragePath, parameter: str) -> None:
    """Write and delete a probe object in folder ``path``; raise naming ``parameter`` if that fails."""
    name = local_file(path)
    try:
        if name is None:
            probe = path / f"{PROBE_PREFIX}{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        else:
            _probe_local(name)
    except Exception as exc:  # any storage backend's error: permissions, missing bucket, a file in the way
        raise LocationNotWritableError(
            f"{parameter}={str(path)!r}: cannot write there ({type(exc).__name__}: {exc}); nothing was "
            f"submitted and nothing was charged. Give the workers write access to it, or set {parameter} "
            "to a location they can write"
        ) from exc


def _probe_local(folder: str) -> None:
    missing = []
    parent = folder
    while not os.path.lexists(parent):
        missing.append(parent)
        up = os.path.dirname(parent)
        if up == parent:
            break
        parent = up
    try:
        for attempt in range(_PROBE_ATTEMPTS):
            try:
                os.makedirs(folder, exist_ok=True)
                probe = os.path.join(folder, f"{PROBE_PREFIX}{uuid.uuid4().hex}")
                with open(probe, "wb"):
                    pass
                os.remove(probe)
                break
            except FileNotFoundError:
                # Another task's probe of a sibling folder removed the parent both had just made (tasks
                # of one backfill, each writing under a fresh shared folder): make it again.
                if attempt == _PROBE_ATTEMPTS - 1:
                    raise
    finally:
        for created in missing:  # deepest first; only what this probe made, and only if still empty
            try:
                os.rmdir(created)
            except OSError:
                break


def probe_locations(locations: Mapping[str, ObjectStoragePath]) -> None:
    """Probe every ``parameter → folder``; a folder shared by two parameters is probed once."""
    seen: set[str] = set()
    for parameter, path in locations.items():
        if str(path) not in seen:
            seen.add(str(path))
            probe_writable(path, parameter)


def require_one_image(balance: int, budget: int | None, *, nothing_paid_yet: Callable[[], bool]) -> None:
    """Refuse to start when neither the balance nor the budget pays for one image.

    ``nothing_paid_yet`` is asked only then: a retry whose earlier try already paid must go on (it
    re-attaches to paid tasks and mirrors them, for free), however low the balance is now.
    """
    short = balance < CREDITS_PER_IMAGE
    if not short and (budget is None or budget >= CREDITS_PER_IMAGE):
        return
    if not nothing_paid_yet():
        return
    if short:
        raise InsufficientCreditsError(
            f"the account's balance is {balance} credits, less than one image ({CREDITS_PER_IMAGE} "
            "credits); nothing was submitted. Top up and clear the task",
            status_code=402,
        )
    raise InsufficientCreditsError(
        f"the budget of this try is {budget} credits (max_credits capped at the balance by "
        f"check_balance=True), less than one image ({CREDITS_PER_IMAGE} credits); nothing was submitted",
        status_code=402,
    )
