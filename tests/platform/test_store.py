import math
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

import moelab.results as mr
from moelab.platform import store as store_mod
from moelab.platform.spec import expand, load_spec
from moelab.platform.store import Store, StoreError, list_files


def routing_counts(step, *, layers=2, domains=3, experts=4, offset=0):
    """expert_domain of one logged step, as the loop writes it: [layer][domain][expert] ints, every one
    distinct (step, layer, domain, expert and offset can be read back from it); expert 3 gets none."""
    return [[[0 if e == 3 else offset + step * 1000 + 100 * l + 10 * d + e for e in range(experts)]
             for d in range(domains)] for l in range(layers)]


def loop_rows(steps, *, loss0=5.0, layers=2, experts=4, eval_every=30, domains=0, offset=0):
    """Rows shaped like the training loop's (moelab.trainers.loop): expert_load per MoE layer, and with
    `domains` the per-domain routed-token counts `expert_domain`."""
    out = []
    for s in steps:
        load = np.full((layers, experts), 1 / experts)
        load[:, 0] += 0.01 * s / 100
        load /= load.sum(1, keepdims=True)
        row = dict(step=s, tokens=s * 1024, flops=s * 1e9, wall_s=s * 0.1, loss=loss0 - s / 100, lr=1e-3,
                   grad_norm=1.0, aux_loss=1.01, z_loss=0.3, seq_aux_loss=1.02, tokens_per_s=1e4, mfu=0.1,
                   drop_frac=0.0, imbalance=1.1, router_entropy=1.3, mtp_loss=5.5, max_mem_gib=3.5,
                   expert_load=load.tolist())
        if s % eval_every == 0:
            row["eval_loss"] = loss0 - s / 100 + 0.05
        if domains:
            row["expert_domain"] = routing_counts(s, layers=layers, domains=domains, experts=experts,
                                                  offset=offset)
        out.append(row)
    return out


def files(root, table):
    return sorted(os.listdir(os.path.join(root, table, "sweep=sw"))) if os.path.isdir(
        os.path.join(root, table, "sweep=sw")) else []


def test_round_trip(tmp_path):
    root = str(tmp_path / "r")
    trials = expand(load_spec("noise"))
    with Store(root) as st:
        for t in trials:
            st.write_trial(t.row())
        st.append_metrics("noise", trials[-1].trial_id, 0, loop_rows(range(10, 101, 10)))
    r = mr.open(root)
    assert r.sweeps() == ["noise"]
    tr = r.trials()
    assert sorted(tr.trial_id) == sorted(t.trial_id for t in trials)
    assert set(tr.status) == {"pending"} and tr["sweep"].eq("noise").all()
    one = tr.set_index("trial_id").loc[trials[-1].trial_id]
    assert one["upcycle.noise_std"] == trials[-1].config.upcycle.noise_std
    assert one["params_active"] == trials[-1].params_active and one["family"] == "moe"
    assert one["depends_on"] == trials[-1].depends_on and one["model.moe.n_experts"] == 8
    m = r.metrics()
    assert list(m.step) == list(range(10, 101, 10)) and (m.attempt == 0).all()
    assert m.loss.tolist() == pytest.approx([5.0 - s / 100 for s in range(10, 101, 10)])
    assert m.eval_loss.notna().tolist() == [s % 30 == 0 for s in range(10, 101, 10)]
    assert m.max_mem_gib.tolist() == [3.5] * 10  # the loop's peak-memory column is stored
    assert "expert_load" not in m.columns
    e = r.experts()
    assert len(e) == 10 * 2 * 4
    assert e.groupby(["step", "layer"]).load.sum().to_numpy() == pytest.approx(1.0)
    assert sorted(e.layer.unique()) == [0, 1] and sorted(e.expert.unique()) == [0, 1, 2, 3]


