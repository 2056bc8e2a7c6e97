"""End to end on CPU through the real CLI: fit, predict (greedy generation) and mllm-evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import TINY_ENCODER
from tests.test_mllm_model import TINY_LLM
from umedpt.cli import main

CONFIG = Path(__file__).parents[1] / "configs" / "mllm.yaml"


@pytest.fixture
def tiny_config(tmp_path: Path) -> str:
    """configs/mllm.yaml made tiny: small encoder and LM, 64 px, a few synthetic scenes, 8 steps."""
    override = {
        "trainer": {
            "accelerator": "cpu",
            "precision": "32-true",
            "max_steps": 8,
            "limit_val_batches": 2,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path / "run"),
        },
        "model": {"init_args": {"encoder": TINY_ENCODER, "llm": TINY_LLM, "max_new_tokens": 6}},
        "data": {
            "init_args": {
                "image_size": 64,
                "batch_size": 4,
                "num_workers": 0,
                "synthetic_dir": str(tmp_path / "data"),
                "synthetic_images": {"train": 4, "val": 1, "test": 1},
            }
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(override))
    return str(path)


@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # predict logs to a new version directory
def test_fit_predict_and_evaluate(tiny_config):
    configs = ["-c", str(CONFIG), "-c", tiny_config]
    fit = main(["fit", *configs])
    run = Path(fit.trainer.log_dir)
    metrics = fit.trainer.callback_metrics
    routed = {key.split("/")[1] for key in metrics if key.startswith("routing/")}
    assert routed and routed <= {"vqa", "refer", "identify", "caption", "cls"}
    for task in routed:
        assert sum(float(metrics[f"routing/{task}/expert_{k}"]) for k in range(5)) == pytest.approx(
            1.0, abs=1e-4
        )
    assert (run / "routing_weights.png").stat().st_size > 1000
    assert json.loads((run / "routing_weights.json").read_text()).keys() == routed
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    checkpoint = run / "checkpoints" / "last.ckpt"  # beside epoch=0-step=8.ckpt, the same step

    predict = main(["predict", *configs, "--ckpt_path", str(checkpoint)])
    predictions = Path(predict.trainer.log_dir) / "predictions.jsonl"
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    test_records = (Path(tiny_config).parent / "data" / "test.jsonl").read_text().splitlines()
    assert len(records) == len(test_records)
    for r in records:
        assert isinstance(r["prediction"], str)
        assert (r["routing"] is None) == (r["task"] == "qa")

    assert main(["mllm-evaluate", str(predictions)]) == 0
    report = json.loads((predictions.parent / "metrics.json").read_text())
    assert {row["task"] for row in report["rows"]} == {r["task"] for r in records}
    assert (predictions.parent / "metrics.md").is_file()


def test_diagnose_measures_the_connector_of_an_mllm_checkpoint(tiny_config):
    """``umedpt diagnose`` on an MLLM checkpoint compares the image tasks' gradients of the
    connector: its GD and GM equal an independent computation on the checkpoint's weights."""
    import torch

    from umedpt.diagnostics import interference
    from umedpt.mllm import InstructionDataModule, MLLMModule

    configs = ["-c", str(CONFIG), "-c", tiny_config]
    fit = main(["fit", *configs])
    checkpoint = Path(fit.trainer.log_dir) / "checkpoints" / "last.ckpt"
    out = Path(tiny_config).parent / "diagnostics"
    assert main(["diagnose", "--ckpt_path", str(checkpoint), "--num_batches", "2", "--output", str(out)]) == 0
    report = json.loads((out / "diagnostics.json").read_text())["checkpoints"][0]
    assert report["parameters"] == "connector" and report["step"] == 8
    assert {"interference.png", "fisher_phases.png", "diagnostics.md"} <= {p.name for p in out.iterdir()}

    model = MLLMModule.load_from_checkpoint(checkpoint).eval()
    state = torch.load(checkpoint, weights_only=True)
    data = InstructionDataModule(**{k: v for k, v in state["datamodule_hyper_parameters"].items() if not k.startswith("_")})
    data.setup("fit")
    batches = data.task_batches(2)
    assert sorted(batches) == report["tasks"] and len(batches) >= 2
    params = [p for p in model.connector.parameters() if p.requires_grad]
    grads = {}
    for task, task_batches in batches.items():
        grads[task] = []
        for batch in task_batches:
            loss = model.loss(batch)[0]
            found = torch.autograd.grad(loss, params, allow_unused=True)  # experts a task's router leaves out
            grads[task].append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, found, strict=True)]))
    expected = interference(grads)
    torch.testing.assert_close(torch.tensor(report["gd"]), torch.as_tensor(expected["gd"]).float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(report["gm"]), torch.as_tensor(expected["gm"]).float(), rtol=1e-4, atol=1e-5)
    off_diagonal = [report["gd"][i][j] for i in range(len(batches)) for j in range(len(batches)) if i != j]
    assert any(abs(v) > 1e-3 for v in off_diagonal)  # the tasks' connector gradients are not independent


@pytest.mark.parametrize(("precision", "fused"), [("32-true", True), ("bf16-mixed", None)])
def test_adamw_is_fused_on_cpu_unless_mixed_precision_clips(tiny_config, precision, fused):
    """On CPU at full precision the optimizer is torch's fused AdamW (5x faster than its loop
    there); under mixed precision it is not, since Lightning refuses to clip the gradients
    (``gradient_clip_val: 1.0`` in the config) of a fused optimizer. Both fits run."""
    configs = ["-c", str(CONFIG), "-c", tiny_config, "--trainer.precision", precision, "--trainer.max_steps", "4",
               "--trainer.limit_val_batches", "0"]  # fmt: skip
    fit = main(["fit", *configs])
    optimizer = fit.trainer.optimizers[0]
    assert optimizer.defaults["fused"] is fused and fit.trainer.gradient_clip_val == 1.0
    assert torch.isfinite(fit.trainer.callback_metrics["train/loss_epoch"])


@pytest.mark.parametrize("enabled", [True, False])
def test_subnormals_flush_while_fitting_on_cpu(tiny_config, enabled):
    """``model.flush_denormal`` (default on) flushes subnormal floats to zero during the fit's
    training steps on CPU (a sparse router's unused experts drive their AdamW moments there,
    and every optimizer step then runs up to 17x slower); after the fit they are back."""
    from lightning.pytorch.callbacks import Callback

    tiny = torch.tensor([1e-39])  # subnormal in float32
    seen = []

    class Probe(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(float(tiny * 1.0))

    configs = ["-c", str(CONFIG), "-c", tiny_config, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
               "--model.flush_denormal", str(enabled).lower()]  # fmt: skip
    cli = main(configs, run=False)
    cli.trainer.callbacks.append(Probe())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert len(seen) == 2 and all((v == 0.0) is enabled for v in seen)
    assert float(tiny * 1.0) > 0.0
