"""An auth manager for the API tests: Airflow's simple auth manager, plus users limited to one DAG.

The simple auth manager gives a role's rights on every DAG at once; a user named ``only:<dag_id>`` here
reads that DAG and no other, so the tests can ask for one DAG's images as a reader of another.
"""

from __future__ import annotations

from typing import Any

from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager


class DagScopedAuthManager(SimpleAuthManager):
    def is_authorized_dag(
        self, *, method: Any, user: Any, access_entity: Any = None, details: Any = None
    ) -> bool:
        name = getattr(user, "username", "")
        if name.startswith("only:"):
            return method == "GET" and details is not None and details.id == name.removeprefix("only:")
        return super().is_authorized_dag(
            method=method, user=user, access_entity=access_entity, details=details
        )
