"""engine/landscape.py on a small MLP and on quadratics whose answers are known in closed form."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clmscale.engine.landscape import (
    adaptive_sharpness,
    direction_between,
    endpoint_pca,
    eps_sharpness,
    filter_normalized_direction,
    parameter_pca,
    relative_sharpness,
    surface_1d,
    surface_2d,
    surface_along,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class ConvNet(torch.nn.Module):
    """Covers every filter shape: Embedding rows, Conv1d output channels, Linear rows, 1-D biases."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(12, 6)
        self.conv = torch.nn.Conv1d(6, 5, kernel_size=3)
        self.head = torch.nn.Linear(5, 3)

    def forward(self, ids):
        h = self.conv(self.embed(ids).transpose(1, 2)).relu().mean(-1)  # (B, 5)
        return self.head(h)


def make_convnet() -> ConvNet:
    with torch.random.fork_rng():  # seeded init without touching the global RNG
        torch.manual_seed(0)
        return ConvNet().double()


def make_batches(n_batches=3):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randint(0, 12, (8, 7), generator=g), torch.randint(0, 3, (8,), generator=g))
        for _ in range(n_batches)
    ]


def ce_loss(model, batch):
    ids, y = batch
    return F.cross_entropy(model(ids), y)


def mean_loss(model, batches):
    with torch.no_grad():
        return sum(float(ce_loss(model, b)) for b in batches) / len(batches)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_bitwise_equal(model, saved):
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), saved[n]), n


# ---------------------------------------------------------------------------------------------
# directions


def test_filter_normalisation_matches_each_filter_norm_of_the_weights():
    model = make_convnet()
    d = filter_normalized_direction(model, seed=0)
    params = dict(model.named_parameters())
    for name in ["embed.weight", "conv.weight", "head.weight"]:
        w, di = params[name].detach(), d[name]
        assert di.shape == w.shape and di.dtype == w.dtype
        np.testing.assert_allclose(
            di.reshape(w.shape[0], -1).norm(dim=1), w.reshape(w.shape[0], -1).norm(dim=1), rtol=1e-9
        )
        assert not torch.allclose(di, w)  # rescaled noise, not a copy of the weights
    for name in ["conv.bias", "head.bias"]:
        assert torch.count_nonzero(d[name]) == 0
    with_1d = filter_normalized_direction(model, seed=0, include_1d=True)
    assert float(with_1d["head.bias"].norm()) == pytest.approx(float(params["head.bias"].detach().norm()))
    torch.testing.assert_close(with_1d["head.weight"], d["head.weight"])  # same draw either way
    again, other = filter_normalized_direction(model, seed=0), filter_normalized_direction(model, seed=1)
    assert all(torch.equal(d[n], again[n]) for n in d)
    assert not torch.equal(d["conv.weight"], other["conv.weight"])


class LinearMLP(torch.nn.Module):
    """GPT-2's MLP written with nn.Linear: the same function as GPT2MLP when each weight is transposed."""

    def __init__(self, d_model: int, d_inner: int):
        super().__init__()
        self.c_fc, self.c_proj = torch.nn.Linear(d_model, d_inner), torch.nn.Linear(d_inner, d_model)

    def forward(self, x):
        return self.c_proj(torch.nn.functional.gelu(self.c_fc(x), approximate="tanh"))


