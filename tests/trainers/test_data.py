"""Tests for moelab.trainers.data: tokenizers, synthetic Markov mixtures and their loss floors, real sources."""

from __future__ import annotations

import json
import math
import threading
import time

import numpy as np
import pytest
import torch

from moelab.trainers.config import DataConfig
from moelab.trainers.data import (
    Batch,
    ByteTokenizer,
    Prefetcher,
    SyntheticMarkov,
    TokenSource,
    TokenStream,
    build_source,
    load_tokenizer,
    rank_batches,
    stream_from_documents,
)

# ----------------------------------------------------------------------------------------------------------
# Tokenizers


def test_byte_tokenizer_round_trip_and_eos():
    tok = ByteTokenizer()
    assert tok.vocab_size == 257 and tok.eos_id == 256
    text = "héllo wörld — ✓ 日本語 🙂\n"
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and ids.ndim == 1
    assert len(ids) == len(text.encode("utf-8"))  # no eos appended
    assert ids.max() < 256
    assert tok.decode(ids) == text
    assert tok.decode(torch.from_numpy(ids)) == text
    # eos separates documents and is not rendered.
    assert tok.decode(np.concatenate([ids, [tok.eos_id], tok.encode("x")])) == text + "x"
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)


def _save_tokenizer(tok, path):
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return path


def test_hf_tokenizer_bpe_round_trip(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer=trainer)
    d = _save_tokenizer(tok, tmp_path / "bpe")

    hf = load_tokenizer(str(d))
    assert hf.vocab_size == tok.get_vocab_size(with_added_tokens=True)
    assert hf.eos_id == tok.token_to_id("<|endoftext|>") == 0
    text = "the lazy fox, déjà vu"
    ids = hf.encode(text)
    assert ids.dtype == np.int64 and len(ids) < len(text.encode("utf-8"))  # merges were learned and used
    assert hf.decode(ids) == text
    assert [a.tolist() for a in hf.encode_batch([text, "dog"])] == [ids.tolist(), hf.encode("dog").tolist()]
    # Passing the file itself works too.
    assert load_tokenizer(str(d / "tokenizer.json")).encode(text).tolist() == ids.tolist()


def test_hf_tokenizer_eos_rule(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    def wordlevel(vocab):
        t = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        t.pre_tokenizer = pre_tokenizers.Whitespace()
        return t

    with_eos = load_tokenizer(str(_save_tokenizer(
        wordlevel({"[UNK]": 0, "hello": 1, "</s>": 2, "world": 3}), tmp_path / "a")))
    assert with_eos.eos_id == 2 and with_eos.vocab_size == 4
    assert with_eos.encode("hello world").tolist() == [1, 3]
    assert with_eos.decode([1, 3]) == "hello world"

    # No known eos token: the documented fallback is the last id.
    without = load_tokenizer(str(_save_tokenizer(
        wordlevel({"[UNK]": 0, "hello": 1, "world": 2}), tmp_path / "b")))
    assert without.eos_id == without.vocab_size - 1 == 2


def test_load_tokenizer_missing(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path / "empty"))


# ----------------------------------------------------------------------------------------------------------
# Determinism (every source)


def _text_stream(seed=0):
    docs = [(f"doc{i}", f"document number {i}: " + "abcdefghij" * (i + 3)) for i in range(40)]
    return stream_from_documents("files", docs, ByteTokenizer(), 0.2, seed)


@pytest.mark.parametrize("make", [lambda seed: SyntheticMarkov(3, 16, 0.3, seed), _text_stream],
                         ids=["synthetic", "stream"])
def test_batches_are_deterministic(make):
    a, b = make(7), make(7)
    x = a.batch("train", 5, 8, 32)
    assert isinstance(x, Batch) and x.tokens.shape == (8, 33) and x.tokens.dtype == torch.int64
    # Statelessness: other batches drawn in between change nothing.
    b.batch("eval", 0, 8, 32)
    b.batch("train", 4, 8, 32)
    y = b.batch("train", 5, 8, 32)
    assert torch.equal(x.tokens, y.tokens)
    assert torch.equal(x.inputs, x.tokens[:, :-1]) and torch.equal(x.targets, x.tokens[:, 1:])
    assert not torch.equal(x.tokens, a.batch("train", 6, 8, 32).tokens)
    assert not torch.equal(x.tokens, a.batch("eval", 5, 8, 32).tokens)
    assert not torch.equal(x.tokens, make(8).batch("train", 5, 8, 32).tokens)


