"""Host reads of device data (syncs on CUDA), counted on CPU with `host_reads.HostReads`.

Budget: an MoE layer's forward + backward reads nothing in one process and one thing with expert parallelism
(the all_to_all split sizes); a training step between log lines reads nothing outside its MoE layers; a log
line reads a constant number of times, whatever the number of layers.

Not counted, and why:
- the reference expert kernel (`moelab.kernels.reference`): it reads each expert's row count to slice its
  GEMMs, and it is the CPU backend; on CUDA `moe_experts` runs the Triton kernel, which reads nothing
  (tests/kernels/test_triton_moe.py::test_no_host_sync_in_forward_and_backward checks it on a GPU);
- AdamW's step counters: without `capturable` / `fused` (asserted below) they are CPU tensors on every
  device, so reading them waits for nothing.
"""

import contextlib

import pytest
import torch

from distributed import run_distributed
from host_reads import HostReads, pause_in
from moelab.trainers.config import load_run_config

TINY = {"train.batch_size": 4, "train.seq_len": 16, "train.log_every": 1, "train.eval_every": 0,
        "train.ckpt_every": 0}
ROUTINGS = {
    "switch": {},
    "capacity-shared-gate": {"model.moe.capacity_factor": 1.0, "model.moe.n_shared": 1, "model.moe.shared_gate": True},
    "deepseek-v3": {"model.moe.score_func": "sigmoid", "model.moe.n_group": 4, "model.moe.topk_group": 2,
                    "model.moe.routed_scaling_factor": 2.5, "model.moe.seq_aux_loss_coef": 1e-3,
                    "model.moe.bias_update_rate": 1e-3},
}


@contextlib.contextmanager
def counting(opt=None):
    """HostReads, with the reference expert kernel (and `opt`'s step) left uncounted: see the module docstring."""
    from moelab.kernels import reference

    with HostReads() as reads, pause_in(reads, reference._MoEExperts, "forward", "backward"):
        if opt is None:
            yield reads
            return
        for g in opt.param_groups:  # step counters on the host: reading them is no device sync
            assert not g.get("capturable") and not g.get("fused"), g["name"]
        with pause_in(reads, type(opt), "step"):
            yield reads


def test_counter_sees_every_kind_of_read():
    """The tool itself: each way of reading device data is counted once, and the sync-free forms are not."""
    t = torch.tensor([3, -1, 2, 0])
    reads_of = {
        "item": lambda: t[0].item(), "float": lambda: float(t.sum()), "bool": lambda: bool(t.sum() > 0),
        "tolist": lambda: t.tolist(), "mask": lambda: t[t >= 0], "nonzero": lambda: t.nonzero(),
        "bincount": lambda: torch.bincount(t + 1, minlength=5),
        "repeat_interleave": lambda: torch.repeat_interleave(t.clamp_min(0)),
        "unique": lambda: torch.unique(t), "host data": lambda: torch.tensor(float(t.numel())),
    }
    for name, fn in reads_of.items():
        with HostReads() as reads:
            fn()
        assert reads.count() == 1, (name, reads.summary())
    with HostReads() as reads:
        torch.zeros(5, dtype=torch.long).scatter_add_(0, t + 1, torch.ones_like(t))
        torch.repeat_interleave(t.clamp_min(0), output_size=5)
        torch.where(t >= 0, t, 4).argsort(stable=True)
        with reads.paused():
            t.tolist()
    assert reads.count() == 0, reads.summary()


def _moe_layer(overrides):
    from moelab.trainers.model import build_model

    rc = load_run_config("moe-tiny", {**TINY, **overrides})
    return rc, build_model(rc.model, seed=0).layers[0].ffn


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_moe_layer_forward_backward_reads_nothing(routing):
    rc, moe = _moe_layer(ROUTINGS[routing])
    x = torch.randn(2, 16, rc.model.d_model, requires_grad=True)
    with counting() as reads:
        out = moe(x)
        (out.square().sum() + moe.aux_loss + moe.z_loss + moe.seq_aux_loss).backward()
        moe.update_bias()
    assert reads.count() == 0, reads.summary()
    if routing == "capacity-shared-gate":
        assert float(moe.stats["dropped"]) > 0  # the capacity path ran