def test_trial_status_latest_wins_and_merges(tmp_path):
    st = Store(tmp_path)
    st.write_trial({"sweep": "sw", "trial_id": "a", "status": "pending", "seed": 0, "model.d_model": 64})
    st.update_trial("sw", "a", status="running")
    st.update_trial("sw", "a", status="finished", final_loss=2.5, final_step=100)
    assert files(tmp_path, "trials") == ["a.parquet"]
    row = mr.open(tmp_path).trials().iloc[0]
    assert (row.status, row.final_loss, row.final_step, row.seed, row["model.d_model"]) == ("finished", 2.5, 100, 0, 64)
    st.update_trial("sw", "a", status="diverged", final_loss=float("nan"), error="loss is NaN")
    row = mr.open(tmp_path).trials().iloc[0]
    assert row.status == "diverged" and math.isnan(row.final_loss) and row.error == "loss is NaN"
    with pytest.raises(StoreError, match="status.*done.*finished"):
        st.update_trial("sw", "a", status="done")


def test_trials_with_different_columns_are_unified(tmp_path):
    st = Store(tmp_path)
    st.write_trial({"sweep": "sw", "trial_id": "a", "status": "finished", "granularity": "G2", "error": None})
    st.write_trial({"sweep": "sw", "trial_id": "b", "status": "finished", "optim.lr": 0.1})
    st.write_trial({"sweep": "other", "trial_id": "a", "status": "pending"})
    r = mr.open(tmp_path)
    t = r.trials()
    assert len(t) == 3 and r.sweeps() == ["other", "sw"]
    assert t.set_index(["sweep", "trial_id"]).loc[("sw", "a"), "granularity"] == "G2"
    assert len(r.trials(sweep="sw")) == 2


def test_dedupe_keeps_highest_attempt(tmp_path):
    st = Store(tmp_path)
    st.append_metrics("sw", "t", 0, loop_rows(range(10, 151, 10), loss0=5.0))  # crashed after step 150
    st.flush()
    st.append_metrics("sw", "t", 1, loop_rows(range(110, 201, 10), loss0=9.0))  # resumed from step 100
    st.flush()
    st.append_metrics("sw", "u", 0, loop_rows(range(10, 51, 10)))
    st.close()
    r = mr.open(tmp_path)
    m = r.metrics()
    t = m[m.trial_id == "t"]
    assert t.step.tolist() == list(range(10, 201, 10))  # every step once, in order
    assert t.attempt.tolist() == [0] * 10 + [1] * 10
    assert t.loss.tolist() == pytest.approx([5 - s / 100 for s in range(10, 101, 10)] +
                                            [9 - s / 100 for s in range(110, 201, 10)])
    assert len(m[m.trial_id == "u"]) == 5
    e = r.experts(trials=["t"])
    assert len(e) == 20 * 2 * 4 and e.groupby("step").attempt.max().loc[110:].eq(1).all()
    assert r.experts(trials="t", steps=[10, 200]).step.unique().tolist() == [10, 200]
    # the same through SQL
    q = r.sql("SELECT trial_id, count(*) AS n, max(attempt) AS a FROM metrics GROUP BY 1 ORDER BY 1")
    assert q.n.tolist() == [20, 5] and q.a.tolist() == [1, 0]
    assert r.sql("SELECT count(*) AS n FROM experts").n[0] == 25 * 8


def test_routing_round_trip_and_dedupe_by_attempt(tmp_path):
    st = Store(tmp_path)
    st.append_metrics("sw", "t", 0, loop_rows(range(10, 151, 10), domains=3))  # crashed after step 150
    st.flush()
    st.append_metrics("sw", "t", 1, loop_rows(range(110, 201, 10), domains=3, offset=7))  # resumed at 100
    st.append_metrics("sw", "u", 0, loop_rows(range(10, 51, 10)))  # real data: no expert_domain
    st.close()
    assert files(tmp_path, "routing") == ["t.a000.s000000010-000000150.parquet",
                                          "t.a001.s000000110-000000200.parquet"]
    r = mr.open(tmp_path)
    g = r.routing()
    assert list(g.columns) == ["sweep", "trial_id", "attempt", "step", "layer", "domain", "expert", "tokens"]
    assert g.tokens.dtype == np.int64 and set(g.trial_id) == {"t"}
    assert len(g) == 20 * 2 * 3 * 4  # every (step, layer, domain, expert) once, zero counts included
    assert not g.duplicated(["step", "layer", "domain", "expert"]).any()
    keys = ["sweep", "trial_id", "step", "layer", "domain", "expert"]
    assert g.equals(g.sort_values(keys).reset_index(drop=True))
    for row in g.itertuples():
        offset = 7 if row.step > 100 else 0  # attempt 1's rows replace attempt 0's from step 110 on
        assert row.attempt == (row.step > 100)
        assert row.tokens == routing_counts(row.step, offset=offset)[row.layer][row.domain][row.expert], row
    assert (g[g.expert == 3].tokens == 0).all()
    assert r.routing(trials="t", steps=[10, 200]).step.unique().tolist() == [10, 200]
    assert r.routing(trials="u").empty and r.experts(trials="u").shape[0] == 5 * 2 * 4
    # compaction keeps the same rows, and the store reads the same through SQL
    assert st.compact("sw") > 0 and len(files(tmp_path, "routing")) == 1
    assert r.routing().equals(g)
    q = r.sql("SELECT max(attempt) AS a, count(*) AS n, sum(tokens) AS s FROM routing")
    assert (q.a[0], q.n[0], q.s[0]) == (1, len(g), g.tokens.sum())