def test_filter_normalisation_takes_columns_of_gpt2_conv1d_weights():
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    torch.manual_seed(0)
    gpt2 = GPT2MLP(24, GPT2Config(n_embd=6, activation_function="gelu_new", resid_pdrop=0.0)).double()
    linear = LinearMLP(6, 24).double()
    with torch.no_grad():
        for name in ("c_fc", "c_proj"):
            getattr(linear, name).weight.copy_(getattr(gpt2, name).weight.T)  # Conv1D stores (in, out)
            getattr(linear, name).bias.copy_(getattr(gpt2, name).bias)
    x = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(gpt2(x), linear(x))  # the same function
    d_gpt2 = filter_normalized_direction(gpt2, seed=3)
    d_linear = filter_normalized_direction(linear, seed=3)
    for name in ("c_fc.weight", "c_proj.weight"):
        torch.testing.assert_close(d_gpt2[name], d_linear[name].T, rtol=1e-12, atol=0)  # the same, to round-off
        w = dict(gpt2.named_parameters())[name].detach()
        np.testing.assert_allclose(d_gpt2[name].norm(dim=0), w.norm(dim=0), rtol=1e-9)  # per output unit: columns
        assert not np.allclose(d_gpt2[name].norm(dim=1), w.norm(dim=1), rtol=1e-3)  # not rows
    for scale in (0.3, 1.0):  # so every slice is too
        pairs = ((gpt2, d_gpt2), (linear, d_linear))
        moved = [{n: p + scale * d[n] for n, p in m.named_parameters()} for m, d in pairs]
        outputs = [torch.func.functional_call(m, w, (x,)) for m, w in zip((gpt2, linear), moved)]
        torch.testing.assert_close(outputs[0], outputs[1])


def test_direction_between_uses_shared_names_and_checks_shapes():
    start = {"a": torch.zeros(3), "b": torch.ones(2), "head": torch.zeros(4), "count": torch.tensor(3)}
    end = {"a": torch.ones(3), "b": torch.ones(2) * 3, "new_head": torch.zeros(5), "count": torch.tensor(4)}
    d = direction_between(start, end)
    assert set(d) == {"a", "b"}  # heads on one side and integer buffers are left out
    torch.testing.assert_close(d["b"], torch.full((2,), 2.0))
    with pytest.raises(ValueError, match=r"a: start has shape \(3,\), end has \(4,\)"):
        direction_between(start, {"a": torch.ones(4)})


# ---------------------------------------------------------------------------------------------
# surfaces


def test_2d_surface_centre_is_the_unperturbed_loss_and_weights_come_back():
    model, batches = make_convnet(), make_batches()
    model.train()
    saved = snapshot(model)
    d1, d2 = filter_normalized_direction(model, seed=0), filter_normalized_direction(model, seed=1)
    surface = surface_2d(model, ce_loss, batches, d1, d2, span=1.0, resolution=5)
    assert surface.losses.shape == (5, 5) and surface.alphas[2] == 0.0
    np.testing.assert_array_equal(surface.alphas, -surface.alphas[::-1])  # symmetric grid
    model.eval()
    assert surface.losses[2, 2] == pytest.approx(mean_loss(model, batches), rel=1e-12)
    assert surface.losses.max() > surface.losses[2, 2]  # a unit filter-normalised step is large
    assert_bitwise_equal(model, saved)
    assert len(surface.records()) == 25 and set(surface.records()[0]) == {"alpha", "beta", "loss"}
    default = surface_2d(model, ce_loss, batches, span=1.0, resolution=5, seed=0)  # d1, d2 from seeds
    np.testing.assert_array_equal(default.losses, surface.losses)
    row = surface_1d(model, ce_loss, batches, span=1.0, resolution=5, seed=0)
    np.testing.assert_array_equal(row.losses, surface.losses[:, 2])  # the β = 0 row


def test_1d_surface_is_linear_in_alpha_and_restores_after_an_error():
    model, batches = make_convnet(), make_batches()
    saved = snapshot(model)
    d = filter_normalized_direction(model, seed=0)
    curve = surface_1d(model, ce_loss, batches, d, alphas=[0.0, 0.5])
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in moved.named_parameters():
            p.add_(0.5 * d[n])
    assert curve.losses[0] == pytest.approx(mean_loss(model, batches), rel=1e-12)
    assert curve.losses[1] == pytest.approx(mean_loss(moved, batches), rel=1e-12)

    calls = []

    def failing_loss(m, b):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("out of memory, say")
        return ce_loss(m, b)

    with pytest.raises(RuntimeError, match="out of memory"):
        surface_1d(model, failing_loss, batches, d, resolution=3)
    assert_bitwise_equal(model, saved)


