"""Hessian spectrum of a checkpoint's loss: top eigenvalues, trace and spectral density.

The story, in order: make attention twice-differentiable (`double_backward_safe`), wrap the
model as a Hessian-vector product over a fixed list of batches (`HVPOperator`, Pearlmutter 1994),
then spend matvecs on estimators that only ever see `v -> H v`:

    lanczos          top-k eigenvalues, full reorthogonalisation (Golub & Van Loan, ch. 10)
    power_iteration  PyHessian's baseline (Yao et al. 2020), one eigenvalue at a time, deflated
    hutchpp_trace    trace by Hutch++ (Meyer, Musco, Musco & Woodruff 2021)
    slq_density      spectral density by stochastic Lanczos quadrature (Ghorbani et al. 2019)

and `spectrum(...)` runs all of them and returns one `HessianSpectrum`.

Nothing here imports ray or rdkit: the module runs standalone on a GPU box. A distributed
caller passes `all_reduce`, a function that sums a tensor across workers, and gives each worker
its own share of the batches (see `HVPOperator`). Vectors are flat tensors; the Krylov
arithmetic is float64 whatever the model dtype, while H v itself is computed in the model dtype.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import scipy.linalg
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]  # (model, batch) -> scalar loss
MatVec = Callable[[torch.Tensor], torch.Tensor]  # (dim,) -> (dim,)
AllReduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over workers, returns the sum
Which = Literal["LA", "LM"]  # largest algebraic / largest magnitude, as in scipy's eigsh


# ---------------------------------------------------------------------------------------------
# attention that survives double backward


@contextlib.contextmanager
def double_backward_safe(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run `model` with attention kernels that have a second derivative, restoring them after.

    Fused attention (PyTorch's flash / memory-efficient SDPA, FlashAttention-2) implements only
    a first backward, so H v fails with "derivative for aten::_scaled_dot_product_flash_attention
    _for_cpu_backward is not implemented". For a `transformers` model we switch to the "eager"
    implementation with `PreTrainedModel.set_attn_implementation` (transformers >= 4.48, the
    supported way in v5; it also reaches sub-models); for any module we pin
    `F.scaled_dot_product_attention` to its MATH backend, which is plain differentiable ops.
    """
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    switched = previous is not None and previous != "eager"
    if switched:
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
        else:
            config._attn_implementation = "eager"
        if config._attn_implementation != "eager":
            log.warning(
                "%s kept attn_implementation=%r (it cannot switch at runtime); double backward "
                "works only if that kernel is twice differentiable",
                type(model).__name__, config._attn_implementation,
            )
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield model
    finally:
        if switched:
            if hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation(previous)
            else:
                config._attn_implementation = previous


# ---------------------------------------------------------------------------------------------
# the operator: v -> H v over a fixed list of batches


def trainable_parameters(
    model: torch.nn.Module, param_names: Iterable[str] | None = None
) -> tuple[list[str], list[torch.nn.Parameter]]:
    """The parameters the Hessian is taken over: all with requires_grad, or the named subset."""
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if param_names is None:
        return list(named), list(named.values())
    wanted = list(param_names)
    missing = [name for name in wanted if name not in named]
    if missing:
        raise KeyError(
            f"param_names {missing[:5]} are not trainable parameters of {type(model).__name__} "
            f"(it has {len(named)}, e.g. {list(named)[:3]})"
        )
    if not wanted:
        raise ValueError("param_names is empty: the Hessian needs at least one parameter")
    return wanted, [named[name] for name in wanted]