def test_synthetic_params_depend_on_seed_only():
    a, b, c = SyntheticMarkov(3, 16, 0.3, 1), SyntheticMarkov(3, 16, 0.3, 1), SyntheticMarkov(3, 16, 0.3, 2)
    a.batch("eval", 3, 4, 8)  # drawing batches must not touch the chains
    for name in ("transitions", "initial", "prior"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert not np.allclose(a.transitions, c.transitions)
    assert a.transitions.shape == (3, 16, 16) and a.initial.shape == (3, 16) and a.prior.shape == (3,)
    assert np.allclose(a.transitions.sum(-1), 1) and np.allclose(a.initial.sum(-1), 1)
    # Negative seeds are accepted (mapped, not rejected).
    SyntheticMarkov(2, 4, 1.0, -3).batch("train", 0, 2, 4)


# ----------------------------------------------------------------------------------------------------------
# Synthetic: sampling matches the chains


def _transition_counts(src, split, n_batches):
    K, V = src.n_domains, src.n_symbols
    counts = np.zeros((K, V, V))
    for i in range(n_batches):
        b = src.batch(split, i, 64, 127)
        x, d = b.tokens.numpy(), b.domains.numpy()
        dd = np.repeat(d, x.shape[1] - 1)
        np.add.at(counts, (dd, x[:, :-1].ravel(), x[:, 1:].ravel()), 1)
    return counts


@pytest.mark.parametrize("split", ["train", "eval"])
def test_synthetic_empirical_transitions_match_each_domain(split):
    src = SyntheticMarkov(n_domains=2, n_symbols=6, concentration=0.5, seed=3)
    counts = _transition_counts(src, split, 10)  # ~80k transitions
    for k in range(2):
        seen = counts[k].sum(1)
        assert seen.min() > 200  # every state visited enough to estimate its row
        freq = counts[k] / seen[:, None]
        assert np.abs(freq - src.transitions[k]).max() < 0.06, k
        # A row's tokens follow its own domain, not the other one.
        assert np.abs(freq - src.transitions[1 - k]).max() > 0.2
    # Both domains are drawn, about equally often.
    assert 0.35 < counts[0].sum() / counts.sum() < 0.65


def test_synthetic_first_token_follows_initial_distribution():
    src = SyntheticMarkov(n_domains=1, n_symbols=5, concentration=0.5, seed=0)
    first = np.concatenate([src.batch("train", i, 512, 1).tokens[:, 0].numpy() for i in range(8)])
    freq = np.bincount(first, minlength=5) / len(first)
    assert np.abs(freq - src.initial[0]).max() < 0.03
    # The default initial distribution is stationary: pi P = pi.
    assert np.allclose(src.initial[0] @ src.transitions[0], src.initial[0])


# ----------------------------------------------------------------------------------------------------------
# Synthetic: loss floors


def test_bayes_loss_decreases_with_context_and_stays_above_entropy_rate():
    src = SyntheticMarkov(n_domains=4, n_symbols=16, concentration=0.1, seed=0)
    h = src.entropy_rate()
    losses = [src.bayes_loss(n) for n in (1, 4, 16, 64)]
    assert all(a > b for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] >= h - 0.02
    assert losses[0] <= math.log(16)
    assert src.bayes_loss(16) == src.bayes_loss(16)  # deterministic
    assert src.bayes_loss(16, seed=1) != src.bayes_loss(16)


def _exact_loss_one_domain(src, seq_len):
    """K = 1: the posterior is trivial, so E[loss at t] = sum_i p_{t-1}(i) H(P[i]), p_t = initial P^t."""
    P = src.transitions[0]
    H = -(P * np.log(P)).sum(1)
    p, total = src.initial[0].copy(), 0.0
    for _ in range(seq_len):
        total += p @ H
        p = p @ P
    return total / seq_len


@pytest.mark.parametrize("initial", ["uniform", "stationary"])
def test_bayes_loss_one_domain_matches_exact(initial):
    src = SyntheticMarkov(n_domains=1, n_symbols=12, concentration=0.2, seed=0, initial=initial)
    for seq_len in (1, 8):
        mc = src.bayes_loss(seq_len, n_samples=8192)
        assert mc == pytest.approx(_exact_loss_one_domain(src, seq_len), abs=0.04)
    if initial == "stationary":
        assert _exact_loss_one_domain(src, 8) == pytest.approx(src.entropy_rate(), rel=1e-9)
    else:
        # Uniform start: position 1 is not the entropy rate, so the check above is not vacuous.
        assert abs(_exact_loss_one_domain(src, 1) - src.entropy_rate()) > 0.2


def test_bayes_loss_approaches_entropy_rate_with_separated_domains():
    # Low concentration: near-deterministic, very different chains; the domain is clear after a few tokens.
    src = SyntheticMarkov(n_domains=4, n_symbols=32, concentration=0.05, seed=1)
    h = src.entropy_rate()
    short, long = src.bayes_loss(2, n_samples=1024) - h, src.bayes_loss(256, n_samples=1024) - h
    assert short > 0.2
    assert -0.02 < long < 0.03
    assert long < short / 10


def test_synthetic_defaults_from_config():
    cfg = DataConfig()
    src = build_source(cfg, seed=0)
    assert isinstance(src, SyntheticMarkov)
    assert src.vocab_size == cfg.n_symbols and src.transitions.shape == (cfg.n_domains,) + (cfg.n_symbols,) * 2
    b = src.batch("train", 0, 16, 64)
    assert b.domains.shape == (16,) and int(b.tokens.max()) < src.vocab_size
    d = src.describe()
    json.dumps(d)
    assert d["source"] == "synthetic" and d["entropy_rate"] == pytest.approx(src.entropy_rate())


# ----------------------------------------------------------------------------------------------------------
# stdlib


def test_stdlib_source():
    src = build_source(DataConfig(source="stdlib", max_bytes=400_000, eval_fraction=0.1), seed=0)
    assert src.vocab_size == 257
    train, evald = set(src.documents["train"]), set(src.documents["eval"])
    assert train and evald and not (train & evald)
    assert all(name.endswith(".py") for name in train | evald)
    d = src.describe()
    json.dumps(d)
    assert d["n_tokens"]["train"] > 0 and d["n_tokens"]["eval"] > 0
    # Byte tokens: document bytes plus one eos per document, capped by max_bytes.
    assert sum(d["n_tokens"].values()) == 400_000 + len(train | evald)
    for split in ("train", "eval"):
        b = src.batch(split, 0, 4, 64)
        assert b.domains is None and b.tokens.shape == (4, 65)
        assert 0 <= int(b.tokens.min()) and int(b.tokens.max()) < 257
    text = src.tokenizer.decode(src.splits["train"][0][:2000])
    assert "import" in text or "def " in text


# ----------------------------------------------------------------------------------------------------------
# files


def _write_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text file\n" * 20, encoding="utf-8")
    (tmp_path / "b.md").write_text("# beta\nmarkdown é\n" * 20, encoding="utf-8")
    rows = [{"text": f"jsonl row {i} " * 10, "id": i} for i in range(30)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [f"parquet row {i} " * 10 for i in range(30)], "n": list(range(30))}),
                   tmp_path / "d.parquet")
    return rows