def test_surface_along_goes_from_pretrained_to_finetuned():
    pretrained, batches = make_convnet(), make_batches()
    finetuned = copy.deepcopy(pretrained)
    optimizer = torch.optim.SGD(finetuned.parameters(), lr=0.5)
    for _ in range(5):
        optimizer.zero_grad()
        ce_loss(finetuned, batches[0]).backward()
        optimizer.step()
    target = dict(finetuned.state_dict())
    target["task_head.weight"] = torch.zeros(2, 5)  # a fine-tuning-only entry is ignored
    saved = snapshot(pretrained)
    path = surface_along(pretrained, ce_loss, batches[:1], target)
    assert path.alphas[0] == -0.5 and path.alphas[-1] == 1.5 and len(path.alphas) == 21
    at = {float(a): float(l) for a, l in zip(path.alphas, path.losses)}
    assert at[0.0] == pytest.approx(mean_loss(pretrained, batches[:1]), rel=1e-12)
    assert at[1.0] == pytest.approx(mean_loss(finetuned, batches[:1]), rel=1e-9)
    assert at[1.0] < at[0.0]
    assert_bitwise_equal(pretrained, saved)
    coarse = surface_along(pretrained, ce_loss, batches[:1], target, resolution=11)  # step 0.2
    assert {0.0, 1.0} <= set(coarse.alphas) and len(coarse.alphas) == 13


# ---------------------------------------------------------------------------------------------
# sharpness on quadratics with closed-form answers


class Quadratic(torch.nn.Module):
    """L(θ) = c/2 ||θ - 1||² with θ started at `start`: curvature c everywhere."""

    def __init__(self, curvature: float, start: torch.Tensor):
        super().__init__()
        self.curvature = curvature
        self.theta = torch.nn.Parameter(start.clone())

    def forward(self, _batch):
        return 0.5 * self.curvature * ((self.theta - 1) ** 2).sum()


def quadratic_loss(model, batch):
    return model(batch)


def test_eps_sharpness_is_nonnegative_and_exact_on_a_quadratic():
    eps, dim = 1e-2, 8
    values = {}
    for c in (1.0, 10.0):
        model = Quadratic(c, torch.ones(dim, dtype=torch.float64))  # at the minimum, L = 0
        values[c] = eps_sharpness(model, quadratic_loss, [None], eps=eps, n_steps=10, seed=0)
        # sign ascent ends in a corner of the box |z_i| <= ε(|θ_i| + 1) = 2ε
        assert values[c] == pytest.approx(0.5 * c * dim * (2 * eps) ** 2, rel=1e-9)
        assert torch.equal(model.theta.detach(), torch.ones(dim, dtype=torch.float64))
    assert values[10.0] > values[1.0] > 0
    ball = eps_sharpness(Quadratic(10.0, torch.ones(dim, dtype=torch.float64)), quadratic_loss,
                         [None], eps=eps, norm="ball", n_steps=10)
    theta_norm = np.sqrt(dim)  # the ball's radius is ε (||θ|| + 1)
    assert ball == pytest.approx(0.5 * 10.0 * (eps * (theta_norm + 1)) ** 2, rel=1e-9)


def test_eps_sharpness_is_seeded_and_nonnegative_on_a_network():
    model, batches = make_convnet(), make_batches()
    a = eps_sharpness(model, ce_loss, batches, eps=1e-3, n_steps=3, seed=0)
    b = eps_sharpness(model, ce_loss, batches, eps=1e-3, n_steps=3, seed=0)
    assert a == b and a >= 0


