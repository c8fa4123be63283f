"""Tokenizers and token sources for one training run.

A `TokenSource` hands out `Batch`es of token windows. `batch(split, index, batch_size, seq_len)` is a pure
function of (source seed, split, index, batch_size, seq_len): a resumed run sees exactly the batches it
would have seen, and eval batch `i` is the same in every run with the same seed. Sources keep no RNG state.
`rows(...)` builds chosen rows of that batch alone: on many ranks each builds only its own share
(`rank_batches`), and a `Prefetcher` builds the next steps' shares in a background thread.

Sources (`DataConfig.source`):

* `synthetic`: `SyntheticMarkov`, a mixture of K random first-order Markov chains ("domains"), one per
  document. It knows its own loss floor (`bayes_loss`, `entropy_rate`), so training can be checked against
  a number rather than a vibe.
* `stdlib`: the running Python's standard library source, read and tokenised in memory.
* `files`: local text / JSONL / Parquet files (paths or globs), read and tokenised in memory.
* `memmap`: pre-tokenised `.bin` / `.npy` files, memory-mapped and never read whole.

The last three are one class, `TokenStream`: each split is a list of 1-D token arrays ("segments") and a
batch row is a window of seq_len+1 consecutive tokens inside one segment, its start drawn uniformly over
all valid starts of the split.

Nothing here touches the network.
"""

from __future__ import annotations

import glob
import hashlib
import json
import queue
import sysconfig
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, Iterable, Iterator, Protocol, Sequence, TypeVar

import numpy as np
import torch

from moelab.trainers.config import DataConfig

SPLITS = ("train", "eval")
_SPLIT_ID = {"train": 0, "eval": 1}


def _seed_words(seed: int) -> int:
    """SeedSequence wants non-negative entropy; map any Python int (negative seeds too) onto one."""
    return int(seed) % (1 << 63)


def _rng(seed: int, *words: int) -> np.random.Generator:
    """A Generator determined by (seed, *words) only."""
    return np.random.default_rng([_seed_words(seed), *words])


def _check_split(split: str) -> int:
    if split not in _SPLIT_ID:
        raise ValueError(f"split: got {split!r}; allowed: 'train', 'eval'")
    return _SPLIT_ID[split]


