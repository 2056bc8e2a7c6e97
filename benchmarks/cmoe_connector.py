"""Connector-MoE (CMoE) vs the plain two-layer MLP connector: parameters, step time and memory.

Each connector maps resampled visual tokens (B, L, in_dim) to the LLM width H; one training step
is forward, a squared-output loss, backward and an AdamW step on the connector alone (the LLM
side is the same for every connector). Variants: the MLP baseline, the reference CMoE (soft
router, hidden 4 x its input), CMoE with a router 1/16 of that width, and the sparse top-2
router computing all experts or only the selected ones.

Memory: on CUDA the peak allocated during steps minus the memory before them; on CPU the exact
bytes of parameters + gradients + AdamW state plus the activations saved for backward (counted
with saved-tensor hooks). Scales too large for the device (``--max-params``) report parameters only.

    python benchmarks/cmoe_connector.py                       # CPU: demo and swin_tiny scales
    python benchmarks/cmoe_connector.py --device cuda --scales demo swin_tiny reference
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from umedpt.mllm import ConnectorMoE, MLPConnector
from umedpt.mllm.prompts import IMAGE_TASKS

#: name -> (in_dim = rate x encoder channels, LLM width H, tokens L per image, batch size)
SCALES: dict[str, tuple[int, int, int, int]] = {
    "demo": (4 * 256, 128, 4, 8),  # tiny Swin of configs/quick.yaml at 128 px, demo LM
    "swin_tiny": (4 * 768, 1024, 16, 4),  # swin_tiny at 256 px (8 x 8 patches), a 1024-wide LM
    "reference": (4 * 1408, 4096, 64, 4),  # Uni-Med: EVA ViT-G/14 at 224 px, LLaMA2-7B
}
VARIANTS: dict[str, dict[str, Any]] = {
    "mlp": {},
    "cmoe_soft": {"router_type": "soft"},
    "cmoe_soft_small_router": {"router_type": "soft", "router_hidden_ratio": 1 / 16},
    "cmoe_sparse_top2": {"router_type": "sparse"},
    "cmoe_sparse_top2_compute": {"router_type": "sparse", "sparse_compute": True},
}


def build(variant: str, in_dim: int, width: int) -> nn.Module:
    """The connector of ``variant`` for ``in_dim`` tokens and an LLM of ``width``."""
    spec = dict(VARIANTS[variant])
    if variant == "mlp":
        return MLPConnector(in_dim, width)
    ratio = spec.pop("router_hidden_ratio", None)
    if ratio is not None:
        spec["router_hidden"] = int(4 * 2 * in_dim * ratio)  # router input = task token + token
    return ConnectorMoE(in_dim, width, IMAGE_TASKS, **spec)


def count(module: nn.Module, prefix: str) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if n.startswith(prefix))


def parameter_counts(variant: str, in_dim: int, width: int) -> dict[str, int]:
    """Parameters of the connector (built on the meta device: no memory)."""
    with torch.device("meta"):
        module = build(variant, in_dim, width)
    return {
        "params": count(module, ""),
        "router_params": count(module, "router") + count(module, "task_tokens"),
        "expert_params": count(module, "experts") + count(module, "mlp"),
    }


class SavedBytes:
    """Bytes of the tensors autograd saves for backward (parameters excluded, storages once)."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.skip = {p.untyped_storage().data_ptr() for p in params}
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in self.skip and pointer not in self.seen:
            self.seen.add(pointer)
            self.bytes += storage.nbytes()
        return tensor


def measure(variant: str, scale: str, device: str, steps: int) -> dict[str, float]:
    """Median step time (ms) and memory (MiB) of training the connector alone."""
    in_dim, width, length, batch = SCALES[scale]
    torch.manual_seed(0)
    module = build(variant, in_dim, width).to(device)
    params = list(module.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    tokens = torch.randn(batch, length, in_dim, device=device)
    saved = SavedBytes(params)

    def step() -> None:
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            out, _ = module(tokens, "vqa")
            loss = out.float().square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up: allocates gradients and optimizer state
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    times = []
    for _ in range(steps):
        saved.seen.clear()
        saved.bytes = 0
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        state = torch.cuda.memory_allocated()
        peak_mib = (torch.cuda.max_memory_allocated() - before + state) / 2**20
    else:
        state_bytes = sum(p.numel() * p.element_size() * 4 for p in params)  # weights, grads, Adam m and v
        peak_mib = (state_bytes + saved.bytes) / 2**20
    return {"step_ms": 1000 * statistics.median(times), "memory_mib": peak_mib}


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the results."""
    lines = [
        "| scale | connector | params | router | experts | step ms | memory MiB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        step = "-" if r.get("step_ms") is None else f"{r['step_ms']:.1f}"
        memory = "-" if r.get("memory_mib") is None else f"{r['memory_mib']:.0f}"
        lines.append(
            f"| {r['scale']} | {r['connector']} | {r['params'] / 1e6:.2f} M | {r['router_params'] / 1e6:.2f} M "
            f"| {r['expert_params'] / 1e6:.2f} M | {step} | {memory} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scales", nargs="+", default=["demo", "swin_tiny", "reference"], choices=list(SCALES)
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    parser.add_argument(
        "--max-params", type=float, default=3e8, help="time only connectors up to this many parameters"
    )
    parser.add_argument(
        "--output", default=None, help="JSON file (default benchmarks/results/cmoe_<device>.json)"
    )
    args = parser.parse_args(argv)
    rows = []
    for scale in args.scales:
        in_dim, width, length, batch = SCALES[scale]
        for variant in args.variants:
            row: dict[str, Any] = {"scale": scale, "connector": variant, "in_dim": in_dim, "llm_width": width}
            row.update({"tokens": length, "batch": batch, **parameter_counts(variant, in_dim, width)})
            if row["params"] <= args.max_params:
                row.update(measure(variant, scale, args.device, args.steps))
            rows.append(row)
            print(f"{scale:>10s} {variant:>26s} done", file=sys.stderr, flush=True)
    print(table(rows))
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    result = {
        "device": args.device,
        "device_name": device_name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "rows": rows,
    }
    output = Path(args.output or Path(__file__).parent / "results" / f"cmoe_{args.device}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