def _ep_layer_reads(rank, world_size, overrides):
    from moelab.trainers.model import build_model
    from moelab.trainers.parallel import apply_ep, init_parallel

    rc = load_run_config("moe-tiny", {**TINY, "train.ep": 2, **overrides})
    model = apply_ep(build_model(rc.model, seed=0), init_parallel(2, rc.model.moe.n_experts))
    moe = model.layers[0].ffn
    x = torch.randn(2, 16, rc.model.d_model, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    with counting() as reads:
        out = moe(x)
        (out.square().sum() + moe.aux_loss + moe.z_loss + moe.seq_aux_loss).backward()
    return reads.count(), reads.summary()


@pytest.mark.parametrize("routing", ["switch", "capacity-shared-gate"])
def test_ep_moe_layer_reads_only_the_split_sizes(routing):
    for count, summary in run_distributed(_ep_layer_reads, 2, ROUTINGS[routing]):
        assert count == 1, summary
        assert "tolist at parallel.py" in summary


def _trainer(overrides, out, par=None):
    from moelab.trainers.loop import Trainer

    rc = load_run_config("moe-tiny", {**TINY, "model.moe.bias_update_rate": 0.01, "optim.grad_clip": 0.5,
                                      "train.micro_batch_size": 1, **overrides})
    return Trainer(rc, out, progress=False, parallel=par)


def _step_reads(tr):
    """(reads of two `_step`s, MoE layer forwards in them, reads of the log line, MoE layer forwards in it
    (evaluation), what was read)."""
    from moelab.trainers.loop import StepStats
    from moelab.trainers.moe import MoE

    tr.train_step(StepStats())  # first step outside the count: lazy initialisation (optimizer state, ...)
    stats = StepStats()
    forwards = [0]
    for _, m in tr.model.moe_layers():
        m.register_forward_hook(lambda *a: forwards.__setitem__(0, forwards[0] + 1))
    with counting(tr.opt) as reads, pause_in(reads, type(tr.source), "batch", "rows"):
        # (The data source makes its batches on the host, as it should; `Trainer._to_device` moves them with
        # a non-blocking copy from pinned memory on CUDA, which a CPU run cannot observe.)
        rows = [tr._step(stats), tr._step(stats)]  # two steps between log lines
        in_step, in_step_forwards = reads.count(), forwards[0]
        summary = reads.summary()
        reads.reset()
        assert isinstance(tr.model.layers[-1].ffn, MoE)
        tr._read_rows(rows)
        tr.moe_metrics(tr._reduce_stats(stats))
        tr.evaluate()
    return in_step, in_step_forwards, reads.count(), forwards[0] - in_step_forwards, f"{summary} | {reads.summary()}"


@pytest.mark.parametrize("overrides", [{}, {"model.mtp_depth": 1, **ROUTINGS["deepseek-v3"]}],
                         ids=["moe-tiny", "mtp-deepseek-v3-routing"])
def test_train_step_reads_nothing_between_log_lines(tmp_path, overrides):
    in_step, _, at_log, _, summary = _step_reads(_trainer(overrides, tmp_path / "a"))
    assert in_step == 0, summary
    # The log line: losses and grad norm, the MoE statistics, the eval loss: one read each, at any depth.
    assert at_log == 3, summary
    deeper = _step_reads(_trainer({**overrides, "model.n_layers": 4, "train.eval_batches": 3}, tmp_path / "b"))
    assert deeper[0] == 0 and deeper[2] == 3, deeper[4]


def _ep_step_reads(rank, world_size, out):
    from moelab.trainers.parallel import init_parallel

    tr = _trainer({"train.ep": 2, "model.moe.capacity_factor": 1.0}, out, init_parallel(2, 8))
    return _step_reads(tr)


def test_ep_train_step_reads_one_split_size_per_moe_layer(tmp_path):
    for in_step, forwards, at_log, eval_forwards, summary in run_distributed(_ep_step_reads, 2, str(tmp_path)):
        assert forwards == 2 * 2 * 2  # 2 steps x 2 micro-steps x 2 MoE layers
        assert in_step == forwards, summary
        assert at_log == 3 + eval_forwards, summary  # the log line's three, and the split sizes in evaluation