def test_routing_columnar_and_bad_counts(tmp_path):
    st = Store(tmp_path)
    steps = np.array([10, 20])
    counts = np.arange(2 * 2 * 3 * 4).reshape(2, 2, 3, 4)  # steps x layers x domains x experts
    st.append_metrics("sw", "t", 0, {"step": steps, "loss": np.ones(2), "expert_domain": counts})
    st.append_routing("sw", "t", 0, 30, counts[0].tolist())
    st.flush()
    g = mr.open(tmp_path).routing()
    assert len(g) == 3 * 2 * 3 * 4
    got = g.set_index(["step", "layer", "domain", "expert"]).tokens
    assert got[(20, 1, 2, 3)] == counts[1, 1, 2, 3] and got[(30, 0, 1, 2)] == counts[0, 0, 1, 2]
    # A malformed value fails the call that brings it; it never reaches the buffer, which stays writable.
    st.append_routing("sw", "t", 0, 50, counts[0].tolist())
    with pytest.raises(StoreError, match="n_domains, n_experts"):
        st.append_routing("sw", "t", 0, 40, [[1, 2, 3]])  # not [domains][experts]
    with pytest.raises(StoreError, match="metrics.loss.*a number"):
        st.append_metrics("sw", "t", 0, [dict(step=60, loss="low")])
    assert st.flush() == 1 and sorted(mr.open(tmp_path).routing().step.unique()) == [10, 20, 30, 50]


def test_rewriting_a_batch_is_idempotent(tmp_path):
    st = Store(tmp_path)
    for _ in range(2):  # e.g. a sink replaying the same reports after a controller restart
        st.append_metrics("sw", "t", 0, loop_rows(range(10, 51, 10)))
        st.flush()
    assert files(tmp_path, "metrics") == ["t.a000.s000000010-000000050.parquet"]
    assert len(files(tmp_path, "experts")) == 1
    assert len(mr.open(tmp_path).metrics()) == 5
    # the same step twice inside one batch: the later row wins
    st.append_metrics("sw", "v", 0, [dict(step=10, loss=1.0), dict(step=10, loss=2.0)])
    st.flush()
    assert mr.open(tmp_path).metrics(trials="v").loss.tolist() == [2.0]


def test_batching_by_rows_and_time(tmp_path, monkeypatch):
    st = Store(tmp_path, batch_rows=4, flush_s=1e9)
    st.append_metrics("sw", "t", 0, [dict(step=s, loss=1.0) for s in (1, 2, 3)])
    assert files(tmp_path, "metrics") == [] and st.pending_rows() == 3
    st.append_metrics("sw", "t", 0, [dict(step=4, loss=1.0)])
    assert files(tmp_path, "metrics") == ["t.a000.s000000001-000000004.parquet"] and st.pending_rows() == 0
    clock = [0.0]
    monkeypatch.setattr(store_mod.time, "monotonic", lambda: clock[0])
    st = Store(tmp_path, batch_rows=10**6, flush_s=30)
    st.append_metrics("sw", "t", 0, [dict(step=5, loss=1.0)])
    assert st.pending_rows() == 1
    clock[0] = 31.0
    st.append_metrics("sw", "t", 0, [dict(step=6, loss=1.0)])
    assert st.pending_rows() == 0 and "t.a000.s000000005-000000006.parquet" in files(tmp_path, "metrics")


