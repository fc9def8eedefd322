"""``make demo``: make a few images end to end and say where they are.

Without ``REAPI_API_KEY`` it starts the local emulator (a few seconds of render latency); with it, it
talks to the real API and states the cost before spending anything.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from airflow_provider_imagen.api import ClientSettings, ImagenClient, ImagenError, ImageRequest
from airflow_provider_imagen.api.models import credits_to_usd, estimate_credits
from airflow_provider_imagen.batch.mirror import image_file_name, mirror_image
from airflow_provider_imagen.batch.storage import as_path
from airflow_provider_imagen.emulator import EmulatorConfig, EmulatorServer

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / ".demo" / "images"
PROMPTS = [
    ("teapot", "A ceramic teapot on a linen tablecloth, soft morning light, product photo", "1:1"),
    ("bike", "A red city bicycle leaning on a brick wall, golden hour, catalog hero shot", "16:9"),
    ("lamp", "一盏黄铜台灯放在木桌上，暖色灯光，产品摄影", "9:16"),
]


@contextlib.contextmanager
def api_settings() -> Iterator[ClientSettings]:
    key = os.environ.get("REAPI_API_KEY", "").strip()
    if key:
        cost = estimate_credits(len(PROMPTS))
        usd = credits_to_usd(cost)
        print(f"REAPI_API_KEY is set: using the REAL API; this spends {cost} credits (${usd}).")
        yield ClientSettings(api_key=key, base_url=os.environ.get("REAPI_BASE_URL", "https://reapi.ai"))
        return
    config = EmulatorConfig(latency_mean=3.0, latency_jitter=1.0)
    with EmulatorServer(config) as emulator:
        print(f"No REAPI_API_KEY: using the local emulator at {emulator.base_url} (nothing is spent).")
        yield ClientSettings(api_key=emulator.api_key, base_url=emulator.base_url)


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    with api_settings() as settings, ImagenClient(settings) as client:
        started = time.monotonic()
        tasks = {pid: (client.submit(ImageRequest(p, size=size)).id, size) for pid, p, size in PROMPTS}
        print(f"Submitted {len(tasks)} images; waiting for them to render…")
        pending = dict(tasks)
        while pending:
            time.sleep(1.0)
            for pid, (task_id, size) in list(pending.items()):
                task = client.get_task(task_id)
                if not task.is_terminal:
                    continue
                del pending[pid]
                if task.status == "failed":
                    print(f"  {pid}: failed ({task.error_code}: {task.error_message})")
                    continue
                image = mirror_image(client, task.image_url or "", as_path(OUT) / image_file_name(pid, size))
                print(f"  {pid}: {image.width}x{image.height}, {image.size_bytes} bytes -> {image.uri}")
        print(f"Done in {time.monotonic() - started:.1f} s. Images are in {OUT}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ImagenError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        sys.exit(1)
