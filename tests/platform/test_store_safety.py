"""The store under hostile names and faults (issue 16, points 2 to 5): paths out of the root, symlinks,
a full disk, an object store that fails part-way through an upload, concurrent trial updates, damaged files
and `moelab store check`, two writers of one sweep."""

import os
import threading
import subprocess
import sys
import time
import warnings

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

import moelab.results as mr
from moelab.cli import main
from moelab.platform import store as store_mod
from moelab.platform.store import (DamagedFileWarning, Lease, LeaseHeld, Store, StoreError, check_store, list_files,
                                   list_sweeps, redact_uri)


def rows(steps, loss0=5.0):
    return [dict(step=s, loss=loss0 - s / 1000, expert_load=[[0.5, 0.5]]) for s in steps]


def metric_files(root, sweep="sw"):
    d = os.path.join(root, "metrics", f"sweep={sweep}")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


# ----------------------------------------------------------------------------------------------------------
# Names and paths


def test_write_batch_refuses_anything_but_a_file_name(tmp_path):
    st = Store(tmp_path / "store")
    t = pa.table({"trial_id": ["x"]})
    for name in ("../../../x.parquet", "a/b.parquet", "..parquet", ".hidden.parquet", "x.parquet/..", "x.csv",
                 "/etc/x.parquet", "x..parquet"):
        with pytest.raises(StoreError, match="file name"):
            st.write_batch("metrics", "sw", name, t)
    with pytest.raises(StoreError, match="table"):
        st.write_batch("../metrics", "sw", "x.parquet", t)
    with pytest.raises(StoreError, match="sweep"):
        st.write_batch("metrics", "sw/../..", "x.parquet", t)
    written = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert written == []


def _outside_store(tmp_path):
    """A store with one sweep, and next to it (outside the root) a directory holding Parquet files shaped
    like the store's: what a traversal would read."""
    root = tmp_path / "store"
    st = Store(root)
    st.write_trial({"sweep": "sw", "trial_id": "t", "status": "finished"})
    st.append_metrics("sw", "t", 0, rows([1, 2]))
    st.close()
    outside = tmp_path / "outside"
    outside.mkdir()
    pq.write_table(pa.table({"trial_id": ["secret"], "status": ["finished"], "password": ["hunter2"]}),
                   outside / "secret.parquet")
    pq.write_table(pa.table({"trial_id": ["secret"], "attempt": [0], "step": [1], "loss": [0.0]}),
                   outside / "secret.a000.s000000001-000000001.parquet")
    return root, outside


def test_readers_refuse_names_that_leave_the_root(tmp_path):
    root, _ = _outside_store(tmp_path)
    r = mr.open(root)
    # ROOT/trials/sweep=sw/../../../outside is tmp_path/outside
    for bad in ("sw/../../../outside", "../outside", "sw/..", "", "a b"):
        with pytest.raises(StoreError, match="sweep"):
            r.trials(sweep=bad)
        with pytest.raises(StoreError, match="sweep"):
            r.metrics(sweep=[bad])
    with pytest.raises(StoreError, match="trial_id"):
        r.metrics(sweep="sw", trials=["../x"])
    assert len(r.trials(sweep="sw")) == 1 and r.metrics(sweep="sw").step.tolist() == [1, 2]


def test_listing_never_follows_symlinks_out_of_the_root(tmp_path):
    root, outside = _outside_store(tmp_path)
    part = root / "trials" / "sweep=sw"
    (part / "evil.parquet").symlink_to(outside / "secret.parquet")
    (root / "trials" / "sweep=linked").symlink_to(outside, target_is_directory=True)
    (root / "metrics" / "sweep=linked").symlink_to(outside, target_is_directory=True)
    (part / "inside.parquet").symlink_to(part / "t.parquet")  # a link that stays inside is followed
    r = mr.open(root)
    assert r.sweeps() == ["sw"]
    t = r.trials_arrow()  # the raw rows: t.parquet and the link to it
    assert t.column("trial_id").to_pylist() == ["t", "t"] and "password" not in t.column_names
    assert r.metrics().trial_id.unique().tolist() == ["t"]
    assert r.trials(sweep="linked").empty and r.metrics(sweep="linked").empty  # named directly: still not followed


