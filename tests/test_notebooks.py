"""Every notebook under notebooks/ runs top to bottom without error, and is stored with cleared outputs."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

_NEEDS_DEV = "notebook tests need the dev extra: pip install -e '.[dev]'"
nbformat = pytest.importorskip("nbformat", reason=_NEEDS_DEV)
nbclient = pytest.importorskip("nbclient", reason=_NEEDS_DEV)
pytest.importorskip("ipykernel", reason=_NEEDS_DEV)

from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel  # noqa: E402
from jupyter_client.manager import AsyncKernelManager  # noqa: E402

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(p for p in NOTEBOOKS_DIR.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
CELL_TIMEOUT_S = 300
# argv[0] values that jupyter_client itself replaces with sys.executable when it starts a kernel
_PYTHON_ALIASES = {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}
# jupyter_client/zmq noise that is not about the notebooks (e.g. the event loop policy on Windows)
_KERNEL_WARNINGS = (
    "ignore:.*Proactor event loop.*:RuntimeWarning",
    "ignore:.*platformdirs.*:DeprecationWarning",
)


def _ids(paths: list[Path]) -> list[str]:
    return [p.relative_to(NOTEBOOKS_DIR).as_posix() for p in paths]


def kernel_manager(spec_dir: Path) -> AsyncKernelManager:
    """A manager for an ipykernel that runs on this interpreter (``sys.executable``).

    The ``python3`` kernelspec is used when it starts this interpreter. A ``python3`` spec of another
    interpreter (e.g. a user-wide one in ~/.local/share/jupyter shadowing this venv's) is bypassed
    with a private spec written into ``spec_dir``.
    """
    try:
        argv0 = KernelSpecManager().get_kernel_spec("python3").argv[0]
    except NoSuchKernel:
        argv0 = None
    if argv0 in _PYTHON_ALIASES or (argv0 and Path(argv0).absolute() == Path(sys.executable).absolute()):
        return AsyncKernelManager(kernel_name="python3")
    name = "umedpt-test-python"
    (spec_dir / name).mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python ({sys.executable})",
        "language": "python",
    }
    (spec_dir / name / "kernel.json").write_text(json.dumps(spec))
    return AsyncKernelManager(
        kernel_name=name, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec_dir)])
    )


def _kernel_python(km: AsyncKernelManager) -> str:
    argv0 = km.kernel_spec.argv[0]
    return sys.executable if argv0 in _PYTHON_ALIASES else argv0


def test_kernel_runs_this_interpreter(tmp_path: Path) -> None:
    assert _kernel_python(kernel_manager(tmp_path / "kernels")) == sys.executable


def test_kernel_bypasses_a_foreign_python3_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a fresh venv where a python3 kernelspec of another interpreter comes first on the Jupyter path
    foreign = tmp_path / "jupyter" / "kernels" / "python3"
    foreign.mkdir(parents=True)
    argv = ["/nonexistent/bin/python3.0", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (foreign / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "other", "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    assert KernelSpecManager().get_kernel_spec("python3").argv[0] == argv[0]
    assert _kernel_python(kernel_manager(tmp_path / "kernels")) == sys.executable


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_stored_cleared(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count)
    ]
    assert not dirty, f"{path.name}: clear the outputs of code cells {dirty} before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
@pytest.mark.filterwarnings(*_KERNEL_WARNINGS)
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the kernel inherits this environment
    monkeypatch.setenv("NO_ALBUMENTATIONS_UPDATE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("UMEDPT_NOTEBOOK_RUNS", str(tmp_path / "runs"))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        km=kernel_manager(tmp_path / "kernels"),
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},  # cwd = notebooks/, as in Jupyter
    )
    start = time.perf_counter()
    client.execute(cleanup_kc=True)  # raises CellExecutionError naming the failing cell
    elapsed = time.perf_counter() - start
    errors = [
        (i, out.get("ename"), out.get("evalue"))
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "error"
    ]
    assert not errors, f"{path.name}: cells raised {errors}"
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code" and c.source.strip())
    print(f"{path.name}: executed in {elapsed:.1f} s")