# ----------------------------------------------------------------------------------------------------------
# Tokenizers


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> np.ndarray: ...

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 is end-of-document. vocab_size = 257."""

    name = "byte"

    def __init__(self) -> None:
        self.vocab_size = 257
        self.eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        """text -> [n_bytes] int64 ids. No eos is appended."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        """ids (any int sequence / array / tensor) -> text.

        eos and ids >= 256 are dropped (a model with a padded vocab can sample them), and byte sequences
        that are not valid UTF-8 (a window cut mid-character) become U+FFFD rather than an error.
        """
        arr = np.asarray(ids.tolist() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64).reshape(-1)
        arr = arr[(arr >= 0) & (arr < 256)]
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


# End-of-document tokens of common tokenizer families, in the order they are tried.
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer behind the `ByteTokenizer` interface.

    vocab_size counts added tokens. eos_id rule: the first of `EOS_CANDIDATES` present in the vocabulary;
    if none is, vocab_size - 1 (a documented guess: many tokenizers put their specials at the end).
    Encoding never adds special tokens (no BOS/EOS templates): the sources add eos themselves.
    """

    def __init__(self, tok, path: str) -> None:
        self._tok = tok
        self.name = path
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eos_token: str | None = None
        self.eos_id = self.vocab_size - 1
        for cand in EOS_CANDIDATES:
            tid = tok.token_to_id(cand)
            if tid is not None:
                self.eos_token, self.eos_id = cand, tid
                break

    def encode(self, text: str) -> np.ndarray:
        """text -> [n] int64 ids."""
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Encode many documents at once (the Rust side parallelises this)."""
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def decode(self, ids) -> str:
        """ids -> text, special tokens (eos) skipped."""
        lst = ids.tolist() if isinstance(ids, (torch.Tensor, np.ndarray)) else list(ids)
        return self._tok.decode([int(i) for i in lst], skip_special_tokens=True)


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """"byte" -> ByteTokenizer; otherwise a local directory holding `tokenizer.json` (or that file itself).

    Raises FileNotFoundError naming the path when it is missing, ImportError when `tokenizers` is absent.
    """
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    file = path / "tokenizer.json" if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"tokenizer: {spec!r} is neither 'byte' nor an existing local directory")
    if not file.is_file():
        raise FileNotFoundError(f"tokenizer: no tokenizer.json in {str(path)!r}")
    try:
        import tokenizers  # lazy: only HF-tokenised runs need it
    except ImportError as e:
        raise ImportError(f"tokenizer {spec!r} needs the `tokenizers` package: pip install tokenizers") from e
    return HFTokenizer(tokenizers.Tokenizer.from_file(str(file)), str(path))


# ----------------------------------------------------------------------------------------------------------
# Batches and the source interface


@dataclass
class Batch:
    """tokens: [B, S+1] int64; the model reads tokens[:, :-1] and predicts tokens[:, 1:].

    domains: [B] int64, the synthetic domain of each row (all of a row's tokens share it); None for real data.
    """

    tokens: torch.Tensor
    domains: torch.Tensor | None = None

    @property
    def inputs(self) -> torch.Tensor:
        return self.tokens[:, :-1]

    @property
    def targets(self) -> torch.Tensor:
        return self.tokens[:, 1:]


class TokenSource:
    """Base class: deterministic batches of token windows. Every id is < `vocab_size`."""

    vocab_size: int
    tokenizer: ByteTokenizer | HFTokenizer | None = None  # None when ids are not text (synthetic)
    n_domains: int = 0  # > 0: every Batch carries `domains` in 0..n_domains-1 (the synthetic mixture)

    def batch(self, split: str, index: int, batch_size: int, seq_len: int) -> Batch:
        """Batch number `index` of `split`; a pure function of (seed, split, index, batch_size, seq_len)."""
        raise NotImplementedError

    def rows(self, split: str, index: int, batch_size: int, seq_len: int,
             ranges: Sequence[tuple[int, int]]) -> Batch:
        """Rows `ranges` of `batch(split, index, batch_size, seq_len)`, concatenated in order: [sum of the
        ranges' lengths, seq_len+1]. ranges: sorted, disjoint (start, stop) row ranges. Sources override it to
        build those rows alone; this fallback builds the batch and slices it."""
        idx = torch.from_numpy(_range_index(ranges, batch_size))
        b = self.batch(split, index, batch_size, seq_len)
        return Batch(b.tokens[idx], None if b.domains is None else b.domains[idx])

    def describe(self) -> dict:
        """A JSON-able summary: source name, vocab, tokens per split, ..."""
        raise NotImplementedError


def _range_index(ranges: Sequence[tuple[int, int]], batch_size: int) -> np.ndarray:
    """The row indices of sorted, disjoint (start, stop) ranges inside a batch of batch_size; ValueError
    naming the first range that is not."""
    last = 0
    for start, stop in ranges:
        if not last <= start <= stop <= batch_size:
            raise ValueError(f"rows: range ({start}, {stop}) is not inside the batch of {batch_size} rows after "
                             f"row {last}; allowed: sorted, disjoint (start, stop) ranges within 0..{batch_size}")
        last = stop
    return np.concatenate([np.arange(a, b) for a, b in ranges] or [np.zeros(0, np.int64)]).astype(np.int64)


def rank_rows(micro: int, n_micro: int, rank: int, world_size: int) -> list[tuple[int, int]]:
    """The rows of a global batch that rank `rank` of `world_size` trains on: in each of the n_micro
    micro-batches of `micro` rows, its equal share [i micro + rank n, i micro + (rank+1) n), n = micro / W.
    The same rows `parallel.Parallel.local_rows` cuts from each micro-batch."""
    n = micro // world_size
    if n * world_size != micro or not 0 <= rank < world_size:
        raise ValueError(f"rank_rows: a micro-batch of {micro} rows does not split over {world_size} ranks "
                         f"(rank {rank})")
    return [(i * micro + rank * n, i * micro + (rank + 1) * n) for i in range(n_micro)]


def rank_batches(source: TokenSource, split: str, index: int, batch_size: int, seq_len: int, micro: int,
                 rank: int = 0, world_size: int = 1) -> list[Batch]:
    """This rank's micro-batches of batch `index`: n = batch_size / micro of them, each [micro / W, seq_len+1],
    exactly the slices of `source.batch(split, index, batch_size, seq_len)` the rank trains on (`rank_rows`),
    built without the other ranks' rows. A pure function of (source seed, split, index, sizes, rank layout),
    so a resumed run sees the same tokens."""
    if batch_size % micro:
        raise ValueError(f"rank_batches: batch_size {batch_size} is not a multiple of the micro-batch {micro}")
    n_micro = batch_size // micro
    if world_size == 1:  # one process: its rows are the whole batch
        b = source.batch(split, index, batch_size, seq_len)
    else:
        b = source.rows(split, index, batch_size, seq_len, rank_rows(micro, n_micro, rank, world_size))
    n = micro // world_size
    toks = b.tokens.split(n)
    doms = [None] * n_micro if b.domains is None else b.domains.split(n)
    return [Batch(t, d) for t, d in zip(toks, doms)]


T = TypeVar("T")


class Prefetcher(Generic[T]):
    """`make(step)` for steps start, start+1, .., stop-1, built ahead in a daemon thread.

    At most `depth` results wait in a bounded queue, so memory stays at `depth` batches whatever the speed of
    the consumer. `get(step)` returns them in order (asking for any other step is a ValueError: the results
    must be what `make` gives for that step, so the stream cannot skip); an exception raised by `make` is
    re-raised in the caller's thread by the `get` for that step, with its traceback. `close()` (or leaving a
    `with` block) stops the thread and waits for it; it never blocks on a full queue, since the producer
    checks for shutdown between waits.
    """

    _POLL_S = 0.1  # how often a blocked producer or consumer checks for shutdown / a dead peer

    def __init__(self, make: Callable[[int], T], start: int, stop: int, depth: int = 2):
        if depth < 1:
            raise ValueError(f"Prefetcher depth: got {depth}; allowed: an integer >= 1")
        self._make, self._next, self._stop_at = make, start, stop
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(start, stop), daemon=True,
                                        name="moelab-prefetch")
        self._thread.start()

    def _put(self, item: tuple) -> bool:
        while not self._closing.is_set():
            try:
                self._queue.put(item, timeout=self._POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _work(self, start: int, stop: int) -> None:
        for step in range(start, stop):
            if self._closing.is_set():
                return
            try:
                item = (step, self._make(step), None)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, who re-raises it
                self._put((step, None, e))
                return
            if not self._put(item):
                return

    def get(self, step: int) -> T:
        """The result of make(step); blocks until the thread has built it."""
        if step != self._next or step >= self._stop_at:
            raise ValueError(f"Prefetcher: asked for step {step}; the next one built is {self._next} (of "
                             f"{self._stop_at})")
        while True:
            try:
                got, value, err = self._queue.get(timeout=self._POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError(f"Prefetcher: the thread ended before step {step}") from None
        self._next += 1
        if err is not None:
            raise err
        return value

    def close(self) -> None:
        """Stop the thread and wait for it (a `make` in progress finishes first)."""
        self._closing.set()
        while True:  # free a producer blocked on a full queue at once rather than after its poll
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> "Prefetcher[T]":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------------
# Synthetic: a mixture of Markov chains


def _stationary(P: np.ndarray) -> np.ndarray:
    """Stationary distribution of row-stochastic P [V, V]: solves pi P = pi, sum(pi) = 1.

    A direct solve rather than power iteration: Dirichlet rows with small concentration make chains that
    mix slowly, where power iteration would need many steps. Replacing one equation of the singular system
    (P^T - I) pi = 0 by the normalisation makes it regular for an irreducible chain.
    """
    V = P.shape[0]
    A = P.T - np.eye(V)
    A[-1] = 1.0
    b = np.zeros(V)
    b[-1] = 1.0
    pi = np.clip(np.linalg.solve(A, b), 0.0, None)
    return pi / pi.sum()


def _row_entropy(P: np.ndarray) -> np.ndarray:
    """Entropy in nats of each row of [..., V] distributions (0 log 0 = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(P > 0, P * np.log(P), 0.0).sum(-1)


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return np.log(np.exp(x - m).sum(axis=axis)) + m.squeeze(axis)


class SyntheticMarkov(TokenSource):
    """K random first-order Markov chains ("domains") over symbols 0..V-1; token id = symbol.

    transitions [K, V, V]: row i of domain k ~ Dirichlet(concentration * 1_V).
    initial [K, V]: each domain's stationary distribution (`initial="stationary"`, the default) or uniform
        (`initial="uniform"`). Stationary makes the mixture a stationary process, so the Bayes loss at
        position t never increases with t and never drops below `entropy_rate()` (exactly, not just
        asymptotically); uniform makes the first token carry no domain information.
    prior [K]: uniform. Each document (batch row) draws one domain from the prior.

    The parameters depend only on `seed`; batches on (seed, split, index, batch_size, seq_len). Train and
    eval are the same distribution and differ only in the random draws.
    """

    _PARAM_STREAM = 0x4D61726B  # separates the parameter RNG from the batch RNGs ([seed, split, index])
    _BAYES_STREAM = 0x42617965

    def __init__(self, n_domains: int = 4, n_symbols: int = 64, concentration: float = 0.1, seed: int = 0,
                 initial: str = "stationary") -> None:
        if n_domains < 1:
            raise ValueError(f"n_domains: got {n_domains}; allowed: an integer >= 1")
        if n_symbols < 2:
            raise ValueError(f"n_symbols: got {n_symbols}; allowed: an integer >= 2")
        if not concentration > 0:
            raise ValueError(f"concentration: got {concentration}; allowed: a number > 0")
        if initial not in ("stationary", "uniform"):
            raise ValueError(f"initial: got {initial!r}; allowed: 'stationary', 'uniform'")
        self.n_domains, self.n_symbols, self.concentration = n_domains, n_symbols, float(concentration)
        self.seed, self.initial_kind = seed, initial
        self.vocab_size = n_symbols
        K, V = n_domains, n_symbols

        rng = _rng(seed, self._PARAM_STREAM)
        P = rng.dirichlet(np.full(V, self.concentration), size=(K, V))
        # Tiny concentrations can underflow entries to exactly 0, or (rarely) a whole row to NaN; a floor
        # keeps every chain irreducible so the stationary distribution is unique.
        P = np.nan_to_num(P, nan=0.0) + 1e-12
        self.transitions = P / P.sum(-1, keepdims=True)
        if initial == "stationary":
            self.initial = np.stack([_stationary(self.transitions[k]) for k in range(K)])
        else:
            self.initial = np.full((K, V), 1.0 / V)
        self.prior = np.full(K, 1.0 / K)
        # CDFs for inverse-transform sampling; the last column is forced to 1 so rounding can never push a
        # uniform draw past it.
        self._trans_cdf = np.cumsum(self.transitions, -1)
        self._trans_cdf[..., -1] = 1.0
        self._init_cdf = np.cumsum(self.initial, -1)
        self._init_cdf[..., -1] = 1.0

    # -- sampling ---------------------------------------------------------------------------------------
    def sample(self, rng: np.random.Generator, domains: np.ndarray, length: int,
               ranges: Sequence[tuple[int, int]] | None = None, total: int | None = None) -> np.ndarray:
        """Sample one document per entry of `domains` [N]: returns [N, length] int64.

        Vectorised over documents; the loop runs over time steps only. Draw order (all N at step 0, then
        all N at step 1, ...) makes shorter documents exact prefixes of longer ones for the same rng state.

        ranges, total: the documents are rows `ranges` (sorted, disjoint (start, stop)) of a sample of `total`
        documents, and get exactly that sample's tokens. The uniforms of all `total` rows are drawn (one
        double per token, in the same order), only these rows' tokens are computed: the per-token work is the
        CDF lookup over the vocabulary, the draw is cheap. Uniforms come in chunks of time steps (about
        8 MB), so memory does not grow with total x length.
        """
        N = len(domains)
        total = N if total is None else total
        keep = None if ranges is None else _range_index(ranges, total)
        if (N if keep is None else len(keep)) != N:
            raise ValueError(f"sample: {N} domains for the {len(keep)} rows of ranges {list(ranges)}")
        chunk = max(1, (1 << 20) // max(total, 1))  # time steps per draw
        out = np.empty((N, length), dtype=np.int64)
        for t in range(length):
            if t % chunk == 0:  # rng.random((k, total)) is k successive rng.random(total), row-major
                u_all = rng.random((min(chunk, length - t), total))
                u_all = u_all if keep is None else u_all[:, keep]
            u = u_all[t % chunk]
            # Inverse-transform sampling: the first index whose CDF exceeds u ~ U[0, 1).
            cdf = self._init_cdf[domains] if t == 0 else self._trans_cdf[domains, out[:, t - 1]]  # [N, V]
            out[:, t] = (cdf <= u[:, None]).sum(-1)
        return out

    def batch(self, split: str, index: int, batch_size: int, seq_len: int) -> Batch:
        """batch_size documents of seq_len+1 tokens, each from one domain drawn from the prior."""
        return self.rows(split, index, batch_size, seq_len, [(0, batch_size)])

    def rows(self, split: str, index: int, batch_size: int, seq_len: int,
             ranges: Sequence[tuple[int, int]]) -> Batch:
        """Rows `ranges` of the batch: all batch_size domains are drawn (one uniform each, the draw the batch
        starts with), then only these rows' tokens (see `sample`)."""
        idx = _range_index(ranges, batch_size)
        rng = _rng(self.seed, _check_split(split), index)
        domains = rng.choice(self.n_domains, size=batch_size, p=self.prior)[idx]
        tokens = self.sample(rng, domains, seq_len + 1, ranges, batch_size)
        return Batch(torch.from_numpy(tokens), torch.from_numpy(domains.astype(np.int64)))

    # -- loss floors --------------------------------------------------------------------------------------
    def entropy_rate(self) -> float:
        """Exact asymptotic floor in nats/token: sum_k prior_k sum_i pi_k(i) H(P_k[i]), pi_k stationary.

        Once the domain is known (long context), the best prediction is the domain's own transition row.
        """
        h = sum(self.prior[k] * _stationary(self.transitions[k]) @ _row_entropy(self.transitions[k])
                for k in range(self.n_domains))
        return float(h)

    def bayes_loss(self, seq_len: int, n_samples: int = 2048, seed: int = 12345) -> float:
        """Expected loss (nats/token) of the Bayes-optimal predictor on targets tokens[1..seq_len].

        It predicts x_t from x_0..x_{t-1} of the same document with the exact posterior over domains
        (forward recursion in log space): p(x_t | x_<t) = sum_k post_k(x_<t) P_k[x_{t-1}, x_t]. Each
        document's log-probs are exact; only the expectation over documents is Monte Carlo, with domains
        stratified by the prior (fewer wasted samples). Deterministic given (source seed, seed).
        """
        K = self.n_domains
        rng = _rng(self.seed, self._BAYES_STREAM, _seed_words(seed))
        # Stratified domains: the quantiles (i + 0.5) / n of the prior, an unbiased low-variance design.
        domains = np.searchsorted(np.cumsum(self.prior), (np.arange(n_samples) + 0.5) / n_samples)
        domains = np.minimum(domains, K - 1)
        x = self.sample(rng, domains, seq_len + 1)  # [N, S+1]
        with np.errstate(divide="ignore"):
            log_P = np.log(self.transitions)  # [K, V, V]; -inf only for impossible transitions
            log_alpha = np.log(self.prior)[None, :] + np.log(self.initial[:, x[:, 0]]).T  # [N, K]
        total = np.zeros(n_samples)
        for t in range(1, seq_len + 1):
            log_post = log_alpha - _logsumexp(log_alpha)[:, None]  # [N, K]
            step = log_P[:, x[:, t - 1], x[:, t]].T  # [N, K]: log P_k(x_t | x_{t-1})
            total -= _logsumexp(log_post + step)
            log_alpha = log_alpha + step
        return float(total.mean() / seq_len)

    def describe(self) -> dict:
        return {
            "source": "synthetic",
            "vocab_size": self.vocab_size,
            "n_domains": self.n_domains,
            "n_symbols": self.n_symbols,
            "concentration": self.concentration,
            "initial": self.initial_kind,
            "seed": self.seed,
            "entropy_rate": self.entropy_rate(),
            "n_tokens": {"train": None, "eval": None},  # unbounded
        }


# ----------------------------------------------------------------------------------------------------------
# Token streams: real data


class TokenStream(TokenSource):
    """Each split is a list of 1-D token arrays ("segments"); batch rows are windows inside one segment.

    Window starts are uniform over every valid start of the split (a segment of n tokens has n - S valid
    starts for windows of S+1 tokens), so long segments are sampled in proportion to their length.
    `documents` names what each split holds (document names for text sources, file names for memmap).
    """

    def __init__(self, name: str, splits: dict[str, list[np.ndarray]], vocab_size: int, seed: int,
                 tokenizer=None, documents: dict[str, list[str]] | None = None, extra: dict | None = None):
        self.name, self.splits, self.vocab_size, self.seed = name, splits, vocab_size, seed
        self.tokenizer = tokenizer
        self.documents = documents or {s: [] for s in SPLITS}
        self.extra = extra or {}

    def n_tokens(self, split: str) -> int:
        return int(sum(len(seg) for seg in self.splits[split]))

    def batch(self, split: str, index: int, batch_size: int, seq_len: int) -> Batch:
        return self.rows(split, index, batch_size, seq_len, [(0, batch_size)])

    def rows(self, split: str, index: int, batch_size: int, seq_len: int,
             ranges: Sequence[tuple[int, int]]) -> Batch:
        """Rows `ranges` of the batch: every row's start is drawn (one integer each), only these rows'
        windows are read."""
        idx = _range_index(ranges, batch_size)
        rng = _rng(self.seed, _check_split(split), index)
        segs = self.splits[split]
        n_starts = np.array([max(len(seg) - seq_len, 0) for seg in segs], dtype=np.int64)
        if n_starts.sum() == 0:
            longest = max((len(seg) for seg in segs), default=0)
            raise ValueError(f"{self.name} split {split!r} has {self.n_tokens(split)} tokens (longest piece "
                             f"{longest}); a window needs seq_len + 1 = {seq_len + 1} contiguous tokens; "
                             f"lower seq_len or add data")
        flat = rng.integers(0, int(n_starts.sum()), size=batch_size)[idx]
        # Map a flat start index to (segment, offset) through the cumulative start counts.
        ends = np.cumsum(n_starts)
        seg_of = np.searchsorted(ends, flat, side="right")
        offset = flat - (ends[seg_of] - n_starts[seg_of])
        out = np.empty((len(idx), seq_len + 1), dtype=np.int64)
        window = np.arange(seq_len + 1)
        for s in np.unique(seg_of):
            rows = np.nonzero(seg_of == s)[0]
            # Fancy indexing a memmap reads only the touched pages.
            out[rows] = segs[s][offset[rows, None] + window]
        if out.size and (out.min() < 0 or out.max() >= self.vocab_size):
            raise ValueError(f"{self.name} split {split!r}: token ids in [{out.min()}, {out.max()}] but "
                             f"vocab_size = {self.vocab_size} (wrong memmap_dtype or tokenizer?)")
        return Batch(torch.from_numpy(out), None)

    def describe(self) -> dict:
        d = {
            "source": self.name,
            "vocab_size": self.vocab_size,
            "tokenizer": getattr(self.tokenizer, "name", None),
            "n_tokens": {s: self.n_tokens(s) for s in SPLITS},
            "n_documents": {s: len(self.documents[s]) for s in SPLITS},
        }
        d.update(self.extra)
        return d


def _token_dtype(vocab_size: int) -> np.dtype:
    """Smallest dtype holding every id: a 32 MB byte corpus is 64 MB as uint16 instead of 256 MB as int64."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def _is_eval(name: str, eval_fraction: float) -> bool:
    """Document split by a hash of its name: stable across runs, seeds and machines, and independent of
    which other documents were read (a max_bytes change does not reshuffle the split)."""
    return _name_hash(name) < eval_fraction


def _name_hash(name: str) -> float:
    h = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


def stream_from_documents(name: str, docs: Iterable[tuple[str, str]], tokenizer, eval_fraction: float,
                          seed: int, extra: dict | None = None) -> TokenStream:
    """Tokenise (doc_name, text) pairs into a TokenStream split by document.

    Each document is followed by eos and a split's documents are concatenated into one flat stream, so
    windows can span a document boundary (the model learns what eos means). A document goes to eval when
    the hash of its name is < eval_fraction. Guarantees: with >= 2 documents both splits are non-empty (the
    lowest-hash document is moved to eval, or the highest-hash one to train); a single document is split
    by tokens instead, its last eval_fraction going to eval.
    """
    docs = list(docs)
    if not docs:
        raise ValueError(f"{name}: no documents to read")
    names = [n for n, _ in docs]
    ids = tokenizer.encode_batch([t for _, t in docs])
    dtype = _token_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype=dtype)

    if len(docs) == 1:
        stream = np.concatenate([ids[0].astype(dtype), eos])
        n_eval = min(max(1, round(len(stream) * eval_fraction)), len(stream) - 1)
        splits = {"train": [stream[:-n_eval]], "eval": [stream[-n_eval:]]}
        return TokenStream(name, splits, tokenizer.vocab_size, seed, tokenizer,
                           {"train": names, "eval": names}, extra)

    hashes = np.array([_name_hash(n) for n in names])
    is_eval = hashes < eval_fraction
    if not is_eval.any():
        is_eval[np.argmin(hashes)] = True
    if is_eval.all():
        is_eval[np.argmax(hashes)] = False
    splits, documents = {}, {}
    for split, mask in (("train", ~is_eval), ("eval", is_eval)):
        chosen = np.nonzero(mask)[0]
        parts = [p for i in chosen for p in (ids[i].astype(dtype), eos)]
        splits[split] = [np.concatenate(parts)]
        documents[split] = [names[i] for i in chosen]
    return TokenStream(name, splits, tokenizer.vocab_size, seed, tokenizer, documents, extra)


def _take_bytes(docs: Iterable[tuple[str, str]], max_bytes: int) -> Iterator[tuple[str, str]]:
    """Yield documents until max_bytes of UTF-8 text; the last one is cut to fit exactly.

    Lazy, so files past the budget are never opened.
    """
    left = max_bytes
    for name, text in docs:
        if left <= 0:
            return
        raw = text.encode("utf-8")
        if len(raw) > left:
            # Cutting mid-character leaves a partial UTF-8 sequence; drop it rather than invent a char.
            text = raw[:left].decode("utf-8", errors="ignore")
            raw = raw[:left]
        left -= len(raw)
        yield name, text


# -- stdlib ---------------------------------------------------------------------------------------------

_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_files() -> tuple[Path, list[Path]]:
    """The running Python's standard library `.py` files, sorted by relative path (tests excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not (_STDLIB_SKIP & set(p.relative_to(root).parts[:-1]))]
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_source(cfg: DataConfig, seed: int) -> TokenStream:
    """Python's own standard library as a corpus: always available, no download, ~12 MB of code."""
    root, files = stdlib_files()
    if not files:
        raise FileNotFoundError(f"stdlib: no .py files under {str(root)!r}")
    tok = load_tokenizer(cfg.tokenizer)
    docs = ((p.relative_to(root).as_posix(), p.read_text(encoding="utf-8", errors="replace")) for p in files)
    return stream_from_documents("stdlib", _take_bytes(docs, cfg.max_bytes), tok, cfg.eval_fraction, seed,
                                 extra={"root": str(root)})


# -- files ----------------------------------------------------------------------------------------------


def expand_paths(patterns: Iterable[str]) -> list[Path]:
    """Paths or glob patterns (`**` recursive) -> files, in the given order, each pattern's matches sorted.

    A directory stands for every file under it. A missing path or a pattern matching no file raises
    FileNotFoundError naming it. Duplicates are kept once.
    """
    out: list[Path] = []
    for pat in patterns:
        if any(c in pat for c in "*?["):  # a glob pattern
            matches = [Path(m) for m in sorted(glob.glob(pat, recursive=True)) if Path(m).is_file()]
            if not matches:
                raise FileNotFoundError(f"no file matches the pattern {pat!r}")
        else:
            p = Path(pat).expanduser()
            if not p.exists():
                raise FileNotFoundError(f"no such file: {pat!r}")
            matches = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
            if not matches:
                raise FileNotFoundError(f"directory {pat!r} holds no files")
        out.extend(matches)
    return list(dict.fromkeys(out))


def _read_jsonl(path: Path, field: str) -> Iterator[tuple[str, str]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(rec, dict) or field not in rec:
                raise KeyError(f"{path}:{lineno}: no field {field!r} (data.text_field) in this record")
            text = rec[field]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: field {field!r} is {type(text).__name__}, not a string")
            yield f"{path}:{lineno}", text


def _read_parquet(path: Path, field: str) -> Iterator[tuple[str, str]]:
    try:
        import pyarrow.parquet as pq  # lazy: only Parquet inputs need it
    except ImportError as e:
        raise ImportError(f"reading {path} needs the `pyarrow` package: pip install pyarrow") from e
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if field not in names:
        raise KeyError(f"{path}: no column {field!r} (data.text_field); columns: {names}")
    row = 0
    # Record batches, so a max_bytes cap stops reading a large file early.
    for rb in pf.iter_batches(columns=[field], batch_size=1024):
        for text in rb.column(0).to_pylist():
            if text is not None:
                yield f"{path}#{row}", str(text)
            row += 1


def read_documents(files: Iterable[Path], text_field: str) -> Iterator[tuple[str, str]]:
    """(name, text) per document: a whole text file, one JSONL line, or one Parquet row."""
    for path in files:
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            yield from _read_jsonl(path, text_field)
        elif suffix == ".parquet":
            yield from _read_parquet(path, text_field)
        else:
            yield str(path), path.read_text(encoding="utf-8", errors="replace")


def files_source(cfg: DataConfig, seed: int) -> TokenStream:
    """Local text (.txt, .md, anything else), .jsonl and .parquet files, tokenised in memory."""
    files = expand_paths(cfg.paths)
    tok = load_tokenizer(cfg.tokenizer)
    docs = _take_bytes(read_documents(files, cfg.text_field), cfg.max_bytes)
    return stream_from_documents("files", docs, tok, cfg.eval_fraction, seed, extra={"n_files": len(files)})


# -- memmap ---------------------------------------------------------------------------------------------


def open_tokens(path: Path, dtype: str) -> np.ndarray:
    """A read-only memory map of a token file: `.npy` (its own dtype; flattened) or raw `dtype` values."""
    if path.suffix.lower() == ".npy":
        arr = np.load(path, mmap_mode="r")
        return arr.reshape(-1)  # a view for C-contiguous files; no read
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty token file")
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"data.memmap_dtype: got {dtype!r}; allowed: a numpy integer dtype") from e
    if path.stat().st_size % dt.itemsize:
        raise ValueError(f"{path}: size {path.stat().st_size} B is not a multiple of {dt} ({dt.itemsize} B)")
    return np.memmap(path, dtype=dt, mode="r")


def memmap_source(cfg: DataConfig, seed: int) -> TokenStream:
    """Pre-tokenised files, memory-mapped. Eval is the last eval_fraction of each file (a contiguous tail).

    vocab_size comes from the tokenizer spec (byte -> 257), not from scanning the files (max id + 1 would
    read every byte of a multi-GB file); `batch` checks each window against it instead.
    """
    files = expand_paths(cfg.paths)
    tok = load_tokenizer(cfg.tokenizer)
    splits: dict[str, list[np.ndarray]] = {"train": [], "eval": []}
    for path in files:
        arr = open_tokens(path, cfg.memmap_dtype)
        n = len(arr)
        if n < 2:
            raise ValueError(f"{path}: {n} token(s); need at least 2 to have train and eval")
        n_eval = min(max(1, round(n * cfg.eval_fraction)), n - 1)
        splits["train"].append(arr[: n - n_eval])
        splits["eval"].append(arr[n - n_eval:])
    names = [str(p) for p in files]
    return TokenStream("memmap", splits, tok.vocab_size, seed, tok, {"train": names, "eval": names},
                       extra={"n_files": len(files)})


# ----------------------------------------------------------------------------------------------------------


def build_source(cfg: DataConfig, seed: int) -> TokenSource:
    """The TokenSource `cfg.source` names, seeded with the run seed."""
    if cfg.source == "synthetic":
        return SyntheticMarkov(cfg.n_domains, cfg.n_symbols, cfg.concentration, seed)
    if cfg.source == "stdlib":
        return stdlib_source(cfg, seed)
    if cfg.source == "files":
        return files_source(cfg, seed)
    if cfg.source == "memmap":
        return memmap_source(cfg, seed)
    raise ValueError(f"data.source: got {cfg.source!r}; allowed: 'synthetic', 'stdlib', 'files', 'memmap'")