@pytest.mark.timeout(60)
def test_a_symlink_loop_does_not_hang_a_listing(tmp_path):
    root, _ = _outside_store(tmp_path)
    d = root / "metrics" / "sweep=sw" / "deeper"
    d.mkdir()
    (d / "loop").symlink_to(root, target_is_directory=True)  # ROOT/metrics/sweep=sw/deeper/loop/metrics/...
    (root / "metrics" / "sweep=sw" / "self").symlink_to(root / "metrics" / "sweep=sw", target_is_directory=True)
    t0 = time.monotonic()
    assert [p.rsplit("/", 1)[1] for p in list_files(pafs.LocalFileSystem(), str(root), "metrics")] == \
        ["t.a000.s000000001-000000002.parquet"]
    assert len(mr.open(root).metrics()) == 2 and time.monotonic() - t0 < 10


def test_credentials_are_never_printed():
    uri = "s3://AKIAXXXX:wJalrSECRET@bucket/results?endpoint_override=host:9000&secret_key=S3CR3T&region=eu"
    shown = redact_uri(uri)
    assert "wJalrSECRET" not in shown and "S3CR3T" not in shown and "AKIAXXXX" not in shown
    assert shown.startswith("s3://***@bucket/results?") and "endpoint_override=host:9000" in shown
    assert "region=eu" in shown
    assert redact_uri("s3://b/p?access_key=A&session_token=T") == "s3://b/p?access_key=***&session_token=***"
    assert redact_uri("/data/results") == "/data/results"
    st = Store(uri, filesystem=pafs.LocalFileSystem())
    assert "S3CR3T" not in repr(st) and "wJalrSECRET" not in repr(st)


# ----------------------------------------------------------------------------------------------------------
# Writes that do not lose rows


def test_a_failed_flush_keeps_the_rows_and_a_later_flush_writes_them(tmp_path, monkeypatch):
    st = Store(tmp_path, batch_rows=10**6)
    st.append_metrics("sw", "t", 0, rows(range(1, 501)))
    real = pq.write_table

    def disk_full(table, where, **kw):
        with open(where, "wb") as f:
            f.write(b"PAR1" + b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_mod.pq, "write_table", disk_full)
    with pytest.raises(OSError, match="500 metric rows .* kept in memory.*No space left"):
        st.flush()
    assert st.pending_rows() == 500 and metric_files(tmp_path) == []
    monkeypatch.setattr(store_mod.pq, "write_table", real)
    assert st.flush() == 2
    m = mr.open(tmp_path).metrics()
    assert m.step.tolist() == list(range(1, 501)) and st.pending_rows() == 0


