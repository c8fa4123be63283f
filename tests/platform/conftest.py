"""Fixtures for the platform tests and for later readers of the store (dashboard, notebook):

* `synthetic` (session): a small synthetic store (18 trials x 30 logged steps, one restarted and one
  diverged trial), built by moelab.platform.fixtures.synthetic_store; treat it as read-only.
* `make_store`: the generator itself, for a test that needs its own store (`make_store(tmp_path, ...)`).
* `s3_root`: an empty `s3://` root on a moto S3 server on 127.0.0.1 (skipped without moto), with the AWS
  environment pointed at it.
"""

from __future__ import annotations

import socket
import uuid

import pytest

from moelab.platform.fixtures import synthetic_store


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic-store")
    return synthetic_store(str(root), n_steps=30, batch_steps=12)


@pytest.fixture
def make_store():
    return synthetic_store


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    server_mod = pytest.importorskip("moto.server")
    port = _free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_root(s3_server, monkeypatch):
    import pyarrow.fs as pafs

    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    bucket = f"moelab-{uuid.uuid4().hex[:8]}"
    query = f"endpoint_override=http://{s3_server}&scheme=http&region=us-east-1&allow_bucket_creation=true"
    fs, _ = pafs.FileSystem.from_uri(f"s3://{bucket}?{query}")
    fs.create_dir(bucket)
    return f"s3://{bucket}/results?{query}"
