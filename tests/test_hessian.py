"""engine/hessian.py against dense Hessians of a small MLP and a tiny RoBERTa, in float64.

The reference Hessians come from torch.autograd.functional.hessian through functional_call, an
independent path from HVPOperator's double backward. (torch.func.hessian is not used: its
forward-over-reverse gives an asymmetric Hessian through RoBERTa's LM head in torch 2.13.)
"""

from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from clmscale.engine.hessian import (
    HVPOperator,
    double_backward_safe,
    hutchpp_trace,
    lanczos,
    power_iteration,
    slq_density,
    spectrum,
    torch_distributed_sum,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------
# models, batches and their dense Hessians


def make_mlp(dtype=torch.float64) -> torch.nn.Module:
    with torch.random.fork_rng():  # seeded init without touching the global RNG
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 4))
    return model.to(dtype)  # 114 parameters


def mlp_batches(n_batches=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)  # drawn in float64 so every dtype sees the same data
    return [
        (torch.randn(16, 6, generator=g, dtype=torch.float64).to(dtype), torch.randint(0, 4, (16,), generator=g))
        for _ in range(n_batches)
    ]


def mlp_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def make_roberta(attn_implementation="eager"):
    from transformers import RobertaConfig, RobertaForMaskedLM

    cfg = RobertaConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=12, type_vocab_size=1,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation=attn_implementation,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = RobertaForMaskedLM(cfg)
    return model.double().eval()  # 3,278 parameters


def roberta_batches():
    g = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(2):
        ids = torch.randint(3, 30, (2, 8), generator=g)
        labels = ids.clone()
        labels[:, ::2] = -100  # predict every other token
        batches.append((ids, labels))
    return batches


def mlm_loss(model, batch):
    ids, labels = batch
    return model(input_ids=ids, labels=labels).loss


# the dense RoBERTa reference is over the LM head only (334 parameters): a full 3,278² reference
# takes ~25 s on two shared cores; test_lanczos_on_full_roberta_... still uses every parameter
ROBERTA_HEAD = [
    "lm_head.bias", "lm_head.dense.weight", "lm_head.dense.bias",
    "lm_head.layer_norm.weight", "lm_head.layer_norm.bias",
]


def dense_hessian(model, loss_fn, batches, names=None) -> np.ndarray:
    """Hessian of the mean loss over batches w.r.t. the named parameters (default: all)."""
    base = {n: p.detach() for n, p in model.named_parameters()}
    names = list(base) if names is None else names
    shapes = [base[n].shape for n in names]
    sizes = [s.numel() for s in shapes]

    def mean_loss(flat):
        params = dict(base)
        params.update({n: c.view(s) for n, c, s in zip(names, flat.split(sizes), shapes)})
        wrapped = lambda b: loss_fn(lambda *a, **k: functional_call(model, params, a, k), b)
        return sum(wrapped(b) for b in batches) / len(batches)

    flat0 = torch.cat([base[n].reshape(-1) for n in names])
    H = torch.autograd.functional.hessian(mean_loss, flat0, vectorize=True).numpy()  # vmap over rows
    assert np.abs(H - H.T).max() <= 1e-10 * np.abs(H).max()
    return H


def roberta_loss_fn_for_functional(call, batch):
    ids, labels = batch
    return call(input_ids=ids, labels=labels).loss


@pytest.fixture(scope="module")
def mlp():
    model = make_mlp()
    batches = mlp_batches()
    H = dense_hessian(model, lambda call, b: F.cross_entropy(call(b[0]), b[1]), batches)
    return model, batches, H


@pytest.fixture(scope="module")
def roberta():
    model = make_roberta()
    batches = roberta_batches()
    H = dense_hessian(model, roberta_loss_fn_for_functional, batches, ROBERTA_HEAD)
    return model, batches, H


def top(eigenvalues: np.ndarray, k: int, by_magnitude=False) -> np.ndarray:
    key = np.abs(eigenvalues) if by_magnitude else eigenvalues
    return eigenvalues[np.argsort(-key)][:k]