def test_an_automatic_flush_that_fails_retries_later_without_raising(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(store_mod.time, "monotonic", lambda: clock[0])
    st = Store(tmp_path, batch_rows=10, retry_s=5)
    fail = [True]
    real = store_mod.put_table

    def flaky(fs, path, table, compression="snappy"):
        if fail[0]:
            raise OSError("No space left on device")
        real(fs, path, table, compression)

    monkeypatch.setattr(store_mod, "put_table", flaky)
    st.append_metrics("sw", "t", 0, rows(range(1, 11)))  # reaches batch_rows: the write fails, rows kept
    assert st.pending_rows() == 10 and "No space left" in st.last_error
    fail[0] = False
    st.append_metrics("sw", "t", 0, rows(range(11, 13)))  # within the back-off: no new attempt yet
    assert st.pending_rows() == 12
    clock[0] = 6.0
    st.append_metrics("sw", "t", 0, rows(range(13, 14)))
    assert st.pending_rows() == 0
    assert mr.open(tmp_path).metrics().step.tolist() == list(range(1, 14))


def test_a_flush_that_fails_between_tables_leaves_no_duplicate_batch(tmp_path, monkeypatch):
    st = Store(tmp_path, batch_rows=10**6)
    st.append_metrics("sw", "t", 0, rows([1, 2, 3]))
    real = Store.write_batch

    def experts_fail(self, table_name, sweep, name, table):
        if table_name == "experts":
            raise OSError("connection reset")
        return real(self, table_name, sweep, name, table)

    monkeypatch.setattr(Store, "write_batch", experts_fail)
    with pytest.raises(OSError):
        st.flush()
    assert metric_files(tmp_path) == ["t.a000.s000000001-000000003.parquet"]  # published before the failure
    monkeypatch.setattr(Store, "write_batch", real)
    st.append_metrics("sw", "t", 0, rows([4]))
    st.flush()
    assert metric_files(tmp_path) == ["t.a000.s000000001-000000004.parquet"]  # the narrower one is gone
    r = mr.open(tmp_path)
    assert r.metrics().step.tolist() == [1, 2, 3, 4] and r.experts().step.tolist() == [1, 1, 2, 2, 3, 3, 4, 4]


def test_concurrent_updates_of_a_trial_row_keep_every_field(tmp_path, monkeypatch):
    """Two Store objects (a controller's and a sink's, say) update one trial at the same time; each must
    see the other's fields. A slow read widens the read-modify-write window to make the race certain."""
    Store(tmp_path).write_trial({"sweep": "sw", "trial_id": "t", "status": "running", "seed": 3})
    real = pq.read_table

    def slow_read(*a, **kw):
        out = real(*a, **kw)
        time.sleep(0.3)
        return out

    monkeypatch.setattr(store_mod.pq, "read_table", slow_read)
    start = threading.Barrier(2)
    errors = []

    def update(fields):
        try:
            start.wait()
            Store(tmp_path).update_trial("sw", "t", **fields)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=update, args=(f,)) for f in
               ({"status": "finished", "final_loss": 2.5}, {"checkpoint": "/ckpt/t", "wall_s": 12.0})]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    monkeypatch.setattr(store_mod.pq, "read_table", real)
    row = Store(tmp_path).read_trial("sw", "t")
    assert (row["status"], row["final_loss"], row["checkpoint"], row["wall_s"], row["seed"]) == \
        ("finished", 2.5, "/ckpt/t", 12.0, 3)


# -- an object store that fails part-way --------------------------------------------------------------------


class _Cut:
    """An output stream that breaks after `limit` bytes. mode "raise": it then completes the upload of what it
    has (apache/arrow#40502: a failed multipart upload is finished on close) and raises; mode "silent": it
    drops the rest and reports success."""

    def __init__(self, inner, limit, mode):
        self.inner, self.limit, self.mode, self.n, self.closed = inner, limit, mode, 0, False

    def write(self, data):
        data = bytes(data)
        room = max(self.limit - self.n, 0)
        self.inner.write(data[:room])
        self.n += len(data)
        if len(data) > room and self.mode == "raise":
            self.close()
            raise OSError("connection reset during upload")
        return len(data)

    def flush(self):
        pass

    def close(self):
        if not self.closed:
            self.closed = True
            self.inner.close()

    def tell(self):
        return self.n

    def writable(self):
        return True


class _Flaky(pafs.FileSystemHandler):
    """pyarrow.fs handler over a real filesystem whose uploads break as `_Cut` says while `cut` is set."""

    def __init__(self, fs):
        self.fs, self.cut = fs, None

    def get_type_name(self):
        return "flaky"

    def normalize_path(self, path):
        return path

    def equals(self, other):
        return self is other

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("not here")

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path)

    def open_output_stream(self, path, metadata):
        inner = self.fs.open_output_stream(path)
        if self.cut is None:
            return inner
        return pa.PythonFile(_Cut(inner, *self.cut), mode="w")


@pytest.fixture
def flaky_s3(s3_root):
    fs, path = pafs.FileSystem.from_uri(s3_root)
    handler = _Flaky(fs)
    return handler, pafs.PyFileSystem(handler), path, s3_root


