"""Mathematical properties of the multi-task diagnostics."""

from __future__ import annotations

import math

import pytest
import torch

from umedpt.diagnostics import (
    dominant_ratio,
    fisher_spectrum,
    interference,
    spectral_entropy,
    statistics_score,
)


def gradients(n: int, p: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return list(torch.randn(n, p, generator=g, dtype=torch.float64))


def test_identical_tasks_interfere_fully():
    same = gradients(5, 40, 0)
    out = interference({"a": same, "b": same, "c": same})
    assert out["tasks"] == ["a", "b", "c"]
    assert torch.allclose(out["gd"], torch.ones(3, 3, dtype=torch.float64))
    assert torch.allclose(out["gm"], torch.ones(3, 3, dtype=torch.float64))
    assert torch.allclose(out["tug_of_war"], torch.full((3,), 3.0, dtype=torch.float64))


def test_orthogonal_tasks_do_not_interfere():
    # task a lives on the first 10 coordinates, task b on the last 10
    a = [torch.cat([g, torch.zeros(10, dtype=torch.float64)]) for g in gradients(4, 10, 1)]
    b = [torch.cat([torch.zeros(10, dtype=torch.float64), g]) for g in gradients(7, 10, 2)]
    out = interference({"a": a, "b": b})
    assert out["gd"][0, 1] == 0 and out["gd"][1, 0] == 0
    assert torch.allclose(out["gd"].diagonal(), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(out["tug_of_war"], out["gm"].diagonal())  # only the diagonal counts


def test_interference_matches_its_definition_with_unequal_batch_counts():
    grads = {"a": gradients(3, 12, 3), "b": gradients(5, 12, 4), "c": gradients(2, 12, 5)}
    out = interference(grads)
    names = list(grads)

    def delta(j: str, i: str, a: int) -> float:
        return sum(float(gb / gb.norm() @ grads[i][a]) for gb in grads[j]) / len(grads[j])

    for x, i in enumerate(names):
        own = sum(delta(i, i, a) for a in range(len(grads[i]))) / len(grads[i])
        for y, j in enumerate(names):
            cross = sum(delta(j, i, a) for a in range(len(grads[i]))) / len(grads[i])
            assert float(out["gd"][x, y]) == pytest.approx(cross / own, rel=1e-10)
            mi = sum(float(g.norm()) for g in grads[i]) / len(grads[i])
            mj = sum(float(g.norm()) for g in grads[j]) / len(grads[j])
            assert float(out["gm"][x, y]) == pytest.approx(2 * mi * mj / (mi**2 + mj**2), rel=1e-10)
    assert torch.allclose(out["tug_of_war"], (out["gd"] * out["gm"]).sum(1))


def test_magnitude_similarity_falls_with_the_ratio_of_norms():
    base = gradients(3, 20, 6)
    out = interference({"small": base, "large": [10 * g for g in base]})
    assert float(out["gm"][0, 1]) == pytest.approx(2 * 10 / (1 + 100))
    assert torch.allclose(out["gd"], torch.ones(2, 2, dtype=torch.float64))  # same directions


def test_interference_names_the_bad_task():
    with pytest.raises(ValueError, match="task 'b': gradients of length 5, the first task's have length 4"):
        interference({"a": [torch.ones(4)], "b": [torch.ones(5)]})
    with pytest.raises(ValueError, match="task 'z': a gradient is zero"):
        interference({"a": [torch.ones(4)], "z": [torch.zeros(4)]})
    with pytest.raises(ValueError, match="task 'n': gradients contain NaN"):
        interference({"n": [torch.tensor([1.0, math.nan])]})
    with pytest.raises(ValueError, match="task 'e': no gradients"):
        interference({"e": []})


def test_statistics_score_of_agreeing_opposite_and_idle_parameters():
    g = torch.tensor([1.0, 2.0, -3.0, 0.0])
    h = torch.tensor([2.0, -2.0, -1.0, 0.0])
    score = statistics_score({"a": g, "b": h})
    assert score[0] == 1.0 and score[2] == 1.0  # same sign
    assert score[1] == 0.0  # opposite, equal size: they cancel
    assert math.isnan(score[3])  # no task moves it
    assert statistics_score({"a": g, "b": -g})[:3].eq(0).all()


@pytest.mark.parametrize(("n", "p"), [(6, 40), (50, 8), (7, 7)])
def test_fisher_spectrum_equals_a_dense_eigendecomposition(n, p):
    g = torch.stack(gradients(n, p, 7 + n))
    dense = torch.linalg.eigvalsh(g.T @ g / n).flip(0)[: min(n, p)].clamp_min(0)
    eigs = fisher_spectrum(g)
    assert eigs.shape == (min(n, p),)
    assert torch.allclose(eigs, dense, atol=1e-10)
    assert bool((eigs[:-1] >= eigs[1:]).all())


def test_uniform_spectrum_entropy_and_ratio():
    for k in (1, 4, 9):
        eigs = torch.full((k,), 2.5)
        assert spectral_entropy(eigs) == pytest.approx(math.log(k))
        assert dominant_ratio(eigs) == pytest.approx(1 / k)
    # one direction carries everything: entropy 0, ratio 1 (0 log 0 = 0)
    assert spectral_entropy(torch.tensor([3.0, 0.0, 0.0])) == 0.0
    assert dominant_ratio(torch.tensor([3.0, 0.0, 0.0])) == 1.0
    with pytest.raises(ValueError, match="all zero"):
        spectral_entropy(torch.zeros(3))


def test_task_gradients_of_a_multitask_module_equal_autograd_per_batch():
    """The gradients collected for interference are those of each task's scaled loss on the
    shared encoder, batch by batch; .grad stays untouched."""
    from tests.conftest import TINY_ENCODER, mixed_tasks, random_batch
    from umedpt import MultiTaskModule, SwinEncoder
    from umedpt.diagnostics import task_gradients

    torch.manual_seed(0)
    tasks = mixed_tasks()[:2]
    model = MultiTaskModule(tasks=tasks, encoder=SwinEncoder(**TINY_ENCODER), export_encoder=False)
    batches = {t.name: [random_batch(t, seed=s) for s in range(3)] for t in tasks}
    grads = task_gradients(model.task_loss, batches, model.encoder.parameters(), num_batches=2)
    assert set(grads) == {t.name for t in tasks} and all(len(rows) == 2 for rows in grads.values())
    assert all(p.grad is None for p in model.parameters())
    params = list(model.encoder.parameters())
    for t in tasks:
        for k in range(2):
            model.zero_grad(set_to_none=True)
            model.task_loss(t.name, batches[t.name][k]).backward()
            expected = torch.cat([p.grad.reshape(-1) for p in params])
            assert torch.allclose(grads[t.name][k], expected, atol=1e-6)
    out = interference(grads)
    assert out["gd"].shape == (2, 2) and torch.isfinite(out["gd"]).all()


def test_count_sketch_is_linear_and_keeps_inner_products_within_its_bound():
    from umedpt.diagnostics import CountSketch

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4000, generator=g, dtype=torch.float64), torch.randn(4000, generator=g, dtype=torch.float64)
    y = 0.6 * x + 0.8 * y  # cosine 0.6
    sketch = CountSketch(4000, 500, seed=1)
    assert torch.allclose(sketch(2 * x - y), 2 * sketch(x) - sketch(y))
    assert torch.equal(CountSketch(4000, 500, seed=1)(x), sketch(x))  # same seed, same map
    estimates = torch.tensor([float(CountSketch(4000, 500, seed=s)(x) @ CountSketch(4000, 500, seed=s)(y)) for s in range(300)])
    exact = float(x @ y)
    bound = 2 * float(x @ x) * float(y @ y) / 500  # the variance bound of the docstring
    assert abs(float(estimates.mean()) - exact) < 4 * math.sqrt(bound / 300)  # unbiased
    assert float(estimates.var()) <= bound
    with pytest.raises(ValueError, match="expected a 1-D tensor of length 4000"):
        sketch(torch.zeros(10))


def test_interference_of_sketched_gradients_is_close_to_the_exact_one():
    from umedpt.diagnostics import CountSketch

    base = gradients(4, 20000, seed=3)
    grads = {"a": base, "b": [0.5 * g + 0.5 * h for g, h in zip(base, gradients(4, 20000, seed=4), strict=True)]}
    exact = interference(grads)
    sketch = CountSketch(20000, 10000, seed=0)
    approx = interference({t: [sketch(g) for g in rows] for t, rows in grads.items()})
    # cosines off by about sqrt(2 / 10000) = 0.014
    assert torch.allclose(approx["gd"], exact["gd"], atol=0.05) and torch.allclose(approx["gm"], exact["gm"], atol=0.05)


def test_diagnose_summarises_every_measure():
    from umedpt.diagnostics import diagnose

    grads = {"a": gradients(3, 50, seed=5), "b": gradients(2, 50, seed=6)}
    out = diagnose(grads)
    assert out["tasks"] == ["a", "b"] and len(out["gd"]) == 2 and len(out["statistics_score"]) == 50
    assert out["gd"] == interference(grads)["gd"].tolist()
    allg = torch.stack([*grads["a"], *grads["b"]])
    assert out["fisher"]["all"]["se"] == pytest.approx(spectral_entropy(fisher_spectrum(allg)))
    assert out["fisher"]["a"]["rho"] == pytest.approx(dominant_ratio(fisher_spectrum(torch.stack(grads["a"]))))
    assert out["grad_norm"][1] == pytest.approx(float(torch.stack(grads["b"]).norm(dim=1).mean()))
