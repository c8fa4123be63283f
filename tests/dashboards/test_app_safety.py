"""The dashboard as an attacker meets it (issue 16, point 2): forged callback requests, foreign Host headers
(DNS rebinding), oversized bodies, credentials in the store URI; and a damaged file in a store the
dashboard keeps serving (point 5). Requests go through Flask's test client: no browser, no socket."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moelab.dashboards.app import create_app
from moelab.dashboards.query import Reader
from moelab.platform.store import StoreError, check_store

LOCAL = {"Host": "127.0.0.1:8050"}


def _post(client, output, inputs, state=(), headers=LOCAL):
    """A callback request as the Dash renderer sends it, with values of our choosing."""
    out_id, out_prop = output.split(".")
    body = {"output": output, "outputs": {"id": out_id, "property": out_prop},
            "inputs": [{"id": i, "property": p, "value": v} for i, p, v in inputs],
            "state": [{"id": i, "property": p, "value": v} for i, p, v in state],
            "changedPropIds": [f"{inputs[0][0]}.{inputs[0][1]}"]}
    return client.post("/_dash-update-component", data=json.dumps(body), headers={
        **headers, "Content-Type": "application/json"})


@pytest.fixture
def attacked(tmp_path, make_dash_store):
    """A store, and next to it (outside the root) a file shaped like an experts batch of trial 'secret'."""
    info = make_dash_store(str(tmp_path / "store"), n_trials=5, n_steps=4)
    outside = tmp_path / "outside"
    outside.mkdir()
    pq.write_table(pa.table({"trial_id": ["secret"], "attempt": [0], "step": [1], "layer": pa.array([0], pa.int32()),
                             "expert": pa.array([0], pa.int32()), "load": pa.array([0.123456], pa.float32())}),
                   outside / "secret.a000.s000000001-000000001.parquet")
    app = create_app(info.root, refresh_s=0, prewarm=False)
    return info, app, app.server.test_client()


def test_a_forged_sweep_never_reaches_the_store(attacked):
    info, app, client = attacked
    traversal = f"{info.sweep}/../../../outside"  # ROOT/experts/sweep=S/../../../outside = the outside dir
    state = [("sweep", "value", traversal), ("status", "value", ["finished"]), ("family", "value", ["moe"]),
             ("experts-trial", "value", "secret"), ("experts-step", "value", None)]
    r = _post(client, "experts-download.data", [("experts-csv", "n_clicks", 1)], state)
    assert r.status_code == 204 and b"0.123" not in r.data  # refused: no download at all
    # a view callback with the same value says so instead of drawing
    view_inputs = [("view", "value", "experts"), ("sweep", "value", traversal), ("status", "value", ["finished"]),
                   ("family", "value", ["moe"]), ("tick", "n_intervals", 0), ("experts-trial", "value", "secret"),
                   ("experts-step", "value", None), ("experts-layer", "value", 0)]
    out = "..experts-heatmap.figure...experts-time.figure...experts-domain.figure...experts-special.figure..." \
          "experts-imbalance.figure...experts-note.children...experts-version.data.."
    body = {"output": out, "outputs": [{"id": o.split(".")[0], "property": o.split(".")[1]} for o in (
        "experts-heatmap.figure", "experts-time.figure", "experts-domain.figure", "experts-special.figure",
        "experts-imbalance.figure", "experts-note.children", "experts-version.data")],
            "inputs": [{"id": i, "property": p, "value": v} for i, p, v in view_inputs],
            "state": [{"id": "experts-version", "property": "data", "value": None}],
            "changedPropIds": ["sweep.value"]}
    r = client.post("/_dash-update-component", data=json.dumps(body),
                    headers={**LOCAL, "Content-Type": "application/json"})
    assert r.status_code == 200 and b"Refused: sweep" in r.data and b"0.123" not in r.data
    # a valid name that is not a sweep of this store is refused too; a bad trial name as well
    state[0] = ("sweep", "value", "no-such-sweep")
    assert _post(client, "experts-download.data", [("experts-csv", "n_clicks", 1)], state).status_code == 204
    state[0] = ("sweep", "value", info.sweep)
    state[3] = ("experts-trial", "value", "../../../outside/secret")
    assert _post(client, "experts-download.data", [("experts-csv", "n_clicks", 1)], state).status_code == 204
    # the reader refuses as well, whoever calls it
    with pytest.raises(StoreError, match="sweep"):
        app.reader.experts(traversal, "secret")
    with pytest.raises(StoreError, match="sweep"):
        app.reader.metrics(traversal, ["secret"], ["loss"])


def test_a_valid_download_still_works(attacked):
    info, _, client = attacked
    state = [("sweep", "value", info.sweep), ("status", "value", ["finished"]), ("family", "value", ["dense", "moe"]),
             ("runs-differ", "value", ["on"])]
    r = _post(client, "runs-download.data", [("runs-csv", "n_clicks", 1)], state)
    assert r.status_code == 200 and b"trial_id" in r.data


def test_foreign_host_headers_are_refused(attacked, dash_store):
    _, _, client = attacked
    for host in ("127.0.0.1:8050", "localhost:8050", "[::1]:8050", "LOCALHOST"):
        assert client.get("/", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example.com", "evil.example.com:8050", "127.0.0.1.evil.example.com", "0.0.0.0:8050"):
        r = client.get("/_dash-layout", headers={"Host": host})
        assert r.status_code == 403 and b"--allow-host" in r.data, host
    r = _post(client, "runs-download.data", [("runs-csv", "n_clicks", 1)], headers={"Host": "evil.example.com"})
    assert r.status_code == 403
    app = create_app(dash_store.root, refresh_s=0, prewarm=False, allowed_hosts=["box.lan"])
    c = app.server.test_client()
    assert c.get("/", headers={"Host": "box.lan:8050"}).status_code == 200
    assert c.get("/", headers={"Host": "evil.example.com"}).status_code == 403
    c = create_app(dash_store.root, refresh_s=0, prewarm=False, allowed_hosts=["*"]).server.test_client()
    assert c.get("/", headers={"Host": "anything.example"}).status_code == 200


def test_request_bodies_are_bounded(attacked):
    _, _, client = attacked
    r = client.post("/_dash-update-component", data=b"{" + b" " * (2 << 20) + b"}",
                    headers={**LOCAL, "Content-Type": "application/json"})
    assert r.status_code == 413


def test_credentials_in_the_store_uri_are_never_shown(tmp_path):
    uri = ("s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/results?endpoint_override=127.0.0.1:1&scheme=http"
           "&secret_key=TOPSECRET&session_token=TOKEN123")
    app = create_app(uri, refresh_s=0, prewarm=False)
    r = app.server.test_client().get("/_dash-layout", headers=LOCAL)
    text = r.data.decode().replace("\\u002f", "/")  # Dash escapes slashes in its JSON
    assert r.status_code == 200 and "store: s3://***@bucket/results?" in text and "secret_key=***" in text
    for secret in (b"wJalrXUtnFEMI", b"TOPSECRET", b"TOKEN123", b"AKIAEXAMPLE"):
        assert secret not in r.data
    assert "TOPSECRET" not in Reader(uri).display_uri


def test_the_dashboard_keeps_serving_a_store_with_a_damaged_file(tmp_path, make_dash_store):
    info = make_dash_store(str(tmp_path / "store"), n_trials=5, n_steps=4)
    part = tmp_path / "store" / "metrics" / f"sweep={info.sweep}"
    victim = sorted(part.iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:40])  # truncated by a failed copy
    trial = victim.name.split(".", 1)[0]
    reader = Reader(info.root)
    ids = list(reader.trials()["trial_id"])
    m = reader.metrics(info.sweep, ids, ["loss"])
    assert str(victim) in reader.warnings and set(m.trial_id) == set(ids) - {trial}
    with pytest.warns(UserWarning, match=victim.name):  # moelab.results names it too
        reader.results().metrics(sweep=info.sweep)
    report = check_store(info.root, repair=True)
    assert [p for p, _ in report.damaged] == [str(victim)] and not victim.exists()
    reader.metrics(info.sweep, ids, ["loss"])
    assert str(victim) not in reader.warnings
