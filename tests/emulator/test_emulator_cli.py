"""``python -m airflow_provider_imagen.emulator``: flags, the startup line and a clean stop on signals."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import httpx
import pytest

from airflow_provider_imagen.emulator.__main__ import build_parser, config_from_args


def test_flags_map_to_config() -> None:
    flags = (
        "--latency-mean 1.5 --latency-jitter 0.5 --seed 9 --image-ttl 60 --moderation-rate 0.1"
        " --failure-rate 0.2 --rate-limit-rps 5 --error-rate-5xx 0.05 --ambiguous-submit-rate 0.01"
        " --response-delay 0.3 --starting-balance 460 --api-key rk_one_key --api-key rk_two_key"
    )
    args = build_parser().parse_args(flags.split())
    config = config_from_args(args)
    assert (config.latency_mean, config.latency_jitter, config.seed, config.image_ttl) == (1.5, 0.5, 9, 60)
    assert (config.moderation_rate, config.failure_rate, config.rate_limit_rps) == (0.1, 0.2, 5)
    assert (config.error_rate_5xx, config.ambiguous_submit_rate, config.response_delay) == (0.05, 0.01, 0.3)
    assert config.starting_balance == 460 and config.api_keys == ("rk_one_key", "rk_two_key")
    assert config.image_scale == 1.0

    fast = config_from_args(build_parser().parse_args(["--fast", "--latency-mean", "0.5"]))
    assert (fast.latency_mean, fast.latency_jitter, fast.image_scale) == (0.5, 0.1, 1.0)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cli_serves_and_stops_cleanly(sig: signal.Signals) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("VIRTUAL_ENV", None)
    cmd = [
        sys.executable,
        "-m",
        "airflow_provider_imagen.emulator",
        "--port",
        "0",
        "--fast",
        "--api-key",
        "rk_cli_key",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"running at (http://127\.0\.0\.1:\d+) .*key (\S+?)\)", line)
        assert match, line
        base_url, key = match.groups()
        assert key == "rk_cli_key"
        response = httpx.get(f"{base_url}/api/v1/balance", headers={"Authorization": f"Bearer {key}"})
        assert response.json() == {"balance": 1_000_000}
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "stopped" in out
    assert "Traceback" not in err
