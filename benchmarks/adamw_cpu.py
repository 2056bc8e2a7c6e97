"""The CPU optimizer step of the MLLM stage: AdamW's implementations, and subnormal moments.

Two measurements on the parameters of the demo's soft-routed CMoE connector (17.6 M, as
``MLLMModule`` builds it on the demo encoder and LM), one thread:

1. **implementation**: milliseconds per ``torch.optim.AdamW`` step with the per-parameter loop
   (``foreach=False``), ``foreach=True`` and ``fused=True`` (what ``MLLMModule`` uses on CPU at
   full precision), median of ``--repeats`` steps after one warm-up step;
2. **subnormals**: the fused step over ``--steps`` steps in which every gradient is zero after
   the first (the experts a sparse router leaves out): the moments decay geometrically and fall
   into float32's subnormal range after a few hundred steps, where x86 CPUs compute far slower.
   Measured with ``torch.set_flush_denormal`` off and on (``MLLMModule(flush_denormal=True)``,
   the default, turns it on during a CPU fit); mean milliseconds per block of 250 steps.

    OMP_NUM_THREADS=1 python benchmarks/adamw_cpu.py [--steps 2000] [--repeats 10]

Writes ``benchmarks/results/adamw_cpu.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import markdown_table, write_result  # noqa: E402

BLOCK = 250


def connector_parameters() -> list[torch.nn.Parameter]:
    """Fresh copies of the trainable connector parameters of the demo's default MLLM (soft CMoE)."""
    from umedpt.mllm import MLLMModule

    torch.manual_seed(0)
    model = MLLMModule(connector="cmoe", router_type="soft")
    return copies(list(model.connector.parameters()))


def copies(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def step_ms(params: list[torch.nn.Parameter], repeats: int, **kwargs: bool) -> float:
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), **kwargs)
    optimizer.step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def zero_gradient_blocks(params: list[torch.nn.Parameter], steps: int, flush: bool) -> list[float]:
    """Mean ms per fused step in blocks of ``BLOCK`` steps, every gradient zero after the first."""
    if not torch.set_flush_denormal(flush):
        raise SystemExit("this CPU cannot flush subnormal floats (torch.set_flush_denormal needs SSE3)")
    try:
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), fused=True)
        optimizer.step()
        for p in params:
            p.grad = torch.zeros_like(p)
        blocks, start = [], time.perf_counter()
        for i in range(1, steps + 1):
            optimizer.step()
            if i % BLOCK == 0:
                blocks.append(1e3 * (time.perf_counter() - start) / BLOCK)
                start = time.perf_counter()
        return blocks
    finally:
        torch.set_flush_denormal(False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000, help="zero-gradient steps of the subnormal measurement")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per implementation")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    params = connector_parameters()
    count = sum(p.numel() for p in params)
    implementations = {
        "loop (foreach=False)": step_ms(copies(params), args.repeats, foreach=False),
        "foreach": step_ms(copies(params), args.repeats, foreach=True),
        "fused": step_ms(copies(params), args.repeats, fused=True),
    }
    print(f"AdamW step on {count / 1e6:.2f} M connector parameters, one thread, median of {args.repeats}:")
    print(markdown_table(["implementation", "ms per step"], [[k, f"{v:.1f}"] for k, v in implementations.items()]))
    blocks = {flush: zero_gradient_blocks(copies(params), args.steps, flush) for flush in (False, True)}
    header = ["flush_denormal", *(f"steps {i * BLOCK + 1}-{(i + 1) * BLOCK}" for i in range(len(blocks[False])))]
    print(f"\nfused AdamW, gradients zero after the first step: mean ms per step per block of {BLOCK}")
    print(markdown_table(header, [[str(k).lower(), *(f"{v:.1f}" for v in b)] for k, b in blocks.items()]))
    write_result(
        "adamw_cpu",
        {
            "benchmark": "adamw_cpu",
            "settings": vars(args),
            "parameters": count,
            "step_ms": implementations,
            "zero_gradient_block_ms": {"block": BLOCK, "flush_off": blocks[False], "flush_on": blocks[True]},
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
