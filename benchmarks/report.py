"""Render README's "Performance" section and the memory plot from ``benchmarks/results/*.json``.

    python benchmarks/report.py          # rewrites the section between the README markers

The section lies between ``<!-- performance:start -->`` and ``<!-- performance:end -->``; the
plot is ``benchmarks/results/memory_vs_tasks.png`` (peak memory vs number of tasks, both loops,
one panel per recipe and device measured).
"""

from __future__ import annotations

import json
from typing import Any

from common import RESULTS, ROOT, markdown_table

START, END = "<!-- performance:start -->", "<!-- performance:end -->"
PLOT = RESULTS / "memory_vs_tasks.png"


def load(pattern: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(RESULTS.glob(pattern))]


def memory_section(results: list[dict[str, Any]]) -> str:
    parts = []
    for res in results:
        # a point is (tasks, self-supervised tasks among them): "17 + 2 SSL" after the supervised counts
        rows = {(r["tasks"], r.get("ssl_tasks", 0), r["mode"]): r for r in res["rows"]}
        points = sorted({(t, ssl) for t, ssl, _ in rows}, key=lambda p: (p[1], p[0]))

        def label(t: int, ssl: int) -> str:
            return f"{t - ssl} + {ssl} SSL" if ssl else str(t)

        def cells(t: int, ssl: int, mode: str, rows: dict = rows) -> list[Any]:
            row = rows.get((t, ssl, mode))
            if row is None:
                return ["n/a (exceeds memory)", "-"]
            return [row["peak_mb"], f"{row['ratio_to_first']:.2f}"]

        counts = [t for t, ssl in points if not ssl]
        table = markdown_table(
            ["tasks", "umedpt peak MiB", "umedpt ratio", "naive peak MiB", "naive ratio"],
            [[label(t, ssl), *cells(t, ssl, "umedpt"), *cells(t, ssl, "naive")] for t, ssl in points],
        )
        parts.append(f"**{res['recipe']} recipe, {res['device']}** ({res['date']}; ratio = peak / peak at "
                     f"{counts[0]} task)\n\n{table}")  # fmt: skip
    return "\n\n".join(parts)


def plot_memory(results: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        for mode, style in (("umedpt", "o-"), ("naive", "s--")):
            points = sorted((r["tasks"], r["peak_mb"]) for r in res["rows"] if r["mode"] == mode and not r.get("ssl_tasks"))
            if points:
                ax.plot(*zip(*points, strict=True), style, label=f"{mode} loop")
            ssl = [(r["tasks"], r["peak_mb"]) for r in res["rows"] if r["mode"] == mode and r.get("ssl_tasks")]
            if ssl:
                ax.plot(*zip(*ssl, strict=True), "*", ms=11, color=ax.lines[-1].get_color(),
                        label=f"{mode} loop, + {res['rows'][-1]['ssl_tasks']} SSL tasks")  # fmt: skip
        # naive points that were not run (their activations exceed memory): marked, not dropped
        measured = {r["tasks"] for r in res["rows"] if r["mode"] == "naive"}
        skipped = sorted({r["tasks"] for r in res["rows"] if not r.get("ssl_tasks")} - measured)
        if skipped and measured:
            top = max(r["peak_mb"] for r in res["rows"])
            ax.plot(skipped, [top * 1.08] * len(skipped), "x", color="C1", ms=9, mew=2,
                    label="naive loop: not run (exceeds memory)")  # fmt: skip
            for tasks in skipped:
                ax.annotate("not run", (tasks, top * 1.08), textcoords="offset points", xytext=(0, 7),
                            ha="center", fontsize=7, color="C1")  # fmt: skip
            ax.set_ylim(top=top * 1.25)
        ax.set(xlabel="tasks trained per step", ylabel="peak memory (MiB)",
               title=f"{res['recipe']} recipe, {res['device'].split(',')[0]}")  # fmt: skip
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)
    plt.close(fig)


