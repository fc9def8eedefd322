"""Command line: ``python -m airflow_provider_imagen.emulator`` runs the reAPI emulator in the foreground.

For demos and for users' CI jobs that want a local reAPI without writing Python. Prints one line with the base
URL and the API key, then serves until SIGINT or SIGTERM, and exits 0 after a clean shutdown.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any

import uvicorn

from airflow_provider_imagen.emulator.app import create_app
from airflow_provider_imagen.emulator.config import EmulatorConfig
from airflow_provider_imagen.emulator.server import base_url_for, bind_socket, uvicorn_config
from airflow_provider_imagen.emulator.state import EmulatorState

# (flag, config field, type, help). Flags left out keep the config's (or --fast's) value.
_KNOBS: tuple[tuple[str, str, Any, str], ...] = (
    ("--latency-mean", "latency_mean", float, "mean seconds a task takes (default 3.0)"),
    ("--latency-jitter", "latency_jitter", float, "uniform jitter around the mean, seconds (default 1.0)"),
    ("--seed", "seed", int, "seed for reproducible latencies and faults"),
    ("--image-ttl", "image_ttl", float, "seconds a media URL stays valid (default 86400)"),
    ("--image-scale", "image_scale", float, "shrink factor for rendered images (default 1.0)"),
    ("--moderation-rate", "moderation_rate", float, "probability 0..1 that a task is moderated"),
    ("--failure-rate", "failure_rate", float, "probability 0..1 that a task fails"),
    ("--rate-limit-rps", "rate_limit_rps", float, "per-key requests per second before 429 (default off)"),
    ("--error-rate-5xx", "error_rate_5xx", float, "probability 0..1 that an /api/v1 request answers 500"),
    ("--ambiguous-submit-rate", "ambiguous_submit_rate", float, "probability a submit creates a task + 502"),
    ("--response-delay", "response_delay", float, "seconds added to every /api/v1 answer"),
    (
        "--submit-answer-delay",
        "submit_answer_delay",
        float,
        "seconds a submit holds its answer back after creating and charging the task",
    ),
    ("--starting-balance", "starting_balance", int, "credits each key starts with (default 1000000)"),
    (
        "--max-concurrent-renders",
        "max_concurrent_renders",
        int,
        "tasks one key may have rendering at once; beyond it a submit answers 429 (default off)",
    ),
    ("--image-mode", "image_mode", str, "prompt: draw each prompt (default); stock: one image per ratio"),
)


def build_parser() -> argparse.ArgumentParser:
    """Return the CLI's argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m airflow_provider_imagen.emulator",
        description="Run a local reAPI emulator (imagen-4-0) in the foreground.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=8930, help="port to bind; 0 picks a free one (default 8930)"
    )
    parser.add_argument("--fast", action="store_true", help="latency 0.2 ± 0.1 s")
    for flag, dest, kind, text in _KNOBS:
        parser.add_argument(flag, dest=dest, type=kind, default=None, help=text)
    parser.add_argument(
        "--api-key",
        dest="api_keys",
        action="append",
        default=None,
        help="accepted API key (repeatable; default rk_emulator_key)",
    )
    parser.add_argument(
        "--revoked-key", dest="revoked_keys", action="append", default=None, help="revoked key"
    )
    return parser


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    """Turn parsed arguments into an :class:`EmulatorConfig`; raises ``ValueError`` on bad values."""
    fields: dict[str, Any] = {
        dest: getattr(args, dest) for _, dest, _, _ in _KNOBS if getattr(args, dest) is not None
    }
    for dest in ("api_keys", "revoked_keys"):
        if getattr(args, dest):
            fields[dest] = tuple(getattr(args, dest))
    return EmulatorConfig.fast(**fields) if args.fast else EmulatorConfig(**fields)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the emulator until SIGINT/SIGTERM; return the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        print(f"reAPI emulator: cannot bind {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    base_url = base_url_for(args.host, sock.getsockname()[1])
    app = create_app(state=EmulatorState(config), public_base_url=base_url)
    server = uvicorn.Server(uvicorn_config(app))

    def request_exit(signum: int, frame: FrameType | None) -> None:
        server.should_exit = True

    # uvicorn installs its own handlers while serving and re-raises the signal afterwards; these make that
    # re-raise harmless, so Ctrl-C and `kill` both end in a clean exit 0.
    signal.signal(signal.SIGINT, request_exit)
    signal.signal(signal.SIGTERM, request_exit)
    print(
        f"reAPI emulator running at {base_url} (API {base_url}/api/v1, "
        f"key {config.api_keys[0]}); Ctrl-C stops it",
        flush=True,
    )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    print("reAPI emulator stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
