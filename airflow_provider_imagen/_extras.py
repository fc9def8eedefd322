"""The provider's optional parts, and the error that names the extra a missing library comes with.

The core install (operators, hooks, triggers, the client) needs Airflow, httpx, aiohttp and pyarrow. The
local API emulator and the publishing helpers need more; importing them without it should say which
extra to install rather than only which module is missing.
"""

from __future__ import annotations

import importlib.util
from typing import Final

#: The top-level modules each extra brings, as ``import`` spells them.
EXTRA_MODULES: Final[dict[str, tuple[str, ...]]] = {
    "emulator": ("fastapi", "uvicorn", "PIL"),
    "publish": ("pandas", "PIL"),
}
#: Distribution names where they differ from the module's.
_DISTRIBUTIONS: Final = {"PIL": "pillow"}


def require_extra(extra: str, *, feature: str) -> None:
    """Raise ``ImportError`` naming ``extra`` if a module it brings is not installed."""
    missing = [name for name in EXTRA_MODULES[extra] if importlib.util.find_spec(name) is None]
    if missing:
        names = ", ".join(_DISTRIBUTIONS.get(name, name) for name in missing)
        raise ImportError(
            f"{feature} needs {names}, which the core install leaves out: "
            f"pip install 'airflow-provider-imagen[{extra}]'",
            name=missing[0],
        )