class HVPOperator:
    """H v for the weighted mean loss L = sum_b w_b loss_fn(model, b) / sum_b w_b, by double backward.

    Per batch: g = dL_b/dθ with create_graph=True, then H_b v = d(g·v)/dθ (Pearlmutter 1994), so
    no Hessian is ever stored and each matvec costs about two backward passes per batch.
    `weights` are relative (default 1 per batch, i.e. the plain mean over batches; pass token
    counts for a per-token mean); they are normalised by their sum over *all* workers.

    Distributed use: each worker builds the operator on its own batches with the same model
    weights and passes `all_reduce` (e.g. `torch_distributed_sum`). Construction then all-reduces
    the weight total once, and every `matvec` / `loss_and_grad` all-reduces its weighted partial
    sum, so each worker gets exactly the single-worker answer. All workers must make the same
    calls in the same order (the estimators below do, given the same seed).

    The model is used as it is: put it in eval mode first (`spectrum` does) so dropout does not
    make H v random.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: LossFn,
        batches: Iterable[Any],
        *,
        weights: Sequence[float] | None = None,
        param_names: Iterable[str] | None = None,
        all_reduce: AllReduce | None = None,
    ):
        self.model = model
        self.loss_fn = loss_fn
        self.batches = list(batches)
        self.all_reduce = all_reduce
        self.param_names, self.params = trainable_parameters(model, param_names)
        self._numels = [p.numel() for p in self.params]
        self.dim = sum(self._numels)
        self.device = self.params[0].device
        self.n_matvecs = 0

        raw = np.ones(len(self.batches)) if weights is None else np.asarray(weights, dtype=np.float64)
        if raw.shape != (len(self.batches),):
            raise ValueError(f"got {raw.size} weights for {len(self.batches)} batches")
        if not np.all(np.isfinite(raw)) or np.any(raw < 0):
            raise ValueError(f"batch weights must be finite and >= 0, got {raw.tolist()}")
        total = float(raw.sum())
        if all_reduce is not None:  # one collective call, so construction is collective too
            total = float(all_reduce(torch.tensor([total], dtype=torch.float64, device=self.device)))
        if total <= 0:
            raise ValueError(
                f"batch weights sum to {total} (over {len(self.batches)} local batches); "
                "the mean loss needs a positive total"
            )
        self.batch_weights = (raw / total).tolist()

    def _loss(self, batch: Any) -> torch.Tensor:
        loss = self.loss_fn(self.model, batch)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return a scalar tensor, got {shape}")
        return loss

    def _flat(self, tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return torch.cat([t.reshape(-1).to(dtype) for t in tensors])

    def loss_and_grad(self) -> tuple[float, torch.Tensor]:
        """The mean loss and its gradient (float64, flat) at the current weights."""
        out = torch.zeros(self.dim + 1, dtype=torch.float64, device=self.device)  # [grad, loss]
        with torch.enable_grad():
            for batch, w in zip(self.batches, self.batch_weights):
                loss = self._loss(batch)
                grads = torch.autograd.grad(loss, self.params, materialize_grads=True)
                out[:-1].add_(self._flat(grads, torch.float64), alpha=w)
                out[-1] += w * loss.detach().double()
        if self.all_reduce is not None:
            out = self.all_reduce(out)  # one call carries both, so one sync
        return float(out[-1]), out[:-1]

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H v, returned in v's dtype; the HVP runs in the parameters' dtype."""
        if v.shape != (self.dim,):
            raise ValueError(f"v has shape {tuple(v.shape)}, expected ({self.dim},)")
        acc_dtype = torch.promote_types(v.dtype, torch.float32)  # never accumulate in bf16
        vs = [
            chunk.view_as(p).to(p.dtype)
            for chunk, p in zip(v.to(self.device).split(self._numels), self.params)
        ]
        out = torch.zeros(self.dim, dtype=acc_dtype, device=self.device)
        with torch.enable_grad():
            for batch, w in zip(self.batches, self.batch_weights):
                grads = torch.autograd.grad(
                    self._loss(batch), self.params, create_graph=True, materialize_grads=True
                )
                # a gradient with no graph is constant in θ: its rows of H are zero
                live = [(g, u) for g, u in zip(grads, vs) if g.requires_grad]
                if not live:
                    continue
                hv = torch.autograd.grad(
                    [g for g, _ in live], self.params,
                    grad_outputs=[u for _, u in live], materialize_grads=True,
                )
                out.add_(self._flat(hv, acc_dtype), alpha=w)
        if self.all_reduce is not None:
            out = self.all_reduce(out)
        self.n_matvecs += 1
        return out.to(v.dtype)

    __call__ = matvec