def test_adaptive_sharpness_matches_asam_first_order_worst_case():
    rho, eta, dim = 0.05, 0.01, 6
    delta = torch.full((dim,), 0.1, dtype=torch.float64)  # off the minimum: ∇L = c δ ≠ 0
    values = {}
    for c in (1.0, 10.0):
        model = Quadratic(c, 1 + delta)
        values[c] = adaptive_sharpness(model, quadratic_loss, [None], rho=rho, eta=eta)
        # T = |θ| + η is uniform here, so z* = ρ T δ/||δ||: a step of ρ T along δ
        step = rho * (1.1 + eta)
        expected = 0.5 * c * (float(delta.norm()) + step) ** 2 - 0.5 * c * float(delta.norm()) ** 2
        assert values[c] == pytest.approx(expected, rel=1e-9)
    assert values[10.0] > values[1.0] > 0
    # at the minimum ∇L = 0, so the step takes a seeded random direction of the same length
    at_minimum = Quadratic(1.0, torch.ones(dim, dtype=torch.float64))
    value = adaptive_sharpness(at_minimum, quadratic_loss, [None], rho=rho, eta=eta, seed=3)
    assert value == pytest.approx(0.5 * (rho * (1 + eta)) ** 2, rel=1e-9)
    assert value == adaptive_sharpness(at_minimum, quadratic_loss, [None], rho=rho, eta=eta, seed=3)


class TwoTensors(torch.nn.Module):
    """L = c_a/2 ||a - a*||² + c_b/2 ||b - b*||²: two tensors of different norm and curvature."""

    def __init__(self, a, b, a_star, b_star, c_a, c_b):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())
        self.a_star, self.b_star, self.c_a, self.c_b = a_star, b_star, c_a, c_b

    def forward(self, _batch):
        a_part = 0.5 * self.c_a * ((self.a - self.a_star) ** 2).sum()
        return a_part + 0.5 * self.c_b * ((self.b - self.b_star) ** 2).sum()


def test_relative_sharpness_moves_each_tensor_by_rho_times_its_norm():
    rho = 0.05
    a, b = torch.full((4,), 2.0, dtype=torch.float64), torch.full((9,), 0.5, dtype=torch.float64)
    model = TwoTensors(a, b, a, b, c_a=1.0, c_b=10.0)  # at the minimum
    value = relative_sharpness(model, quadratic_loss, [None], rho=rho, n_steps=10, seed=0)
    # each tensor ends on its own sphere ||z_T|| = ρ ||θ_T||: the rise is Σ c_T/2 ρ² ||θ_T||²
    expected = 0.5 * 1.0 * (rho * float(a.norm())) ** 2 + 0.5 * 10.0 * (rho * float(b.norm())) ** 2
    assert value == pytest.approx(expected, rel=1e-9)
    assert torch.equal(model.a.detach(), a) and torch.equal(model.b.detach(), b)
    # one global ball of radius ρ ||θ|| would put all of it into the stiffer tensor instead
    global_ball = 0.5 * 10.0 * rho**2 * (float(a.norm()) ** 2 + float(b.norm()) ** 2)
    assert value < global_ball
    # the radius scales with the weights: doubling them (and the optimum) quadruples a quadratic's rise
    doubled = TwoTensors(2 * a, 2 * b, 2 * a, 2 * b, c_a=1.0, c_b=10.0)
    assert relative_sharpness(doubled, quadratic_loss, [None], rho=rho) == pytest.approx(4 * expected, rel=1e-9)
    net = relative_sharpness(make_convnet(), ce_loss, make_batches(), rho=0.01, n_steps=3, seed=0)
    assert net >= 0 and net == relative_sharpness(make_convnet(), ce_loss, make_batches(), rho=0.01, n_steps=3, seed=0)


