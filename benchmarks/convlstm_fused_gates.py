"""Fused-gate ConvLSTM vs a per-gate reference: forward + backward over a sequence, CPU.

Target (forecasting issue): the fused cell (one convolution for the four gates) is >= 1.5x a
per-gate reference, with the same outputs to 1e-5. Two references are timed: the textbook cell
(per gate one convolution of x and one of h: eight convolutions) and a per-gate cell over the
concatenated [x, h] (four convolutions). All run in this process on the same inputs, alternating,
and the medians are compared.

Usage::

    python benchmarks/convlstm_fused_gates.py --repeats 7 --profile

``--profile`` prints the share of the fused cell's time spent in convolutions: the gates'
arithmetic is the same in every variant, so that share bounds what fusing can save. The script
also times the gate convolution alone, once with ``4 * hidden`` output channels against four
convolutions with ``hidden`` each (forward + backward): that ratio is what fusing the gates can
gain from the convolutions themselves on this machine's kernels.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monai_twin.networks import ConvLSTMCell
from tests.networks.reference import PerGateConvLSTMCell, TextbookConvLSTMCell

CASES = {
    "2D  B4 T4 C16->H32 64x64": (2, 4, 4, 16, 32, (64, 64)),
    "3D  B2 T4 C8->H16 32^3": (3, 2, 4, 8, 16, (32, 32, 32)),
}


def run_sequence(cell, x: torch.Tensor, hidden: int) -> torch.Tensor:
    b, t = x.shape[:2]
    h = x.new_zeros((b, hidden, *x.shape[3:]))
    c = h.clone()
    for step in range(t):
        h, c = cell(x[:, step], (h, c))
    return h


def timed(cell, x, hidden) -> float:
    start = time.perf_counter()
    out = run_sequence(cell, x, hidden)
    out.square().mean().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = one core, less noise)")
    parser.add_argument(
        "--profile", action="store_true", help="also print where the fused cell's time goes (torch.profiler)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for name, (dims, b, t, c_in, hidden, spatial) in CASES.items():
        fused = ConvLSTMCell(dims, c_in, hidden)
        references = {
            "textbook (8 convs)": TextbookConvLSTMCell(fused),
            "per-gate on [x,h] (4 convs)": PerGateConvLSTMCell(fused),
        }
        x = torch.randn(b, t, c_in, *spatial)
        samples = {"fused": []} | {k: [] for k in references}
        cells = {"fused": fused} | references
        errors = {}
        with torch.no_grad():
            out = run_sequence(fused, x, hidden)
            for k, ref in references.items():
                errors[k] = (out - run_sequence(ref, x, hidden)).abs().max().item()
        for cell in cells.values():
            timed(cell, x, hidden)  # warm-up
        for _ in range(args.repeats):
            for k, cell in cells.items():
                samples[k].append(timed(cell, x, hidden))
        f_med = statistics.median(samples["fused"])
        print(f"{name}: fused {f_med * 1e3:7.1f} ms")
        for k in references:
            r_med = statistics.median(samples[k])
            print(
                f"    vs {k:28s} {r_med * 1e3:7.1f} ms  speed-up {r_med / f_med:4.2f}x (target >= 1.5x)  "
                f"max |diff| {errors[k]:.1e} (target <= 1e-5)"
            )
        conv_ratio = _conv_fusion_ratio(fused, x[:, 0], hidden, args.repeats)
        print(
            f"    gate convolution alone: four {hidden}-channel convs / one {4 * hidden}-channel conv = {conv_ratio:4.2f}x"
        )
        if args.profile:
            _profile(fused, x, hidden, args.repeats)


def _conv_fusion_ratio(cell, x0: torch.Tensor, hidden: int, repeats: int) -> float:
    """Median time of four per-gate convolutions over ``[x, h]`` divided by that of the fused one."""
    conv = cell.gates
    z = torch.cat([x0, x0.new_zeros((x0.shape[0], hidden, *x0.shape[2:]))], dim=1).requires_grad_(True)
    k = conv.kernel_size[0]
    split = [type(conv)(conv.in_channels, hidden, k, padding=k // 2) for _ in range(4)]

    def fused_step() -> float:
        start = time.perf_counter()
        conv(z).square().mean().backward()
        return time.perf_counter() - start

    def split_step() -> float:
        start = time.perf_counter()
        sum(c(z).square().mean() for c in split).backward()
        return time.perf_counter() - start

    fused_step(), split_step()  # warm-up
    f_times, s_times = [], []
    for _ in range(repeats):
        f_times.append(fused_step())
        s_times.append(split_step())
    return statistics.median(s_times) / statistics.median(f_times)


def _profile(cell, x, hidden, repeats) -> None:
    """Share of the fused cell's forward + backward time spent in convolutions (the floor of any fusion)."""
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(repeats):
            timed(cell, x, hidden)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if "convolution" in e.key)
    print(f"    fused cell: convolution forward + backward = {100 * conv / total:.0f} % of the time")


if __name__ == "__main__":
    main()