@pytest.mark.parametrize("mode", ["raise", "silent"])
def test_object_store_upload_failing_part_way_publishes_nothing(flaky_s3, mode):
    handler, fs, path, uri = flaky_s3
    st = Store(path, filesystem=fs, batch_rows=10**6)
    assert not st.local
    st.write_trial({"sweep": "sw", "trial_id": "t", "status": "running", "seed": 1})
    st.append_metrics("sw", "t", 0, rows(range(1, 101)))
    handler.cut = (300, mode)  # every upload now breaks after 300 bytes
    with pytest.raises(OSError):
        st.update_trial("sw", "t", status="finished", final_loss=1.5)
    with pytest.raises(OSError):
        st.flush()
    assert st.pending_rows() == 100
    r = mr.open(uri)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DamagedFileWarning)  # nothing half-written is even visible
        t = r.trials()
        assert t.status.tolist() == ["running"] and t.seed.tolist() == [1]  # the old row, whole
        assert r.metrics().empty
    handler.cut = None
    st.flush()
    st.update_trial("sw", "t", status="finished", final_loss=1.5)
    assert r.metrics().step.tolist() == list(range(1, 101)) and r.trials().status.tolist() == ["finished"]
    assert not [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                if i.base_name.startswith(".tmp-")]  # temp keys cleaned up


# ----------------------------------------------------------------------------------------------------------
# Damaged files


def _damaged_store(tmp_path):
    root = tmp_path / "store"
    st = Store(root, batch_rows=10**6)
    for tid in ("a", "b"):
        st.write_trial({"sweep": "sw", "trial_id": tid, "status": "finished"})
        st.append_metrics("sw", tid, 0, rows([1, 2]))
        st.flush()
        st.append_metrics("sw", tid, 0, rows([3, 4]))
        st.flush()
    part = root / "metrics" / "sweep=sw"
    bad = part / "b.a000.s000000003-000000004.parquet"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    (root / "trials" / "sweep=sw" / "c.parquet").write_bytes(b"PAR1 not really")
    return root, st, bad


def test_readers_skip_a_damaged_file_naming_it(tmp_path):
    root, _, bad = _damaged_store(tmp_path)
    r = mr.open(root)
    with pytest.warns(DamagedFileWarning, match=str(bad)):
        m = r.metrics()
    assert m.groupby("trial_id").step.apply(list).to_dict() == {"a": [1, 2, 3, 4], "b": [1, 2]}
    with pytest.warns(DamagedFileWarning, match="c.parquet"):
        assert sorted(r.trials().trial_id) == ["a", "b"]
    with pytest.warns(DamagedFileWarning):
        assert r.sql("SELECT count(*) AS n FROM metrics").n[0] == 6
    assert str(bad) in r.skipped


def test_compaction_merges_around_a_damaged_file(tmp_path):
    root, st, bad = _damaged_store(tmp_path)
    st.append_metrics("sw", "b", 0, rows([7, 8]))
    st.flush()
    with pytest.warns(DamagedFileWarning, match=bad.name):
        st.compact("sw")
    left = metric_files(root)
    assert bad.name in left and "a.a000.s000000001-000000004.parquet" in left
    with pytest.warns(DamagedFileWarning):
        m = mr.open(root).metrics()
    assert m[m.trial_id == "b"].step.tolist() == [1, 2, 7, 8]