def test_files_source_reads_every_format(tmp_path):
    rows = _write_corpus(tmp_path)
    cfg = DataConfig(source="files", paths=(str(tmp_path / "*.txt"), str(tmp_path / "b.md"),
                                            str(tmp_path / "c.jsonl"), str(tmp_path / "d.parquet")),
                     eval_fraction=0.2)
    src = build_source(cfg, seed=0)
    docs = src.documents["train"] + src.documents["eval"]
    assert len(docs) == 1 + 1 + 30 + 30
    assert not set(src.documents["train"]) & set(src.documents["eval"])
    assert src.documents["eval"]
    # Every document's text is in the streams, each followed by eos.
    tok = src.tokenizer
    whole = "".join(tok.decode(src.splits[s][0]) for s in ("train", "eval"))
    for needle in ("alpha text file", "markdown é", rows[7]["text"], "parquet row 29 "):
        assert needle in whole
    n_eos = sum(int((src.splits[s][0] == tok.eos_id).sum()) for s in ("train", "eval"))
    assert n_eos == len(docs)
    b = src.batch("train", 0, 4, 32)
    assert b.tokens.shape == (4, 33) and int(b.tokens.max()) < src.vocab_size
    json.dumps(src.describe())


def test_files_source_max_bytes(tmp_path):
    _write_corpus(tmp_path)
    src = build_source(DataConfig(source="files", paths=(str(tmp_path / "*.txt"), str(tmp_path / "b.md")),
                                  max_bytes=330), seed=0)
    # a.txt is 320 bytes, so 10 bytes of b.md fit; plus the eos of both documents.
    assert src.n_tokens("train") + src.n_tokens("eval") == 330 + 2
    assert len(src.documents["train"] + src.documents["eval"]) == 2