def torch_distributed_sum(tensor: torch.Tensor) -> torch.Tensor:
    """An `all_reduce` hook for an initialised torch.distributed group (e.g. inside a Ray
    TorchTrainer worker): sums in place over all ranks and returns the tensor."""
    import torch.distributed as dist

    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


# ---------------------------------------------------------------------------------------------
# Lanczos with full reorthogonalisation, shared by the top-k solver and SLQ


def _gaussian(dim: int, generator: torch.Generator) -> torch.Tensor:
    # drawn on the CPU so a seed gives the same vector on every device and every worker
    return torch.randn(dim, generator=generator, dtype=torch.float64)


def _rademacher(dim: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (dim,), generator=generator, dtype=torch.float64) * 2 - 1


def _lanczos_tridiagonal(
    matvec: MatVec,
    v0: torch.Tensor,
    n_steps: int,
    *,
    generator: torch.Generator,
    restart_on_breakdown: bool,
    on_step: Callable[[np.ndarray, np.ndarray, float], bool] | None = None,
) -> tuple[np.ndarray, np.ndarray, float, torch.Tensor]:
    """Up to n_steps of Lanczos from v0: T's diagonal, off-diagonal, the last β and the basis V.

    Every new vector is orthogonalised against the whole basis twice (classical Gram-Schmidt
    applied twice, "twice is enough"), which is what keeps Ritz values free of the ghost copies
    plain three-term Lanczos produces in floating point. Cost: V holds n_steps * dim numbers.
    When β vanishes the Krylov space is invariant; we then either stop (SLQ: the quadrature is
    exact) or restart from a random vector orthogonal to V with a zero coupling in T (top-k:
    this is how repeated or missing eigenvalues still get found).
    `on_step(alphas, betas, beta_last)` returning True stops early.
    """
    dim = v0.numel()
    V = v0.new_empty(n_steps, dim)
    V[0] = v0 / v0.norm()
    alphas: list[float] = []
    betas: list[float] = []
    beta = 0.0
    scale = 0.0  # running estimate of ||T||, to judge when β is zero
    for j in range(n_steps):
        w = matvec(V[j]).to(device=V.device, dtype=V.dtype, copy=True)
        alpha = float(w @ V[j])
        w.sub_(V[j], alpha=alpha)
        if j > 0:
            w.sub_(V[j - 1], alpha=betas[-1])
        basis = V[: j + 1]
        for _ in range(2):
            w.sub_(basis.T @ (basis @ w))
        alphas.append(alpha)
        beta = float(w.norm())
        scale = max(scale, abs(alpha) + beta + (betas[-1] if betas else 0.0))
        invariant = j + 1 == dim or beta <= 1e-10 * scale
        if invariant:
            beta = 0.0
        if on_step is not None and on_step(np.array(alphas), np.array(betas), beta):
            break
        if j + 1 == n_steps or (invariant and not restart_on_breakdown):
            break
        if invariant:
            w = _gaussian(dim, generator).to(device=V.device, dtype=V.dtype)
            for _ in range(2):
                w.sub_(basis.T @ (basis @ w))
        V[j + 1] = w / w.norm()
        betas.append(beta)
    m = len(alphas)
    return np.array(alphas), np.array(betas), beta, V[:m]