def test_store_check_lists_and_quarantines(tmp_path, capsys):
    root, st, bad = _damaged_store(tmp_path)
    part = root / "metrics" / "sweep=sw"
    tmp = part / ".tmp-0123-a.a000.s000000009-000000009.parquet"
    tmp.write_bytes(b"PAR1 half")
    os.utime(tmp, (time.time() - 7200, time.time() - 7200))
    fresh = part / ".tmp-4567-a.a000.s000000010-000000010.parquet"
    fresh.write_bytes(b"PAR1 half")  # a write in progress right now: left alone
    st.append_metrics("sw", "ghost", 0, rows([1]))  # a trial without a trial row
    st.flush()
    report = check_store(root)
    assert {p for p, _ in report.damaged} == {str(bad), str(root / "trials" / "sweep=sw" / "c.parquet")}
    assert {p.rsplit("/", 1)[1] for p, _ in report.orphans} == {
        tmp.name, "ghost.a000.s000000001-000000001.parquet"}
    assert main(["store", "check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "damaged  metrics/sweep=sw/" + bad.name in out and "--repair" in out
    assert main(["store", "check", str(root), "--repair"]) == 0
    out = capsys.readouterr().out
    assert "_quarantine/" in out and bad.exists() is False and tmp.exists() is False and fresh.exists()
    moved = [os.path.join(d, f) for d, _, fs in os.walk(root / "_quarantine") for f in fs]
    assert len(moved) == 5 and any(m.endswith("metrics/sweep=sw/" + bad.name) for m in moved)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DamagedFileWarning)
        r = mr.open(root)
        assert sorted(r.trials().trial_id) == ["a", "b"] and len(r.metrics()) == 6
    assert check_store(root).ok and list_sweeps(pafs.LocalFileSystem(), str(root)) == ["sw"]
    assert main(["store", "check", str(tmp_path / "nowhere")]) == 2
    with pytest.raises(SystemExit):
        main(["store", "check", "--help"])
    assert "moelab store check results/ --repair" in capsys.readouterr().out


def test_a_second_repair_keeps_the_batches_of_a_quarantined_trial_row(tmp_path):
    """A damaged trial row is moved aside; the trial's readable metric batches are its data (shown again when
    the row is moved back), so a second repair must not sweep them away as orphans."""
    root = tmp_path / "store"
    st = Store(root)
    st.write_trial({"sweep": "sw", "trial_id": "c", "status": "finished"})
    st.append_metrics("sw", "c", 0, rows([1, 2]))
    st.flush()
    row = root / "trials" / "sweep=sw" / "c.parquet"
    row.write_bytes(row.read_bytes()[:40])
    first = check_store(root, repair=True)
    assert [p for p, _ in first.damaged] == [str(row)] and not first.orphans
    second = check_store(root, repair=True)
    assert second.ok and not second.moved
    assert len(list((root / "metrics" / "sweep=sw").glob("c.*.parquet"))) == 1
    st.append_metrics("sw", "ghost", 0, rows([1]))  # a batch whose trial never had a row is still an orphan
    st.flush()
    assert {p.rsplit("/", 1)[1].split(".")[0] for p, _ in check_store(root).orphans} == {"ghost"}


# ----------------------------------------------------------------------------------------------------------
# One writer per sweep


def test_a_second_writer_of_a_sweep_is_refused_naming_the_owner(tmp_path):
    st = Store(tmp_path)
    with st.lease("sw", owner="alice@node1 pid 42", settle_s=0, heartbeat_s=0.05):
        with pytest.raises(LeaseHeld, match=r"sweep 'sw' .* written by alice@node1 pid 42 \(host .*heartbeat"):
            Store(tmp_path).lease("sw", settle_s=0).acquire()
        time.sleep(0.2)  # heartbeats keep it live
        assert Lease.live(st.lease("sw").read())
        with Store(tmp_path).lease("other", settle_s=0):  # other sweeps are free
            pass
    assert st.lease("sw").read() is None  # released on exit
    with Store(tmp_path).lease("sw", settle_s=0):
        pass


def test_a_crashed_owner_releases_once_its_heartbeat_lapses(tmp_path):
    crashed = Store(tmp_path).lease("sw", owner="crashed", ttl_s=0.5, heartbeat_s=3600, settle_s=0).acquire()
    with pytest.raises(LeaseHeld, match="crashed"):
        Store(tmp_path).lease("sw", settle_s=0).acquire()
    time.sleep(0.6)  # no heartbeat came: the owner is gone
    with Store(tmp_path).lease("sw", owner="next", settle_s=0) as lease:
        assert lease.read()["owner"] == "next"
        crashed.release()  # a late release of the crashed one must not remove the new owner's lease
        assert lease.read()["owner"] == "next"


def test_a_killed_owner_on_this_host_frees_the_lease_at_once(tmp_path):
    """kill -9 / the OOM killer: the owner's process is gone, so `--resume` need not wait out its ttl. An owner
    on another host (whose pid means nothing here) still holds it until its heartbeat lapses."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    pid = int(gone.stdout)  # exited: no such process now
    dead = Store(tmp_path).lease("sw", owner=f"killed pid {pid}", settle_s=0)
    dead.pid = pid
    dead._write()
    with Store(tmp_path).lease("sw", owner="next", settle_s=0) as lease:
        assert lease.read()["owner"] == "next"
    elsewhere = Store(tmp_path).lease("sw", owner=f"remote pid {pid}", settle_s=0)
    elsewhere.pid, elsewhere.host = pid, "another-host.example"
    elsewhere._write()
    with pytest.raises(LeaseHeld, match="remote pid"):
        Store(tmp_path).lease("sw", settle_s=0).acquire()
    alive = Store(tmp_path).lease("sw", owner=f"alive pid {os.getppid()}", settle_s=0)
    alive.pid = os.getppid()  # a live process on this host (this test's parent)
    alive._write()
    with pytest.raises(LeaseHeld, match="alive pid"):
        Store(tmp_path).lease("sw", settle_s=0).acquire()


def test_an_owner_that_was_taken_over_knows_it(tmp_path):
    lease = Store(tmp_path).lease("sw", heartbeat_s=0.05, settle_s=0).acquire()
    other = Store(tmp_path).lease("sw", settle_s=0)
    other._write()  # as if this one had stalled past its ttl and another process took over
    time.sleep(0.3)
    assert lease.lost
    lease.release()
    assert other.read()["token"] == other.token


def test_of_two_writers_starting_together_one_wins(tmp_path):
    start = threading.Barrier(2)
    won, lost = [], []

    def go(name):
        lease = Store(tmp_path).lease("sw", owner=name, settle_s=0.3)
        start.wait()
        try:
            won.append(lease.acquire())
        except LeaseHeld as e:
            lost.append(str(e))

    threads = [threading.Thread(target=go, args=(n,)) for n in ("a", "b")]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(won) == 1 and len(lost) == 1 and won[0].owner in lost[0]
    won[0].release()


def test_the_lease_on_an_object_store(s3_root):
    with Store(s3_root).lease("sw", owner="alice", settle_s=0):
        with pytest.raises(LeaseHeld, match="alice"):
            Store(s3_root).lease("sw", settle_s=0).acquire()
    with Store(s3_root).lease("sw", settle_s=0):
        pass


def test_repair_leaves_alone_a_sweep_whose_writer_runs(tmp_path, capsys):
    """Moving files under a running sweep would race its writes: --repair holds each sweep's lease while it
    moves that sweep's files, and skips (naming the writer) a sweep whose lease another process holds."""
    root, _, bad = _damaged_store(tmp_path)
    with Store(root).lease("sw", owner="bob@node3 pid 77", settle_s=0):
        report = check_store(root, repair=True)
        assert not report.moved and "bob@node3 pid 77" in report.held["sw"] and bad.exists()
        assert main(["store", "check", str(root), "--repair"]) == 1
        out = capsys.readouterr().out
        assert "not repaired: sweep sw" in out and "writer runs" in out
    report = check_store(root, repair=True)  # the writer is gone: now it is repaired
    assert not report.held and str(bad) in report.moved and not bad.exists()
    assert Store(root).lease("sw").read() is None  # and repair's own lease is released


def test_a_claimed_lease_is_held_only_once_confirmed(tmp_path):
    """claim() then confirm() (what run_sweep does, with Ray's start in between): the settle wait counts from
    the claim, a rival that overwrote the record in between wins, and confirm() is idempotent across threads."""
    lease = Store(tmp_path).lease("sw", owner="a", settle_s=0.3, heartbeat_s=3600).claim()
    with pytest.raises(LeaseHeld, match="written by a"):  # a claim is already visible to a later writer
        Store(tmp_path).lease("sw", settle_s=0).claim()
    time.sleep(0.35)  # the caller's set-up took longer than settle_s: confirm() need not wait again
    results = []
    threads = [threading.Thread(target=lambda: results.append(lease.confirm())) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert results == [lease, lease] and lease._thread is not None
    lease.release()

    mine = Store(tmp_path).lease("sw", owner="mine", settle_s=0.2).claim()
    rival = Store(tmp_path).lease("sw", owner="rival", settle_s=0)
    rival._write()  # wrote its record after this one's claim, before the settle wait ended
    for _ in range(2):  # the same answer every time it is asked
        with pytest.raises(LeaseHeld, match="rival"):
            mine.confirm()
    with pytest.raises(RuntimeError, match="before claim"):
        Store(tmp_path).lease("x").confirm()