def other_section() -> str:
    rows = []
    for res in load("loop_overhead_*.json"):
        med = res["median_step_s"]
        rows.append(["loop overhead (Trainer / plain PyTorch, same math)", f"{res['recipe']}, {res['device']}",
                     f"{med['lightning'] * 1000:.0f} ms vs {med['plain'] * 1000:.0f} ms per step: "
                     f"**{res['ratio']:.3f}x**, median of paired repetitions "
                     f"{res.get('paired_ratio', res['ratio']):.3f}x (target <= 1.05)"])  # fmt: skip
    for res in load("data_path_*.json"):
        rows.append(["data path (loading vs step)", f"{res['recipe']}, {res['device']}",
                     f"loading {res['load_s_per_step']:.3f} s/step vs step {res['step_s']:.3f} s: "
                     f"**{res['headroom']:.1f}x headroom** (target >= 2)"])  # fmt: skip
    for res in load("precision_layout_*.json"):
        cells = ", ".join(f"{r['option']} {r['speedup']:.2f}x" for r in res["rows"])
        rows.append(["precision/layout (speed vs fp32)", f"{res['recipe']}, {res['device']}",
                     f"{cells}; fastest correct: **{res['fastest_correct']}**"])  # fmt: skip
    for res in load("ddp_step_*.json"):
        one, two = res["rows"]
        calls = ", ".join(map(str, two["allreduce_calls_per_step"]))
        passes = ", ".join(map(str, two["sync_passes_per_step"]))
        rows.append(["DDP, 2 processes (gloo)", f"{res['recipe']}, {res['device']}",
                     f"gradient sync passes per step: **{passes}** ({calls} bucket all-reduces); step {two['median_step_s']:.2f} s vs "
                     f"{one['median_step_s']:.2f} s with 1 process ({two['samples_per_s']} vs "
                     f"{one['samples_per_s']} samples/s)"])  # fmt: skip
    return markdown_table(["benchmark", "setting", "result"], rows) if rows else ""


def readers_section() -> str:
    """Samples/s of one loading process per reader, against what the quick step consumes."""
    readers = load("data_readers_*.json")
    consumed = {r["recipe"]: r["consumed_samples_per_s"] for r in load("data_path_*.json")}
    if not readers:
        return ""
    res = readers[0]
    by_reader: dict[str, dict[int, float]] = {}
    for row in res["rows"]:
        by_reader.setdefault(f"{row['reader']} ({row['preset']})", {})[row["image_size"]] = row["samples_per_s"]
    sizes = sorted({row["image_size"] for row in res["rows"]})
    table = markdown_table(
        ["reader (preset)", *[f"samples/s at {s} px" for s in sizes]],
        [[name, *[rates.get(s, "-") for s in sizes]] for name, rates in by_reader.items()],
    )
    note = (f" The quick recipe's step consumes {consumed['quick']:.0f} samples/s on the same CPU."
            if "quick" in consumed else "")  # fmt: skip
    return (f"Data readers, ONE loading process each with the modality preset ({res['device']}, "
            f"{res['date']}; `python benchmarks/data_readers.py`).{note}\n\n{table}")  # fmt: skip


def render() -> str:
    memory = load("memory_vs_tasks_*.json")
    if memory:
        plot_memory(memory)
    lines = [
        START,
        "<!-- generated by `python benchmarks/report.py` from benchmarks/results/*.json; do not edit -->",
        "",
        "Peak training memory versus the number of tasks, umedpt's task-by-task loop against the naive",
        "loop (forward all tasks, sum the losses, one backward). Each point is a fresh process whose",
        "model has exactly that many tasks, led by the most memory-hungry single task.",
        "",
        f"![memory vs tasks]({PLOT.relative_to(ROOT).as_posix()})",
        "",
        memory_section(memory),
        "",
        other_section(),
        "",
        readers_section(),
        END,
    ]
    return "\n".join(lines)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"README.md has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(head + render() + tail)
    print(f"README.md performance section rewritten; plot {PLOT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