def test_multi_step_adaptive_sharpness_finds_the_worst_case_one_step_misses():
    rho, c = 0.1, 4.0
    theta = torch.tensor([1.0, 3.0], dtype=torch.float64)  # |θ| differs, so the ball is an ellipse
    optimum = theta - torch.tensor([0.2, 0.05], dtype=torch.float64)  # δ = θ - θ*
    delta = theta - optimum
    scale = theta.abs()  # eta = 0: Andriushchenko et al.'s elementwise |w|
    # the exact max over the ellipse boundary z = ρ T (cos φ, sin φ), by a fine grid
    phi = np.linspace(0, 2 * np.pi, 200_001)
    z = rho * scale.numpy()[:, None] * np.stack([np.cos(phi), np.sin(phi)])
    exact = float((0.5 * c * ((delta.numpy()[:, None] + z) ** 2).sum(0)).max() - 0.5 * c * float((delta**2).sum()))

    loss = lambda m, b: 0.5 * c * ((m.theta - optimum) ** 2).sum()  # noqa: E731
    one_step = adaptive_sharpness(Quadratic(c, theta), loss, [None], rho=rho, eta=0.0)
    many = adaptive_sharpness(Quadratic(c, theta), loss, [None], rho=rho, eta=0.0, n_steps=20)
    assert one_step < exact * (1 - 1e-3)  # ASAM's first-order step is not the maximiser of a curved loss
    assert many == pytest.approx(exact, rel=1e-5) and many > one_step
    box = adaptive_sharpness(Quadratic(c, theta), loss, [None], rho=rho, eta=0.0, n_steps=5, norm="box")
    # ℓ∞: the corner z_i = ρ |θ_i| sign(δ_i)
    corner = 0.5 * c * float(((delta.abs() + rho * scale) ** 2).sum()) - 0.5 * c * float((delta**2).sum())
    assert box == pytest.approx(corner, rel=1e-9)


class TwoLayerLinear(torch.nn.Module):
    """f(x) = Σ_i a_i b_i x_i: rescaling a_i -> s_i a_i, b_i -> b_i / s_i leaves f unchanged."""

    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(a), torch.nn.Parameter(b)

    def forward(self, x):
        return x @ (self.a * self.b)


def test_adaptive_sharpness_is_invariant_to_rescaling_that_keeps_the_function():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(5, generator=g, dtype=torch.float64) for _ in range(2))
    x, y = torch.randn(32, 5, generator=g, dtype=torch.float64), torch.randn(32, generator=g, dtype=torch.float64)
    s = torch.tensor([0.1, 0.5, 2.0, 4.0, 10.0], dtype=torch.float64)
    mse = lambda m, batch: F.mse_loss(m(batch[0]), batch[1])
    original, rescaled = TwoLayerLinear(a, b), TwoLayerLinear(a * s, b / s)
    kwargs = dict(rho=0.1, eta=0.0, n_steps=3)
    assert adaptive_sharpness(rescaled, mse, [(x, y)], **kwargs) == pytest.approx(
        adaptive_sharpness(original, mse, [(x, y)], **kwargs), rel=1e-9
    )


# ---------------------------------------------------------------------------------------------
# parameter-space PCA


def test_pca_of_a_straight_line_trajectory_is_all_pc1():
    model = make_convnet()
    theta0 = {n: t.clone() for n, t in model.state_dict().items()}
    d = filter_normalized_direction(model, seed=0)
    steps = [0, 1, 2, 3, 4, 5]
    trajectory = [{n: t + 0.1 * s * d[n] if n in d else t for n, t in theta0.items()} for s in steps]
    pca = parameter_pca(trajectory, labels=[f"step{s}" for s in steps])
    assert pca.explained_variance_ratio[0] == pytest.approx(1.0, abs=1e-9)
    assert pca.n_params == sum(p.numel() for p in model.parameters())
    pc1 = np.array([r["pc1"] for r in pca.records])
    np.testing.assert_allclose(np.diff(pc1), np.diff(pc1)[0], rtol=1e-6)  # evenly spaced on PC1
    np.testing.assert_allclose([r["pc2"] for r in pca.records], 0, atol=1e-6 * np.abs(pc1).max())
    assert [r["label"] for r in pca.records] == [f"step{s}" for s in steps]