def test_files_errors_name_the_culprit(tmp_path):
    _write_corpus(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        build_source(DataConfig(source="files", paths=(str(tmp_path / "missing.txt"),)), seed=0)
    with pytest.raises(FileNotFoundError, match=r"\*\.nothing"):
        build_source(DataConfig(source="files", paths=(str(tmp_path / "*.nothing"),)), seed=0)
    for name in ("c.jsonl", "d.parquet"):
        with pytest.raises(KeyError, match=rf"content.*{name}|{name}.*content"):
            build_source(DataConfig(source="files", paths=(str(tmp_path / name),), text_field="content"),
                         seed=0)


def test_window_longer_than_split_is_a_clear_error(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 200)
    (tmp_path / "b.txt").write_text("y" * 10)
    (tmp_path / "c.txt").write_text("z" * 10)
    src = build_source(DataConfig(source="files", paths=(str(tmp_path / "*.txt"),), eval_fraction=0.3), seed=0)
    short = min(("train", "eval"), key=src.n_tokens)
    n = src.n_tokens(short)
    src.batch(short, 0, 2, n - 1)  # exactly fits
    with pytest.raises(ValueError, match=rf"'{short}'.*{n} tokens.*seq_len \+ 1 = {n + 1}"):
        src.batch(short, 0, 2, n)
    with pytest.raises(ValueError, match="split"):
        src.batch("test", 0, 2, 4)


def test_single_document_is_split_by_tokens():
    src = stream_from_documents("files", [("only", "a" * 99)], ByteTokenizer(), 0.1, seed=0)
    assert src.n_tokens("train") == 90 and src.n_tokens("eval") == 10  # 99 bytes + eos


# ----------------------------------------------------------------------------------------------------------
# memmap


def test_memmap_bin_and_npy(tmp_path):
    a = (np.arange(10_000) % 257).astype(np.uint16)
    a.tofile(tmp_path / "a.bin")
    b = (np.arange(3_000) % 200).astype(np.int32)
    np.save(tmp_path / "b.npy", b)
    cfg = DataConfig(source="memmap", paths=(str(tmp_path / "a.bin"), str(tmp_path / "b.npy")),
                     eval_fraction=0.1)
    src = build_source(cfg, seed=0)
    assert isinstance(src, TokenStream) and src.vocab_size == 257
    (ta, tb), (ea, eb) = src.splits["train"], src.splits["eval"]
    assert all(isinstance(x, np.memmap) for x in (ta, tb, ea, eb))  # mapped, not read
    # Eval is the contiguous tail of each file, train the rest.
    assert np.array_equal(ea, a[-1000:]) and np.array_equal(ta, a[:-1000])
    assert np.array_equal(eb, b[-300:]) and np.array_equal(tb, b[:-300])
    assert src.describe()["n_tokens"] == {"train": 9000 + 2700, "eval": 1000 + 300}
    for split, data in (("train", (ta, tb)), ("eval", (ea, eb))):
        x = src.batch(split, 1, 16, 63).tokens.numpy()
        # Each row is a contiguous window of one file's split (ids count up modulo the file's period).
        for row in x:
            step = np.diff(row)
            assert np.all((step == 1) | (step == -256)) or np.all((step == 1) | (step == -199))
            assert any(np.isin(row[0], d) for d in data)


def test_memmap_ids_beyond_vocab_are_caught(tmp_path):
    np.arange(1000, dtype=np.uint16).tofile(tmp_path / "big.bin")  # ids up to 999 > byte vocab
    src = build_source(DataConfig(source="memmap", paths=(str(tmp_path / "big.bin"),)), seed=0)
    with pytest.raises(ValueError, match="vocab_size = 257"):
        src.batch("train", 0, 8, 100)


def test_unknown_source():
    with pytest.raises(ValueError, match="data.source"):
        build_source(DataConfig(source="web"), seed=0)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------
# Per-rank batches and the prefetch thread


class _SlicingOnly(TokenSource):
    """A source with only `batch`: `rows` falls back to slicing the whole batch."""

    vocab_size = 16

    def batch(self, split, index, batch_size, seq_len):
        return SyntheticMarkov(3, 16, 0.3, 2).batch(split, index, batch_size, seq_len)


@pytest.mark.parametrize("make", [lambda: SyntheticMarkov(3, 16, 0.3, 7), _text_stream, _SlicingOnly],
                         ids=["synthetic", "stream", "fallback"])
@pytest.mark.parametrize("world_size,micro", [(2, 4), (2, 12), (4, 4), (3, 6)])
def test_rank_batches_are_the_slices_local_rows_cuts(make, world_size, micro):
    """Each rank's micro-batches equal what `Parallel.local_rows` cuts from each micro-batch of the global
    batch (the tokens and domains the loop trained on before ranks built their own), step after step."""
    from types import SimpleNamespace

    from moelab.trainers.parallel import Parallel

    src, B, S = make(), 12, 20
    for step in range(3):
        whole = src.batch("train", step, B, S)
        for rank in range(world_size):
            layout = SimpleNamespace(world_size=world_size, rank=rank)
            got = rank_batches(src, "train", step, B, S, micro, rank, world_size)
            assert len(got) == B // micro
            for i, b in enumerate(got):
                rows = slice(i * micro, (i + 1) * micro)
                assert torch.equal(b.tokens, Parallel.local_rows(layout, whole.tokens[rows])), (step, rank, i)
                if whole.domains is not None:
                    assert torch.equal(b.domains, Parallel.local_rows(layout, whole.domains[rows]))
    one = rank_batches(src, "eval", 1, B, S, micro)  # one process: the batch in micro-batches
    assert torch.equal(torch.cat([b.tokens for b in one]), src.batch("eval", 1, B, S).tokens)


def test_rows_builds_only_its_rows_and_refuses_bad_ranges():
    src = SyntheticMarkov(3, 16, 0.3, 7)
    seen = []
    real = src.sample
    src.sample = lambda rng, domains, length, *a: seen.append(len(domains)) or real(rng, domains, length, *a)
    b = src.rows("train", 0, 64, 10, [(4, 6), (40, 41)])
    assert seen == [3] and b.tokens.shape == (3, 11)
    assert torch.equal(b.tokens, SyntheticMarkov(3, 16, 0.3, 7).batch("train", 0, 64, 10).tokens[[4, 5, 40]])
    for bad in ([(6, 4)], [(0, 65)], [(4, 8), (6, 10)]):
        with pytest.raises(ValueError, match="rows: range"):
            src.rows("train", 0, 64, 10, bad)


def test_prefetcher_resumes_at_any_step_with_the_same_batches():
    src = SyntheticMarkov(3, 16, 0.3, 7)

    def make(step):
        return rank_batches(src, "train", step, 8, 12, 4, 1, 2)

    with Prefetcher(make, 0, 6) as full, Prefetcher(make, 3, 6) as resumed:
        run = [full.get(s) for s in range(6)]
        for s in range(3, 6):
            assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(resumed.get(s), run[s]))
        with pytest.raises(ValueError, match="asked for step 6"):
            full.get(6)
    assert not full.alive and not resumed.alive


def test_prefetcher_is_bounded_reraises_and_stops():
    made = []
    started = threading.Event()

    def make(step):
        made.append(step)
        if step == 2:
            started.set()
        if step == 5:
            raise KeyError("no batch 5")
        return step

    p = Prefetcher(make, 0, 100, depth=2)
    assert started.wait(30)
    deadline = time.monotonic() + 30
    while not p._queue.full() and time.monotonic() < deadline:  # the producer fills the queue, then waits
        time.sleep(0.01)
    assert made == [0, 1, 2]  # depth 2 queued, the third built and waiting for room; nothing more
    assert [p.get(s) for s in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(KeyError, match="no batch 5"):  # raised in this thread, by the get of its step
        p.get(5)
    p.close()
    assert not p.alive

    blocked = Prefetcher(lambda s: s, 0, 100, depth=1)  # closing while the producer waits on a full queue
    blocked.close()
    assert not blocked.alive
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(lambda s: s, 0, 1, depth=0)
