"""Shared fixtures: a real S3-protocol server (moto's server mode) on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import sys
import uuid
from pathlib import Path

import pytest

S3_REGION = "us-east-1"
S3_KEY = "testing-key"
S3_SECRET = "testing-secret"


# The CLI through the interpreter running the tests: works wherever janus_job is importable, with or
# without the `janus-job` console script installed beside that interpreter.
JANUS_JOB = (sys.executable, "-m", "janus_job.cli")


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False,
                     help="also run the tests marked slow (multi-process runs: torchrun, DeepSpeed, the benches' "
                          "tiny modes); CI runs them")


def _leaves_out_slow(config) -> bool:
    """A folder's run (`pytest`, `pytest tests`) leaves the slow tests out unless --slow or -m asks for them;
    a test file or node id named on the command line runs whole."""
    if config.getoption("--slow") or config.option.markexpr:
        return False
    return all(Path(arg.split("::")[0]).is_dir() for arg in config.args)


def pytest_collection_modifyitems(config, items):
    if not _leaves_out_slow(config):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


def pytest_report_header(config):
    return "slow tests left out: pytest --slow runs them too (CI does)" if _leaves_out_slow(config) else None


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per usable core, at most 4 (each slow test starts several processes itself)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, 4))


def load_scaled(seconds: float) -> float:
    """A generous wait scaled by how busy the machine is (1-minute load per core, at least 1x): for
    the few waits that guard against a hang where no progress signal exists. Never a timing claim."""
    try:
        return seconds * max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
    except OSError:
        return seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL of a moto S3 server running in this process for the whole session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(monkeypatch):
    """Fake credentials and region, the way the chart provides them (env vars)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", S3_REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    return {
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": S3_REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@pytest.fixture
def s3_bucket(s3_server, s3_env):
    """A fresh, empty bucket on the moto server; returns its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3",
        endpoint_url=s3_server,
        region_name=S3_REGION,
        aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_SECRET,
    )
    client.create_bucket(Bucket=name)
    return name