def test_unknown_metric_keys_are_dropped_and_names_checked(tmp_path):
    st = Store(tmp_path)
    st.append_metrics("sw", "t", 0, [dict(step=1, loss=1.0, training_iteration=3, hostname="x")])
    st.flush()
    m = mr.open(tmp_path).metrics()
    assert "training_iteration" not in m.columns and m.loss.tolist() == [1.0]
    with pytest.raises(StoreError, match="trial_id"):
        st.append_metrics("sw", "../evil", 0, [dict(step=1)])
    with pytest.raises(StoreError, match="sweep"):
        st.write_trial({"sweep": "a/b", "trial_id": "t"})
    with pytest.raises(StoreError, match="step"):
        st.append_metrics("sw", "t", 0, [dict(loss=1.0)])


def test_stray_temp_and_foreign_files_are_ignored(tmp_path):
    st = Store(tmp_path)
    st.write_trial({"sweep": "sw", "trial_id": "t", "status": "running"})
    st.append_metrics("sw", "t", 0, loop_rows(range(10, 31, 10)))
    st.flush()
    for table in ("metrics", "experts", "trials"):
        d = tmp_path / table / "sweep=sw"
        (d / ".tmp-0123-t.a000.s000000040-000000050.parquet").write_bytes(b"PAR1 half a file")  # a crashed write
        (d / "_SUCCESS").write_text("")
        (d / "notes.txt").write_text("hello")
    r = mr.open(tmp_path)
    assert len(r.metrics()) == 3 and len(r.experts()) == 3 * 8 and len(r.trials()) == 1
    assert r.sql("SELECT count(*) AS n FROM metrics").n[0] == 3


def test_a_failed_write_leaves_nothing_visible(tmp_path, monkeypatch):
    st = Store(tmp_path)
    st.append_metrics("sw", "t", 0, loop_rows(range(10, 31, 10)))
    st.flush()

    def broken(table, where, **kw):
        with open(where, "wb") as f:
            f.write(b"PAR1 partial")
        raise OSError("disk full")

    monkeypatch.setattr(store_mod.pq, "write_table", broken)
    st.append_metrics("sw", "t", 0, loop_rows(range(40, 61, 10)))
    with pytest.raises(OSError, match="disk full"):
        st.flush()
    assert files(tmp_path, "metrics") == ["t.a000.s000000010-000000030.parquet"]  # no temp file left either
    assert len(mr.open(tmp_path).metrics()) == 3


def test_compact_merges_batches(tmp_path):
    st = Store(tmp_path, batch_rows=3)
    st.append_metrics("sw", "t", 0, loop_rows(range(10, 151, 10))[:3])
    for chunk in range(4):
        rows = loop_rows(range(10, 151, 10))[3 + 3 * chunk: 6 + 3 * chunk]
        st.append_metrics("sw", "t", 0, rows)
    st.append_metrics("sw", "t", 1, loop_rows(range(110, 201, 10), loss0=9))
    st.close()
    r = mr.open(tmp_path)
    before, before_e = r.metrics(), r.experts()
    assert len(files(tmp_path, "metrics")) > 2
    assert st.compact("sw") > 0
    assert len(files(tmp_path, "metrics")) == 1 and len(files(tmp_path, "experts")) == 1
    after, after_e = r.metrics(), r.experts()
    assert after.equals(before) and after_e.equals(before_e)