def _ritz(alphas: np.ndarray, betas: np.ndarray, which: Which) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of the tridiagonal T, ordered by `which` (largest first)."""
    theta, S = scipy.linalg.eigh_tridiagonal(alphas, betas)
    order = np.argsort(-theta if which == "LA" else -np.abs(theta), kind="stable")
    return theta[order], S[:, order]


@dataclass
class LanczosResult:
    eigenvalues: np.ndarray  # (k,) Ritz values, largest first (by value for "LA", by |.| for "LM")
    residuals: np.ndarray  # (k,) |β_m s_mi|: some true eigenvalue lies within this of each value
    n_matvecs: int
    converged: bool  # every residual below tol * |eigenvalue|
    eigenvectors: torch.Tensor | None = None  # (k, dim) unit Ritz vectors, float64


def lanczos(
    matvec: MatVec,
    dim: int,
    k: int = 5,
    *,
    which: Which = "LA",
    tol: float = 1e-4,
    max_iter: int = 100,
    seed: int = 0,
    device: torch.device | str | None = None,
    return_eigenvectors: bool = False,
) -> LanczosResult:
    """Top-k eigenvalues of a symmetric operator by Lanczos with full reorthogonalisation.

    Stops once every one of the top-k Ritz values θ_i has residual |β_m s_mi| <= tol * |θ_i|
    (floored at tol * 1e-6 * max|θ|, so an exactly-zero eigenvalue can converge too), or after
    max_iter matvecs. The residual bounds the distance from θ_i to the spectrum (Kahan-Parlett),
    and the eigenvalue error is typically its square over the gap, so tol=1e-4 is conservative.
    Like any single-vector Krylov method it sees one copy of an exactly repeated eigenvalue per
    (re)start; exact ties are not expected at a generic point of a trained network.
    """
    if not 1 <= k <= dim:
        raise ValueError(f"k={k} must be in [1, dim={dim}]")
    if which not in ("LA", "LM"):
        raise ValueError(f"which={which!r}, expected 'LA' (largest algebraic) or 'LM' (magnitude)")
    if max_iter < k:
        raise ValueError(f"max_iter={max_iter} is below k={k}: Lanczos needs at least k matvecs")
    generator = torch.Generator().manual_seed(seed)
    v0 = _gaussian(dim, generator).to(device)
    state: dict[str, Any] = {"converged": False}

    def converged(alphas: np.ndarray, betas: np.ndarray, beta_last: float) -> bool:
        if len(alphas) < k:
            return False
        theta, S = _ritz(alphas, betas, which)
        residuals = np.abs(beta_last * S[-1, :k])
        floor = 1e-6 * np.abs(theta).max()
        state["converged"] = bool(np.all(residuals <= tol * np.maximum(np.abs(theta[:k]), floor)))
        return state["converged"]

    alphas, betas, beta_last, V = _lanczos_tridiagonal(
        matvec, v0, min(max_iter, dim), generator=generator, restart_on_breakdown=True,
        on_step=converged,
    )
    theta, S = _ritz(alphas, betas, which)
    eigenvectors = None
    if return_eigenvectors:
        eigenvectors = torch.from_numpy(np.ascontiguousarray(S[:, :k].T)).to(V) @ V  # (k, dim)
    if not state["converged"]:
        log.warning("lanczos: top-%d not converged to tol=%g after %d matvecs", k, tol, len(alphas))
    return LanczosResult(
        eigenvalues=theta[:k],
        residuals=np.abs(beta_last * S[-1, :k]),
        n_matvecs=len(alphas),
        converged=state["converged"],
        eigenvectors=eigenvectors,
    )


# ---------------------------------------------------------------------------------------------
# the baseline: PyHessian's power iteration with deflation


@dataclass
class PowerIterationResult:
    eigenvalues: np.ndarray  # (k,) in the order found: roughly decreasing |λ|
    n_matvecs: int
    n_iter: list[int]  # matvecs spent on each eigenvalue
    converged: bool  # every eigenvalue met tol before max_iter
    eigenvectors: torch.Tensor | None = None  # (k, dim)


def power_iteration(
    matvec: MatVec,
    dim: int,
    k: int = 5,
    *,
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
    device: torch.device | str | None = None,
    return_eigenvectors: bool = False,
) -> PowerIterationResult:
    """Top-k eigenvalues by |λ|, one at a time, as PyHessian's `hessian.eigenvalues` does.

    Each eigenvalue: start from a fresh Gaussian vector, orthogonalise against the eigenvectors
    already found (deflation), take the Rayleigh quotient and stop when it changes by less than
    tol relative to the previous one (|λ - λ_prev| / (|λ_prev| + 1e-6), PyHessian's rule). Kept as
    the baseline the Lanczos benchmark is measured against; it converges at rate |λ_{i+1}/λ_i|.
    """
    if not 1 <= k <= dim:
        raise ValueError(f"k={k} must be in [1, dim={dim}]")
    generator = torch.Generator().manual_seed(seed)
    found: list[torch.Tensor] = []
    eigenvalues: list[float] = []
    n_iter: list[int] = []
    all_converged = True
    for _ in range(k):
        v = _gaussian(dim, generator).to(device)
        eigenvalue: float | None = None
        converged = False
        for i in range(max_iter):
            for u in found:  # deflation: stay orthogonal to what is already found
                v = v - (v @ u) * u
            v = v / v.norm()
            hv = matvec(v).to(v)
            estimate = float(hv @ v)
            v = hv / hv.norm()
            if eigenvalue is not None and abs(eigenvalue - estimate) / (abs(eigenvalue) + 1e-6) < tol:
                eigenvalue, converged = estimate, True
                break
            eigenvalue = estimate
        n_iter.append(i + 1)
        all_converged &= converged
        eigenvalues.append(eigenvalue)
        for u in found:  # the returned vector is the normalised H v; re-deflate it
            v = v - (v @ u) * u
        found.append(v / v.norm())
    return PowerIterationResult(
        eigenvalues=np.array(eigenvalues),
        n_matvecs=sum(n_iter),
        n_iter=n_iter,
        converged=all_converged,
        eigenvectors=torch.stack(found) if return_eigenvectors else None,
    )


# ---------------------------------------------------------------------------------------------
# trace by Hutch++


@dataclass
class TraceEstimate:
    trace: float
    stderr: float  # of the Hutchinson part only; 0 when the trace is exact
    n_matvecs: int


def hutchpp_trace(
    matvec: MatVec,
    dim: int,
    n_matvecs: int,
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> TraceEstimate:
    """tr(H) by Hutch++ (Meyer et al. 2021, Algorithm 1) with Rademacher vectors.

    A third of the budget sketches the top of the spectrum (Q = orth(H S)), a third takes its
    trace exactly (tr Qᵀ H Q), and the rest runs Hutchinson on the deflated (I - QQᵀ) H (I - QQᵀ).
    Error falls as 1/m instead of Hutchinson's 1/sqrt(m) when the spectrum is dominated by a few
    outliers, as Hessians are. With a budget >= dim we take the exact trace from unit vectors.
    Memory: about n_matvecs/3 vectors of dim float64.
    """
    if n_matvecs < 3:
        raise ValueError(f"n_matvecs={n_matvecs}: Hutch++ needs at least 3 (one per third)")
    if n_matvecs >= dim:
        trace = 0.0
        for i in range(dim):
            e = torch.zeros(dim, dtype=torch.float64, device=device)
            e[i] = 1.0
            trace += float(matvec(e)[i])
        return TraceEstimate(trace=trace, stderr=0.0, n_matvecs=dim)
    generator = torch.Generator().manual_seed(seed)
    n_sketch = n_matvecs // 3
    n_hutch = n_matvecs - 2 * n_sketch
    HS = torch.stack([matvec(_rademacher(dim, generator).to(device)) for _ in range(n_sketch)], 1)
    Q, _ = torch.linalg.qr(HS.to(torch.float64))  # (dim, n_sketch), orthonormal
    del HS
    trace_top = sum(float(Q[:, i] @ matvec(Q[:, i].contiguous())) for i in range(n_sketch))
    samples = []
    for _ in range(n_hutch):
        g = _rademacher(dim, generator).to(device)
        g = g - Q @ (Q.T @ g)
        samples.append(float(g @ matvec(g)))  # gᵀ P H P g, with P g already applied
    samples_np = np.array(samples)
    return TraceEstimate(
        trace=trace_top + float(samples_np.mean()),
        stderr=float(samples_np.std(ddof=1) / np.sqrt(n_hutch)) if n_hutch > 1 else float("nan"),
        n_matvecs=2 * n_sketch + n_hutch,
    )


# ---------------------------------------------------------------------------------------------
# spectral density by stochastic Lanczos quadrature


@dataclass
class SpectralDensity:
    grid: np.ndarray  # (n_grid,) eigenvalue axis
    density: np.ndarray  # (n_grid,) Gaussian-broadened density; integrates to ~1 over the grid
    nodes: list[np.ndarray]  # per run: Ritz values θ_i (quadrature nodes)
    weights: list[np.ndarray]  # per run: (first component of each Ritz vector)², summing to 1
    sigma: float  # Gaussian broadening, in eigenvalue units
    n_matvecs: int


def slq_density(
    matvec: MatVec,
    dim: int,
    *,
    n_runs: int = 5,
    n_steps: int = 50,
    seed: int = 0,
    n_grid: int = 1001,
    sigma: float | None = None,
    device: torch.device | str | None = None,
) -> SpectralDensity:
    """Eigenvalue density φ(t) = (1/n_runs) Σ_runs Σ_i τ_i N(t; θ_i, σ²), as PyHessian's density.

    Each run is n_steps of Lanczos from a normalised Rademacher vector v; the Gauss quadrature
    nodes θ_i and weights τ_i = (e_1ᵀ s_i)² satisfy Σ τ_i f(θ_i) ≈ vᵀ f(H) v, whose expectation is
    tr f(H)/dim (Ghorbani et al. 2019; Lin, Saad & Yang 2016). σ defaults to 1% of the node
    range; the grid reaches 5σ past the extreme nodes so each Gaussian is fully on it.
    The mean of the density equals the average of vᵀHv, a Hutchinson estimate of tr(H)/dim.
    """
    if n_runs < 1 or n_steps < 1:
        raise ValueError(f"n_runs={n_runs} and n_steps={n_steps} must both be >= 1")
    generator = torch.Generator().manual_seed(seed)
    nodes, weights = [], []
    n_matvecs = 0
    for _ in range(n_runs):
        v0 = _rademacher(dim, generator).to(device)
        alphas, betas, _, _ = _lanczos_tridiagonal(
            matvec, v0, min(n_steps, dim), generator=generator, restart_on_breakdown=False
        )
        n_matvecs += len(alphas)
        theta, S = scipy.linalg.eigh_tridiagonal(alphas, betas)
        nodes.append(theta)
        weights.append(S[0] ** 2)
    all_nodes = np.concatenate(nodes)
    lo, hi = float(all_nodes.min()), float(all_nodes.max())
    if sigma is None:
        sigma = 0.01 * (hi - lo) if hi > lo else max(abs(hi), 1.0) * 1e-3
    if sigma <= 0:
        raise ValueError(f"sigma={sigma} must be > 0")
    grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, n_grid)
    density = np.zeros(n_grid)
    for theta, tau in zip(nodes, weights):
        z = (grid[:, None] - theta[None, :]) / sigma  # (n_grid, n_nodes)
        density += (np.exp(-0.5 * z**2) @ tau) / (sigma * np.sqrt(2 * np.pi))
    density /= n_runs
    return SpectralDensity(
        grid=grid, density=density, nodes=nodes, weights=weights, sigma=sigma, n_matvecs=n_matvecs
    )


# ---------------------------------------------------------------------------------------------
# the public entry point


@dataclass
class HessianSpectrum:
    n_params: int  # dimension of the Hessian
    loss: float  # mean loss over the batches at the point
    grad_norm: float
    eigenvalues: np.ndarray  # (top_k,) largest first
    eigenvalue_residuals: np.ndarray  # (top_k,)
    converged: bool
    trace: float | None  # None when trace_matvecs=0
    trace_stderr: float | None
    density_grid: np.ndarray | None  # None when density_runs=0
    density: np.ndarray | None
    density_nodes: list[np.ndarray] = field(default_factory=list)
    density_weights: list[np.ndarray] = field(default_factory=list)
    n_matvecs_eigen: int = 0
    n_matvecs_trace: int = 0
    n_matvecs_density: int = 0
    wall_s: float = 0.0
    eigenvectors: torch.Tensor | None = None  # (top_k, n_params), only if asked for

    @property
    def n_matvecs(self) -> int:
        return self.n_matvecs_eigen + self.n_matvecs_trace + self.n_matvecs_density

    def to_record(self) -> dict[str, Any]:
        """One row for results/hessian.parquet: scalars and plain lists, no tensors."""
        return {
            "n_params": self.n_params,
            "loss": self.loss,
            "grad_norm": self.grad_norm,
            "lambda_max": float(self.eigenvalues[0]),
            "eigenvalues": self.eigenvalues.tolist(),
            "eigenvalue_residuals": self.eigenvalue_residuals.tolist(),
            "converged": self.converged,
            "trace": self.trace,
            "trace_stderr": self.trace_stderr,
            "density_grid": None if self.density_grid is None else self.density_grid.tolist(),
            "density": None if self.density is None else self.density.tolist(),
            "n_matvecs": self.n_matvecs,
            "wall_s": self.wall_s,
        }


def spectrum(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    top_k: int = 5,
    *,
    weights: Sequence[float] | None = None,
    param_names: Iterable[str] | None = None,
    which: Which = "LA",
    tol: float = 1e-4,
    max_iter: int = 100,
    trace_matvecs: int = 99,
    density_runs: int = 3,
    density_steps: int = 50,
    seed: int = 0,
    all_reduce: AllReduce | None = None,
    return_eigenvectors: bool = False,
) -> HessianSpectrum:
    """Top-k eigenvalues, trace and spectral density of the loss Hessian at the model's weights.

    `loss_fn(model, batch)` returns the scalar loss of one batch; `batches` is materialised to a
    list and the loss is their weighted mean (see `HVPOperator`). The model is put in eval mode
    (dropout off, so H v is deterministic) with double-backward-safe attention, and restored after.
    Cost in matvecs (each ~2 backward passes per batch): the Lanczos iterations (<= max_iter),
    plus trace_matvecs, plus density_runs * density_steps. Set trace_matvecs or density_runs to 0
    to skip those. One seed drives all three estimators through independent streams.
    """
    start = time.perf_counter()
    seed_eigen, seed_trace, seed_density = (
        int(s) for s in np.random.SeedSequence(seed).generate_state(3)
    )
    was_training = model.training
    model.eval()
    try:
        with double_backward_safe(model):
            op = HVPOperator(
                model, loss_fn, batches, weights=weights, param_names=param_names,
                all_reduce=all_reduce,
            )
            loss, grad = op.loss_and_grad()
            eig = lanczos(
                op.matvec, op.dim, top_k, which=which, tol=tol, max_iter=max_iter,
                seed=seed_eigen, device=op.device, return_eigenvectors=return_eigenvectors,
            )
            trace = None
            if trace_matvecs > 0:
                trace = hutchpp_trace(op.matvec, op.dim, trace_matvecs, seed=seed_trace, device=op.device)
            density = None
            if density_runs > 0:
                density = slq_density(
                    op.matvec, op.dim, n_runs=density_runs, n_steps=density_steps,
                    seed=seed_density, device=op.device,
                )
    finally:
        model.train(was_training)
    return HessianSpectrum(
        n_params=op.dim,
        loss=loss,
        grad_norm=float(grad.norm()),
        eigenvalues=eig.eigenvalues,
        eigenvalue_residuals=eig.residuals,
        converged=eig.converged,
        trace=None if trace is None else trace.trace,
        trace_stderr=None if trace is None else trace.stderr,
        density_grid=None if density is None else density.grid,
        density=None if density is None else density.density,
        density_nodes=[] if density is None else density.nodes,
        density_weights=[] if density is None else density.weights,
        n_matvecs_eigen=eig.n_matvecs,
        n_matvecs_trace=0 if trace is None else trace.n_matvecs,
        n_matvecs_density=0 if density is None else density.n_matvecs,
        wall_s=time.perf_counter() - start,
        eigenvectors=eig.eigenvectors,
    )