# ---------------------------------------------------------------------------------------------
# the operator


def test_hvp_matches_dense_and_is_linear_and_symmetric(mlp):
    model, batches, H = mlp
    op = HVPOperator(model, mlp_loss, batches)
    assert op.dim == H.shape[0] == 114
    g = torch.Generator().manual_seed(3)
    u, v = (torch.randn(op.dim, generator=g, dtype=torch.float64) for _ in range(2))
    Hu, Hv = op.matvec(u), op.matvec(v)
    np.testing.assert_allclose(Hv.numpy(), H @ v.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(op.matvec(2 * u - 3 * v).numpy(), (2 * Hu - 3 * Hv).numpy(), atol=1e-12)
    assert float(u @ Hv) == pytest.approx(float(v @ Hu), rel=1e-12)
    assert op.n_matvecs == 3


def test_hvp_over_a_parameter_subset_matches_dense(roberta):
    model, batches, H = roberta
    op = HVPOperator(model, mlm_loss, batches, param_names=ROBERTA_HEAD)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    np.testing.assert_allclose(op.matvec(v).numpy(), H @ v.numpy(), rtol=1e-9, atol=1e-12)


def test_loss_and_grad_is_the_mean_over_batches(mlp):
    model, batches, _ = mlp
    loss, grad = HVPOperator(model, mlp_loss, batches).loss_and_grad()
    model.zero_grad()
    mean = sum(mlp_loss(model, b) for b in batches) / len(batches)
    mean.backward()
    assert loss == pytest.approx(mean.item(), rel=1e-12)
    flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    np.testing.assert_allclose(grad.numpy(), flat.numpy(), atol=1e-14)
    model.zero_grad()


class ThreadSum:
    """An in-process all_reduce for n threads: each caller gets the sum of everyone's tensor."""

    def __init__(self, n_workers: int):
        self.barrier = threading.Barrier(n_workers, timeout=60)  # a failed worker can't hang us
        self.slots: list[torch.Tensor | None] = [None] * n_workers

    def hook(self, rank: int):
        def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            total = sum(self.slots)  # same order on every rank, so bitwise-equal answers
            self.barrier.wait()
            return total

        return all_reduce


def run_workers(fn, n_workers: int):
    with ThreadPoolExecutor(n_workers) as pool:
        futures = [pool.submit(fn, rank) for rank in range(n_workers)]
        return [f.result() for f in futures]


def test_two_workers_with_summing_all_reduce_equal_one_worker(mlp):
    model, batches, _ = mlp
    weights = [1.0, 2.0, 3.0, 4.0]  # e.g. token counts; normalised by the global total
    v = torch.randn(114, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    single = HVPOperator(model, mlp_loss, batches, weights=weights)
    expected_hv, (expected_loss, expected_grad) = single.matvec(v), single.loss_and_grad()

    shards = [[0], [1, 2, 3]]  # uneven on purpose: the weight total must be global
    reduce = ThreadSum(2)

    def worker(rank):
        local = copy.deepcopy(model)
        op = HVPOperator(
            local, mlp_loss, [batches[i] for i in shards[rank]],
            weights=[weights[i] for i in shards[rank]], all_reduce=reduce.hook(rank),
        )
        return op.matvec(v), op.loss_and_grad()

    for hv, (loss, grad) in run_workers(worker, 2):
        np.testing.assert_allclose(hv.numpy(), expected_hv.numpy(), rtol=1e-12, atol=1e-15)
        assert loss == pytest.approx(expected_loss, rel=1e-12)
        np.testing.assert_allclose(grad.numpy(), expected_grad.numpy(), rtol=1e-12, atol=1e-15)


def test_spectrum_split_over_two_workers_matches_one(mlp):
    model, batches, _ = mlp
    kwargs = {"top_k": 3, "trace_matvecs": 30, "density_runs": 2, "density_steps": 10, "seed": 7}
    expected = spectrum(copy.deepcopy(model), mlp_loss, batches, **kwargs)
    reduce = ThreadSum(2)

    def worker(rank):
        local = copy.deepcopy(model)
        return spectrum(local, mlp_loss, batches[2 * rank: 2 * rank + 2],
                        all_reduce=reduce.hook(rank), **kwargs)

    for got in run_workers(worker, 2):
        np.testing.assert_allclose(got.eigenvalues, expected.eigenvalues, rtol=1e-9)
        assert got.trace == pytest.approx(expected.trace, rel=1e-9)
        assert got.n_matvecs == expected.n_matvecs


def test_torch_distributed_sum_is_an_all_reduce_hook(mlp, tmp_path):
    import torch.distributed as dist

    model, batches, _ = mlp
    ours = not dist.is_initialized()  # an engine trained earlier in this process keeps its one-process group
    if ours:
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    assert dist.get_world_size() == 1
    try:
        v = torch.ones(114, dtype=torch.float64)
        got = HVPOperator(model, mlp_loss, batches, all_reduce=torch_distributed_sum).matvec(v)
    finally:
        if ours:
            dist.destroy_process_group()
    np.testing.assert_allclose(got.numpy(), HVPOperator(model, mlp_loss, batches).matvec(v).numpy())


def test_operator_errors_name_the_values(mlp):
    model, batches, _ = mlp
    with pytest.raises(ValueError, match="got 3 weights for 4 batches"):
        HVPOperator(model, mlp_loss, batches, weights=[1, 1, 1])
    with pytest.raises(KeyError, match="nope"):
        HVPOperator(model, mlp_loss, batches, param_names=["nope"])
    op = HVPOperator(model, mlp_loss, batches)
    with pytest.raises(ValueError, match=r"shape \(7,\), expected \(114,\)"):
        op.matvec(torch.zeros(7, dtype=torch.float64))
    bad = HVPOperator(model, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none"), batches)
    with pytest.raises(ValueError, match=r"scalar tensor, got \(16,\)"):
        bad.loss_and_grad()


# ---------------------------------------------------------------------------------------------
# the estimators against the dense spectrum


def test_lanczos_top5_matches_dense_mlp(mlp):
    model, batches, H = mlp
    op = HVPOperator(model, mlp_loss, batches)
    result = lanczos(op.matvec, op.dim, 5, tol=1e-4, return_eigenvectors=True)
    expected = top(np.linalg.eigvalsh(H), 5)
    assert result.converged
    np.testing.assert_allclose(result.eigenvalues, expected, rtol=1e-4)
    assert result.n_matvecs == op.n_matvecs < op.dim
    Y = result.eigenvectors.numpy()  # (5, dim): unit Ritz vectors with Rayleigh quotients = θ
    np.testing.assert_allclose(np.einsum("id,de,ie->i", Y, H, Y), result.eigenvalues, rtol=1e-6)


def test_lanczos_top5_matches_dense_roberta_head(roberta):
    model, batches, H = roberta
    op = HVPOperator(model, mlm_loss, batches, param_names=ROBERTA_HEAD)
    result = lanczos(op.matvec, op.dim, 5, tol=1e-4)
    assert result.converged
    np.testing.assert_allclose(result.eigenvalues, top(np.linalg.eigvalsh(H), 5), rtol=1e-4)


def test_lanczos_by_magnitude_and_power_iteration_agree(mlp):
    model, batches, H = mlp
    op = HVPOperator(model, mlp_loss, batches)
    expected = top(np.linalg.eigvalsh(H), 5, by_magnitude=True)
    lm = lanczos(op.matvec, op.dim, 5, which="LM", tol=1e-4)
    np.testing.assert_allclose(lm.eigenvalues, expected, rtol=1e-4)
    power = power_iteration(op.matvec, op.dim, 5, tol=1e-3, max_iter=300)
    assert power.converged and power.n_matvecs == sum(power.n_iter)
    # deflation finds close eigenvalues out of order, and PyHessian's stopping rule bounds the
    # change per step, not the error: tol=1e-3 leaves errors of a few 1e-3 here
    np.testing.assert_allclose(top(power.eigenvalues, 5, by_magnitude=True), expected, rtol=1e-2)
    tight = power_iteration(op.matvec, op.dim, 5, tol=1e-6, max_iter=1000)  # ~450 HVPs
    np.testing.assert_allclose(top(tight.eigenvalues, 5, by_magnitude=True), expected, rtol=1e-4)


def test_lanczos_on_full_roberta_is_consistent_with_power_iteration():
    model = make_roberta()
    op = HVPOperator(model, mlm_loss, roberta_batches())
    lm = lanczos(op.matvec, op.dim, 3, which="LM", tol=1e-4)
    power = power_iteration(op.matvec, op.dim, 1, tol=1e-6, max_iter=300)
    assert lm.converged and op.dim == 3278
    assert power.eigenvalues[0] == pytest.approx(lm.eigenvalues[0], rel=1e-3)


def test_lanczos_handles_low_rank_and_exhausted_krylov_space():
    A = torch.diag(torch.tensor([5.0, 4.0, 3.0] + [0.0] * 17, dtype=torch.float64))
    result = lanczos(lambda v: A @ v, 20, 5, tol=1e-8)
    assert result.converged
    np.testing.assert_allclose(result.eigenvalues, [5, 4, 3, 0, 0], atol=1e-10)
    small = torch.diag(torch.arange(1.0, 5.0, dtype=torch.float64))  # k == dim
    np.testing.assert_allclose(lanczos(lambda v: small @ v, 4, 4).eigenvalues, [4, 3, 2, 1])


def test_hutchpp_trace(mlp):
    model, batches, H = mlp
    op = HVPOperator(model, mlp_loss, batches)
    exact = float(np.trace(H))
    rough = hutchpp_trace(op.matvec, op.dim, 60, seed=0)
    assert rough.n_matvecs == 60
    assert abs(rough.trace - exact) <= max(0.1 * abs(exact), 4 * rough.stderr)
    full = hutchpp_trace(op.matvec, op.dim, op.dim, seed=0)
    assert full.trace == pytest.approx(exact, rel=1e-10) and full.stderr == 0


def test_slq_density_integrates_to_one_and_has_mean_trace_over_dim(mlp):
    model, batches, H = mlp
    op = HVPOperator(model, mlp_loss, batches)
    n_runs, dim = 8, op.dim
    density = slq_density(op.matvec, dim, n_runs=n_runs, n_steps=20, seed=0)
    assert density.n_matvecs == n_runs * 20
    assert np.trapezoid(density.density, density.grid) == pytest.approx(1.0, abs=1e-6)
    for w in density.weights:
        assert w.sum() == pytest.approx(1.0, abs=1e-12)
    mean = np.trapezoid(density.grid * density.density, density.grid)
    # the mean is a Rademacher Hutchinson estimate of tr(H)/dim; its std is known from H
    off_diag_sq = (H**2).sum() - (np.diag(H) ** 2).sum()
    stderr = np.sqrt(2 * off_diag_sq / n_runs) / dim
    assert abs(mean - np.trace(H) / dim) <= 4 * stderr
    eigenvalues = np.linalg.eigvalsh(H)
    assert density.grid[0] < eigenvalues.min() and density.grid[-1] > eigenvalues.max()


# ---------------------------------------------------------------------------------------------
# the entry point


def test_spectrum_is_deterministic_for_a_seed_and_restores_the_model(mlp):
    model, batches, H = mlp
    model.train()
    kwargs = {"top_k": 5, "trace_matvecs": 30, "density_runs": 2, "density_steps": 15}
    a = spectrum(model, mlp_loss, iter(batches), seed=3, **kwargs)  # any iterable
    b = spectrum(model, mlp_loss, batches, seed=3, **kwargs)
    c = spectrum(model, mlp_loss, batches, seed=4, **kwargs)
    assert model.training
    np.testing.assert_array_equal(a.eigenvalues, b.eigenvalues)
    assert a.trace == b.trace and a.trace != c.trace
    np.testing.assert_array_equal(a.density, b.density)
    np.testing.assert_allclose(a.eigenvalues, top(np.linalg.eigvalsh(H), 5), rtol=1e-4)
    assert a.n_matvecs == a.n_matvecs_eigen + 30 + 30 and a.n_params == 114
    record = a.to_record()
    assert record["lambda_max"] == a.eigenvalues[0] and len(record["eigenvalues"]) == 5


def test_double_backward_safe_switches_sdpa_to_eager_and_back():
    model = make_roberta(attn_implementation="sdpa")
    assert model.config._attn_implementation == "sdpa"
    with double_backward_safe(model):
        assert model.config._attn_implementation == "eager"
        op = HVPOperator(model, mlm_loss, roberta_batches()[:1])
        hv = op.matvec(torch.ones(op.dim, dtype=torch.float64))
    assert model.config._attn_implementation == "sdpa"
    assert torch.isfinite(hv).all()


def test_spectrum_in_bfloat16_and_float32_is_close_to_float64(mlp):
    _, _, H = mlp
    expected = top(np.linalg.eigvalsh(H), 1)[0]
    for dtype, rtol in [(torch.float32, 1e-3), (torch.bfloat16, 5e-2)]:
        model = make_mlp(dtype)
        result = spectrum(model, mlp_loss, mlp_batches(dtype=dtype), top_k=1, tol=1e-3,
                          max_iter=40, trace_matvecs=0, density_runs=0)
        assert result.eigenvalues[0] == pytest.approx(expected, rel=rtol), dtype


# ---------------------------------------------------------------------------------------------
# bounded memory: a fixed basis, a capped sketch, three-vector SLQ, a sharded basis


def test_thick_restart_with_a_small_basis_still_matches_dense(mlp):
    model, batches, H = mlp
    op = HVPOperator(model, mlp_loss, batches)
    result = lanczos(op.matvec, op.dim, 5, tol=1e-4, max_iter=200, n_basis=11, return_eigenvectors=True)
    assert result.converged and result.n_restarts >= 1 and result.n_basis == 11
    np.testing.assert_allclose(result.eigenvalues, top(np.linalg.eigvalsh(H), 5), rtol=1e-4)
    Y = result.eigenvectors.numpy()  # the kept Ritz vectors stay orthonormal through the restarts
    np.testing.assert_allclose(Y @ Y.T, np.eye(5), atol=1e-10)
    np.testing.assert_allclose(np.einsum("id,de,ie->i", Y, H, Y), result.eigenvalues, rtol=1e-6)


def test_thick_restart_finds_low_rank_spectra_and_rejects_too_small_a_basis():
    A = torch.diag(torch.tensor([5.0, 4.0, 3.0] + [0.0] * 37, dtype=torch.float64))
    result = lanczos(lambda v: A @ v, 40, 5, tol=1e-8, n_basis=7)
    assert result.converged
    np.testing.assert_allclose(result.eigenvalues, [5, 4, 3, 0, 0], atol=1e-10)
    with pytest.raises(ValueError, match="n_basis=5 must exceed k=5"):
        lanczos(lambda v: A @ v, 40, 5, n_basis=5)


def test_lanczos_stores_the_same_basis_whatever_max_iter():
    d = torch.linspace(1.0, 2.0, 300, dtype=torch.float64)  # clustered: never converges at tol 0
    short = lanczos(lambda v: d * v, 300, 3, tol=0.0, max_iter=30)
    long = lanczos(lambda v: d * v, 300, 3, tol=0.0, max_iter=120)
    assert short.n_matvecs == 30 and long.n_matvecs == 120 and not long.converged
    assert short.n_basis == long.n_basis == 20 and long.n_restarts > short.n_restarts >= 1
    assert long.eigenvalues[0] == pytest.approx(2.0, abs=1e-6)  # restarts still converge


def test_slq_without_reorthogonalisation_keeps_the_quadrature_moments(mlp):
    """Σ τ_i θ_iᵖ = v₀ᵀ Hᵖ v₀ for p < 2 n_steps in exact arithmetic; plain Lanczos run well past the
    loss of orthogonality (40 steps on a 114-dim Hessian whose top eigenvalues converge in ~15)
    must keep it to rounding (Knizhnerman 1996)."""
    _, _, H = mlp
    Ht = torch.from_numpy(H)
    starts = []

    def matvec(v):
        if not starts:
            starts.append(v.clone())
        return Ht @ v

    density = slq_density(matvec, 114, n_runs=1, n_steps=40, seed=0)
    v0 = starts[0].numpy()
    assert np.linalg.norm(v0) == pytest.approx(1.0, abs=1e-12)
    theta, tau = density.nodes[0], density.weights[0]
    norm = np.abs(np.linalg.eigvalsh(H)).max()
    u = v0.copy()
    for p in range(1, 12):
        u = H @ u  # Hᵖ v₀
        assert (tau * theta**p).sum() == pytest.approx(v0 @ u, abs=1e-9 * norm**p), p


def test_hutchpp_sketch_is_capped_and_exact_on_a_low_rank_operator():
    Q, _ = torch.linalg.qr(torch.randn(50, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    A = Q @ torch.diag(torch.tensor([5.0, 4.0, 3.0] + [0.0] * 47, dtype=torch.float64)) @ Q.T
    result = hutchpp_trace(lambda v: A @ v, 50, 12, seed=0)  # sketch of 4 vectors, H S has rank 3
    assert result.n_sketch == 3 and result.n_matvecs == 12
    assert result.trace == pytest.approx(12.0, abs=1e-10)  # Q spans the range: the remainder is 0


def test_hutchpp_with_a_capped_sketch_spends_the_budget_on_hutchinson(mlp):
    model, batches, H = mlp
    op = HVPOperator(model, mlp_loss, batches)
    capped = hutchpp_trace(op.matvec, op.dim, 60, seed=0, n_sketch=5)
    assert capped.n_sketch == 5 and capped.n_matvecs == 60 == op.n_matvecs
    exact = float(np.trace(H))
    assert abs(capped.trace - exact) <= max(0.1 * abs(exact), 4 * capped.stderr)


def test_sharded_basis_over_two_workers_equals_one(mlp):
    """shard=(rank, 2): each worker stores half of every basis vector; same eigenvalues, eigenvectors, trace."""
    from clmscale.engine.hessian import Shard, _Basis

    model, batches, _ = mlp
    kwargs = {"top_k": 3, "trace_matvecs": 30, "density_runs": 1, "density_steps": 10, "seed": 7, "n_basis": 8,
                  "return_eigenvectors": True}
    expected = spectrum(copy.deepcopy(model), mlp_loss, batches, **kwargs)
    reduce = ThreadSum(2)

    def worker(rank):
        return spectrum(copy.deepcopy(model), mlp_loss, batches[rank::2], all_reduce=reduce.hook(rank),
                        shard=(rank, 2), **kwargs)

    for got in run_workers(worker, 2):
        np.testing.assert_allclose(got.eigenvalues, expected.eigenvalues, rtol=1e-9)
        np.testing.assert_allclose(got.eigenvectors.numpy(), expected.eigenvectors.numpy(), atol=1e-8)
        assert got.trace == pytest.approx(expected.trace, rel=1e-9)
        assert got.lambda_max_half == pytest.approx(expected.lambda_max_half, rel=1e-9)
        assert got.n_matvecs == expected.n_matvecs and got.n_basis == expected.n_basis == 8
    on_host = spectrum(copy.deepcopy(model), mlp_loss, batches, storage_device="cpu", **kwargs)  # rows kept apart
    np.testing.assert_allclose(on_host.eigenvalues, expected.eigenvalues, rtol=1e-12)
    assert on_host.trace == pytest.approx(expected.trace, rel=1e-12)
    half = _Basis(8, 114, dtype=torch.float64, device=torch.device("cpu"),
                  shard=Shard(1, 2, reduce.hook(1)))
    assert tuple(half.rows.shape) == (8, 57)  # what each worker stores


def _gloo_spectrum_worker(rank: int, world: int, store: str, out: str) -> None:
    import json

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    try:
        result = spectrum(make_mlp(), mlp_loss, mlp_batches()[rank::world], top_k=3, n_basis=8,
                          trace_matvecs=0, density_runs=0, seed=3, all_reduce=torch_distributed_sum,
                          shard=(rank, world))
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"eigenvalues": result.eigenvalues.tolist(), "half": result.lambda_max_half}, f)


def test_two_gloo_processes_with_a_sharded_basis_equal_one(tmp_path):
    import json
    import multiprocessing

    import torch.multiprocessing as mp

    multiprocessing.set_forkserver_preload(["clmscale.engine.hessian"])
    out = tmp_path / "result.json"
    mp.start_processes(_gloo_spectrum_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2,
                       start_method="forkserver")
    got = json.loads(out.read_text())
    expected = spectrum(make_mlp(), mlp_loss, mlp_batches(), top_k=3, n_basis=8, trace_matvecs=0,
                        density_runs=0, seed=3)
    np.testing.assert_allclose(got["eigenvalues"], expected.eigenvalues, rtol=1e-9)
    assert got["half"] == pytest.approx(expected.lambda_max_half, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# batches weighted by labelled tokens; λmax over half the batches


def labelled_batches():
    """RoBERTa MLM batches of one shape whose label counts differ (7, 2 and 12 of 16 positions)."""
    g = torch.Generator().manual_seed(5)
    batches = []
    for n_labels in (7, 2, 12):
        ids = torch.randint(3, 30, (2, 8), generator=g)
        labels = torch.full_like(ids, -100)
        where = torch.randperm(16, generator=g)[:n_labels]
        labels.view(-1)[where] = ids.view(-1)[where]
        batches.append((ids, labels))
    return batches


def n_labelled(batch):
    return int((batch[1] != -100).sum())


def test_token_weighted_batches_equal_one_concatenated_batch():
    """HF's MLM loss is the mean over labelled positions, so the token-weighted mean over batches
    is the loss of the batches stacked into one; loss, gradient, H v and eigenvalues agree."""
    model = make_roberta()
    batches = labelled_batches()
    joined = [(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))]
    weighted = HVPOperator(model, mlm_loss, batches, count_fn=n_labelled, param_names=ROBERTA_HEAD)
    single = HVPOperator(model, mlm_loss, joined, param_names=ROBERTA_HEAD)
    equal = HVPOperator(model, mlm_loss, batches, param_names=ROBERTA_HEAD)
    assert weighted.weight_total == 21
    (loss_w, grad_w), (loss_1, grad_1) = weighted.loss_and_grad(), single.loss_and_grad()
    assert loss_w == pytest.approx(loss_1, rel=1e-12)
    assert equal.loss_and_grad()[0] != pytest.approx(loss_1, rel=1e-3)  # the plain mean is not it
    np.testing.assert_allclose(grad_w.numpy(), grad_1.numpy(), rtol=1e-9, atol=1e-13)
    v = torch.randn(weighted.dim, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    np.testing.assert_allclose(weighted.matvec(v).numpy(), single.matvec(v).numpy(), rtol=1e-9, atol=1e-12)
    kwargs = {"top_k": 3, "param_names": ROBERTA_HEAD, "trace_matvecs": 0, "density_runs": 0, "half_batches": False}
    np.testing.assert_allclose(spectrum(model, mlm_loss, batches, count_fn=n_labelled, **kwargs).eigenvalues,
                               spectrum(model, mlm_loss, joined, **kwargs).eigenvalues, rtol=1e-8)
    with pytest.raises(ValueError, match="not both"):
        HVPOperator(model, mlm_loss, batches, weights=[1, 1, 1], count_fn=n_labelled)


def test_lambda_max_half_is_lambda_max_over_the_first_half_of_the_batches(mlp):
    model, batches, _ = mlp
    kwargs = {"trace_matvecs": 0, "density_runs": 0, "seed": 1}
    full = spectrum(model, mlp_loss, batches, top_k=2, **kwargs)
    first_half = spectrum(model, mlp_loss, batches[:2], top_k=1, half_batches=False, **kwargs)
    assert full.n_batches_half == 2 and full.n_matvecs_half > 0 and full.lambda_max_half_converged
    assert full.lambda_max_half == pytest.approx(first_half.eigenvalues[0], rel=1e-6)
    assert full.lambda_max_half != pytest.approx(full.eigenvalues[0], rel=1e-3)  # the batches differ
    record = full.to_record()
    assert record["lambda_max_half_rel_diff"] == pytest.approx(
        (first_half.eigenvalues[0] - full.eigenvalues[0]) / abs(full.eigenvalues[0]), rel=1e-5)
    one = spectrum(model, mlp_loss, batches[:1], top_k=1, **kwargs).to_record()
    assert one["lambda_max_half"] is None and one["lambda_max_half_rel_diff"] is None


# ---------------------------------------------------------------------------------------------
# TF32 and the memory estimate


def test_tf32_sets_and_restores_the_cuda_flag_and_is_a_no_op_on_cpu(mlp):
    from clmscale.engine.hessian import tf32_matmuls

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    with tf32_matmuls(True, "cuda"):  # only a flag: no GPU needed to check it
        assert matmul.fp32_precision == "tf32"
    with tf32_matmuls(False, torch.device("cuda", 0)):
        assert matmul.fp32_precision == "ieee"
    with tf32_matmuls(True, "cpu"):
        assert matmul.fp32_precision == before
    assert matmul.fp32_precision == before
    model, batches, _ = mlp
    v = torch.ones(114, dtype=torch.float64)
    on = HVPOperator(model, mlp_loss, batches, tf32=True).matvec(v)
    torch.testing.assert_close(on, HVPOperator(model, mlp_loss, batches).matvec(v), rtol=0, atol=0)


def test_memory_estimate_is_flat_in_max_iter_and_shards_over_workers():
    from clmscale.engine.hessian import memory_estimate

    n = 1_000_000
    short = memory_estimate(n, torch.float32, 30, 5, 30)
    long = memory_estimate(n, "float32", 120, 5, 30)
    assert short == long and short["n_basis"] == 20 and short["n_sketch"] == 10
    assert short["lanczos_bytes"] == 20 * n * 4 and short["hvp_bytes"] == 3 * n * 4
    assert short["peak_bytes"] == 23 * n * 4 and short["bytes_per_param"] == 92
    two = memory_estimate(n, torch.float32, 120, 5, 30, n_workers=2)
    assert two["lanczos_bytes"] == 20 * (n // 2) * 4 + n * 4  # half of each vector, plus the full one being multiplied
    bf16 = memory_estimate(n, torch.bfloat16, 120, 5, 30)
    assert bf16["lanczos_bytes"] == 20 * n * 4 and bf16["hvp_bytes"] == 3 * n * 2 + n * 4  # float32 vectors
    few = memory_estimate(n, torch.float32, 8, 5, 0, density_runs=0, half_batches=False)
    assert few["n_basis"] == 8 and few["trace_bytes"] == few["density_bytes"] == 0
    host = memory_estimate(n, torch.float32, 120, 5, 30, storage="host")
    assert host["lanczos_bytes"] == n * 4 and host["host_bytes"] == 21 * n * 4


def test_power_iteration_without_iterations_is_an_error_naming_max_iter():
    with pytest.raises(ValueError, match="max_iter=0 must be at least 1"):
        power_iteration(lambda v: v, dim=4, k=1, max_iter=0)
