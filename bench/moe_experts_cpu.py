"""CPU benchmark of moe_experts forward+backward against the seed-style loop and the fp32 GEMM rate.

Two ceilings, both pure GEMMs doing the same FLOPs (2 forward, 4 backward per expert block):
- "gemm, one block": every routed slot through one expert-shaped weight (large GEMMs, the strictest bar);
- "gemm, per expert": the same GEMMs at the per-expert shapes moe_experts runs (S/E rows each), with no
  routing, gathers or SwiGLU: the limit of any grouped implementation at this shape on this CPU.
All paths are timed interleaved, round by round, so a change in machine load hits them alike; medians are
reported.

    OMP_NUM_THREADS=2 python bench/moe_experts_cpu.py [--tokens 2048 --d 256 --de 1024 --experts 16 --topk 2]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from seed_loop import seed_loop_moe  # noqa: E402

from moelab.kernels import moe_experts  # noqa: E402


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--de", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    T, d, de, E, k = a.tokens, a.d, a.de, a.experts, a.topk
    S = T * k
    x = torch.randn(T, d, requires_grad=True)
    wgu = (torch.randn(E, 2 * de, d) / d**0.5).requires_grad_()
    wd = (torch.randn(E, d, de) / de**0.5).requires_grad_()
    logits = torch.randn(T, E)
    topw, idx = logits.softmax(-1).topk(k, -1)
    topw.requires_grad_()
    dout = torch.randn(T, d)
    # Dense ceiling: all S slots through one expert-shaped weight, forward and backward GEMMs only.
    xs, W1, W2 = torch.randn(S, d), torch.randn(2 * de, d), torch.randn(d, de)
    a_, dy = torch.randn(S, de), torch.randn(S, d)

    def gemms():
        h = xs @ W1.t()
        y = a_ @ W2.t()
        dW2 = dy.t() @ a_
        da = dy @ W2
        dh = h  # same shape as the real dh
        dW1 = dh.t() @ xs
        dx = dh @ W1
        return y, dW2, da, dW1, dx

    rows = S // E
    blocks = [(torch.randn(rows, d), torch.randn(2 * de, d), torch.randn(d, de), torch.randn(rows, de),
               torch.randn(rows, d), torch.randn(rows, 2 * de)) for _ in range(E)]

    def gemms_per_expert():
        for xe, w1, w2, ae, dye, dhe in blocks:
            xe @ w1.t()
            ae @ w2.t()
            dye.t() @ ae
            dye @ w2
            dhe.t() @ xe
            dhe @ w1

    def fwd_bwd(fn):
        def run():
            out = fn(x, wgu, wd, idx, topw)
            torch.autograd.grad(out, (x, wgu, wd, topw), dout)
        return run

    flops = 3 * 6 * S * d * de  # fwd 2*S*d*2de + 2*S*de*d; bwd twice that
    cases = {"gemm, one block": gemms, "gemm, per expert": gemms_per_expert, "moe_experts": fwd_bwd(moe_experts),
             "seed loop": fwd_bwd(seed_loop_moe)}
    for fn in cases.values():
        fn()  # warm up
    times = {name: [] for name in cases}
    for _ in range(a.rounds):
        for name, fn in cases.items():
            times[name].append(timed(fn))
    med = {n: statistics.median(t) for n, t in times.items()}
    ceiling = flops / med["gemm, one block"]
    grouped = flops / med["gemm, per expert"]
    print(f"moe_experts fwd+bwd, T={T} d={d} d_e={de} E={E} k={k}, fp32, {a.threads} threads, "
          f"median of {a.rounds} interleaved rounds")
    print("| path | ms | GFLOP/s | share of one-block GEMM rate | share of per-expert GEMM rate |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, t in med.items():
        rate = flops / t
        print(f"| {name} | {t * 1e3:.1f} | {rate / 1e9:.1f} | {rate / ceiling:.0%} | {rate / grouped:.0%} |")


if __name__ == "__main__":
    main()