def test_empty_and_missing_roots(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results store"):
        mr.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    r = mr.open(tmp_path / "empty")
    assert r.sweeps() == []
    m = r.metrics()
    assert m.empty and {"sweep", "trial_id", "attempt", "step", "loss", "mfu"} <= set(m.columns)
    assert r.experts().empty and {"layer", "expert", "load"} <= set(r.experts().columns)
    assert r.routing().empty and {"layer", "domain", "expert", "tokens"} <= set(r.routing().columns)
    assert r.sql("SELECT count(*) AS n FROM routing").n[0] == 0
    t = r.trials()
    assert t.empty and {"trial_id", "status", "final_loss"} <= set(t.columns)
    assert r.sql("SELECT count(*) AS n FROM metrics").n[0] == 0
    assert r.metrics(columns=["loss"]).columns.tolist() == ["sweep", "trial_id", "step", "attempt", "loss"]
    with pytest.raises(KeyError, match="losss"):
        r.metrics(columns=["losss"])


def test_columnar_append(tmp_path):
    st = Store(tmp_path)
    steps = np.arange(1, 6) * 10
    load = np.full((5, 2, 4), 0.25)
    st.append_metrics("sw", "t", 2, {"step": steps, "loss": np.linspace(3, 2, 5), "expert_load": load})
    st.flush()
    r = mr.open(tmp_path)
    m = r.metrics()
    assert m.step.tolist() == steps.tolist() and (m.attempt == 2).all() and m.lr.isna().all()
    assert len(r.experts()) == 5 * 8


def test_s3_round_trip(s3_root):
    st = Store(s3_root, batch_rows=4)
    assert not st.local
    st.write_trial({"sweep": "sw", "trial_id": "t", "status": "running", "seed": 1})
    st.append_metrics("sw", "t", 0, loop_rows(range(10, 71, 10)))
    st.append_metrics("sw", "t", 1, loop_rows(range(50, 91, 10), loss0=9))
    st.update_trial("sw", "t", status="finished", final_loss=8.1)
    st.close()
    paths = list_files(st.fs, st.root, "metrics")
    assert paths and all("/metrics/sweep=sw/t.a" in p for p in paths)
    r = mr.open(s3_root)
    assert r.sweeps() == ["sw"]
    t = r.trials()
    assert t.status.tolist() == ["finished"] and t.final_loss.tolist() == [8.1]
    m = r.metrics()
    assert m.step.tolist() == list(range(10, 91, 10))
    assert m.attempt.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert len(r.experts()) == 9 * 8
    assert r.sql("SELECT max(step) AS s FROM metrics WHERE attempt = 1").s[0] == 90
    # rewriting a batch on S3 replaces the object
    st.append_metrics("sw", "t", 1, loop_rows(range(50, 91, 10), loss0=9))
    st.flush()
    assert list_files(st.fs, st.root, "metrics") == paths
    assert st.compact("sw") > 0 and mr.open(s3_root).metrics().equals(m)


def test_parquet_files_are_plain(tmp_path):
    """Any Parquet reader can read a batch: the partition column comes from the path, the rest is in it."""
    st = Store(tmp_path)
    st.append_metrics("sw", "t", 0, loop_rows([10]))
    st.flush()
    (name,) = files(tmp_path, "metrics")
    t = pq.read_table(tmp_path / "metrics" / "sweep=sw" / name)
    assert t.column_names[:3] == ["trial_id", "attempt", "step"] and t.num_rows == 1


def test_synthetic_fixture(synthetic, make_store, tmp_path):
    r = mr.open(synthetic.root)
    assert len(r.trials()) == 18 and r.sweeps() == [synthetic.sweep]
    m = r.metrics()
    assert {t: g.step.tolist() for t, g in m.groupby("trial_id")} == synthetic.logged
    assert len(list_files(r.fs, r.root, "metrics")) > 18  # several batches per trial (batch_steps=12)
    g = r.routing()
    assert set(g.trial_id) == set(synthetic.moe) and sorted(g.domain.unique()) == [0, 1, 2, 3]
    assert {t: sorted(x.step.unique().tolist()) for t, x in g.groupby("trial_id")} == \
        {t: synthetic.logged[t] for t in synthetic.moe}
    small = make_store(str(tmp_path), n_trials=5, n_steps=4, sweep="tiny", experts=False)
    r = mr.open(small.root)
    t = r.trials()
    assert len(t) == 5 and t.family.tolist().count("moe") == 2 and set(t.seed) == {0}
    assert len(r.metrics()) == 5 * 4 - 4 + int(0.6 * 4) and r.experts().empty and r.routing().empty