def test_pca_matches_numpy_svd_and_ignores_unshared_heads():
    g = torch.Generator().manual_seed(2)
    points = [torch.randn(40, generator=g, dtype=torch.float64) for _ in range(5)]
    X = torch.stack(points).numpy()
    X = X - X.mean(0)
    U, S, _ = np.linalg.svd(X, full_matrices=False)
    flat = parameter_pca(points, n_components=3)
    np.testing.assert_allclose(flat.explained_variance_ratio, S[:3] ** 2 / (S**2).sum(), rtol=1e-10)
    scores = np.array([[r["pc1"], r["pc2"], r["pc3"]] for r in flat.records])
    np.testing.assert_allclose(np.abs(scores), np.abs(U[:, :3] * S[:3]), rtol=1e-8, atol=1e-10)

    tasks = ["bbbp", "esol", "tox21"]
    endpoints = [
        {"body.weight": p[:30].reshape(5, 6), "body.bias": p[30:35], f"{t}_head.weight": torch.randn(2, 5)}
        for p, t in zip(points, tasks)
    ]
    pca = parameter_pca(endpoints, labels=tasks)
    assert pca.param_names == ["body.weight", "body.bias"] and pca.n_params == 35
    assert [r["label"] for r in pca.records] == tasks


def test_pca_errors_name_the_values():
    with pytest.raises(ValueError, match="got 1 labels for 2 points"):
        parameter_pca([np.zeros(3), np.ones(3)], labels=["x"])
    with pytest.raises(ValueError, match="all 2 points are identical over 3 parameters"):
        parameter_pca([np.ones(3), np.ones(3)])


def test_endpoint_pca_puts_the_origin_in_and_tells_tasks_from_seed_scatter():
    g = torch.Generator().manual_seed(4)
    origin = {"body.weight": torch.randn(6, 5, generator=g, dtype=torch.float64), "lm_head.weight": torch.zeros(3)}
    task_dirs = {t: torch.randn(6, 5, generator=g, dtype=torch.float64) for t in ("bbbp", "esol")}
    endpoints, labels = [], []
    for task, d in task_dirs.items():
        for seed in (0, 1, 2):
            noise = 0.05 * torch.randn(6, 5, generator=g, dtype=torch.float64)
            endpoints.append({"body.weight": origin["body.weight"] + d + noise, f"{task}_head.weight": torch.ones(2)})
            labels.append({"task": task, "split_seed": seed})
    pca = endpoint_pca(origin, endpoints, labels)
    assert pca.param_names == ["body.weight"] and pca.n_params == 30  # heads and the LM head left out
    first, rest = pca.records[0], pca.records[1:]
    assert first["origin"] and first["distance_from_origin"] == 0.0 and "task" not in first
    assert [(r["task"], r["split_seed"]) for r in rest] == [(lab["task"], lab["split_seed"]) for lab in labels]
    for r, e in zip(rest, endpoints):
        assert r["distance_from_origin"] == pytest.approx(float((e["body.weight"] - origin["body.weight"]).norm()))
    xy = {i: np.array([r["pc1"], r["pc2"]]) for i, r in enumerate(pca.records)}
    within = max(np.linalg.norm(xy[i] - xy[j]) for i in (1, 2, 3) for j in (1, 2, 3))
    between = min(np.linalg.norm(xy[i] - xy[j]) for i in (1, 2, 3) for j in (4, 5, 6))
    assert between > 10 * within  # two task directions, not six scattered seeds
    assert min(np.linalg.norm(xy[0] - xy[i]) for i in range(1, 7)) > 10 * within  # and both away from the origin
    with pytest.raises(ValueError, match="one label per endpoint"):
        endpoint_pca(origin, endpoints, labels[:-1])
