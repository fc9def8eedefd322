"""Leases on real storage: a local folder and a local S3 server (moto), claimed by racing threads."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import ObjectStoragePath

from airflow_provider_imagen.batch.fence import FencedError, claim, create_exclusive, find, latest_epoch
from airflow_provider_imagen.batch.journal import Journal


def test_claims_take_successive_epochs_and_only_the_newest_owns(tmp_path: Path) -> None:
    folder = ObjectStoragePath(str(tmp_path / "j"))
    first = claim(folder, owner="ti-1", try_number=1)
    second = claim(folder, owner="ti-2", try_number=2)
    assert (first.epoch, second.epoch) == (1, 2)
    second.check()  # the owner
    with pytest.raises(FencedError, match=r"lease 2, after this try's lease 1"):
        first.check()
    written = json.loads((tmp_path / "j" / "_leases" / "0000000001.json").read_text())
    assert written["owner"] == "ti-1" and written["try_number"] == 1 and written["pid"] > 0


def test_racing_claims_never_share_an_epoch(tmp_path: Path) -> None:
    """Twelve threads claim at once: every one gets its own epoch, and exactly one is the owner."""
    folder = ObjectStoragePath(str(tmp_path / "j"))
    leases: list[Any] = []
    start = threading.Barrier(12)

    def one(i: int) -> None:
        start.wait()
        leases.append(claim(folder, owner=f"ti-{i}"))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(lease.epoch for lease in leases) == list(range(1, 13))
    owners = []
    for lease in leases:
        try:
            lease.check()
            owners.append(lease.owner)
        except FencedError:
            pass
    assert len(owners) == 1


def test_a_resumed_try_finds_its_lease_by_epoch_or_by_owner(tmp_path: Path) -> None:
    folder = ObjectStoragePath(str(tmp_path / "j"))
    claim(folder, owner="ti-1")
    claim(folder, owner="ti-2")
    lease = find(folder, owner="ti-1")
    assert lease is not None and lease.epoch == 1
    assert find(folder, owner="ti-9") is None
    j = Journal(str(tmp_path), dag_id="d", task_id="t", run_id="r")
    j.claim("ti-a")
    assert j.resume("ti-a").epoch == 1  # nothing newer: the resumed try owns it again
    Journal(str(tmp_path), dag_id="d", task_id="t", run_id="r").claim("ti-b")
    with pytest.raises(FencedError):
        j.resume("ti-a")
    with pytest.raises(FencedError, match="holds no lease"):
        Journal(str(tmp_path), dag_id="d", task_id="t", run_id="r").resume("ti-unknown")


def test_create_exclusive_refuses_a_second_write_locally(tmp_path: Path) -> None:
    path = ObjectStoragePath(str(tmp_path / "x" / "lease.json"))
    create_exclusive(path, b"first")
    with pytest.raises(FileExistsError):
        create_exclusive(path, b"second")
    assert (tmp_path / "x" / "lease.json").read_bytes() == b"first"


def test_leases_on_s3_use_a_conditional_put(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On S3 the claim is a PUT with ``If-None-Match: *``: a second claim of the same epoch is refused
    by the server (412), so the claimer moves on to the next epoch."""
    extra = {"endpoint_url": s3_endpoint}
    monkeypatch.setenv(
        "AIRFLOW_CONN_FENCE_S3",
        json.dumps({"conn_type": "aws", "login": "k", "password": "s", "extra": extra}),
    )
    folder = ObjectStoragePath("s3://fence_s3@imagen/fence-test/journal")
    path = folder / "_leases" / "0000000001.json"
    create_exclusive(path, b"one")
    with pytest.raises(FileExistsError):
        create_exclusive(path, b"two")
    assert path.read_bytes() == b"one"
    second = claim(folder, owner="ti-2")
    assert second.epoch == 2 and latest_epoch(folder / "_leases") == 2
    second.check()
    claim(folder, owner="ti-3")
    with pytest.raises(FencedError):
        second.check()
