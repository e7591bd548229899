"""The loss landscape around a checkpoint: slices, sharpness and parameter-space maps.

In reading order:

    filter_normalized_direction  a random direction at the weights' scale (Li et al. 2018)
    direction_between            θ_end - θ_start over shared parameters (e.g. pretrained -> fine-tuned)
    surface_1d / surface_2d      loss(θ + α d1 + β d2) on a grid; the weights come back bit-for-bit
    surface_along                the 1-D slice from a checkpoint towards another one
    loss_at                      the loss at the weights, measured as the surfaces measure it
    eps_sharpness                Keskar et al. 2017: worst loss rise in a box scaled by |θ|+1
    relative_sharpness           worst loss rise when each tensor moves by at most ρ times its own norm
    adaptive_sharpness           Kwon et al. 2021 (ASAM) / Andriushchenko et al. 2023: worst-case rise in
                                 a ball scaled elementwise by |θ|+η, by one or several projected ascent steps
    parameter_pca                a trajectory or a set of fine-tuned endpoints on its first PCs
    endpoint_pca                 fine-tuned endpoints of every task and split seed, with the pretrained origin

Every loss is the weighted mean of `loss_fn(model, batch)` over a fixed list of batches
(default: plain mean), in eval mode so dropout does not blur the surface. Pure torch + numpy:
no ray, no rdkit, so it runs standalone next to engine/hessian.py.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]  # (model, batch) -> scalar loss
Direction = dict[str, torch.Tensor]  # parameter name -> offset with that parameter's shape


# ---------------------------------------------------------------------------------------------
# directions


def _named_trainable(model: torch.nn.Module, param_names: Iterable[str] | None) -> dict[str, torch.nn.Parameter]:
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if param_names is None:
        return named
    wanted = list(param_names)
    missing = [name for name in wanted if name not in named]
    if missing:
        raise KeyError(f"param_names {missing[:5]} are not trainable parameters of {type(model).__name__}")
    return {name: named[name] for name in wanted}


def _filters_in_columns(model: torch.nn.Module) -> set[str]:
    """Names of weights stored (in, out), whose filters are columns: GPT-2's `transformers.pytorch_utils.Conv1D`.

    Found without importing transformers: if its pytorch_utils was never imported, no Conv1D exists.
    """
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    if conv1d is None:
        return set()
    return {f"{prefix}.weight" if prefix else "weight" for prefix, m in model.named_modules() if isinstance(m, conv1d)}


def filter_normalized_direction(
    model: torch.nn.Module,
    *,
    seed: int = 0,
    include_1d: bool = False,
    param_names: Iterable[str] | None = None,
) -> Direction:
    """A Gaussian direction whose every filter has the norm of the matching filter of θ.

    Li et al. 2018 ("Visualizing the Loss Landscape of Neural Nets", §4) rescale per filter so
    that slices are comparable across networks whose weights differ in scale; without it, a
    net with bigger weights looks flatter. A filter is one output unit's weights: a row (dim 0)
    of a Linear, an output channel of a Conv, a token row of an Embedding, and a COLUMN of a
    GPT-2 `Conv1D`, which stores its weight as (in, out). Conv1D noise is drawn in (out, in)
    layout and transposed, so a GPT-2 block and the same block written with nn.Linear get the
    same direction (transposed) from the same seed. 1-D parameters (biases, norm gains) get a
    zero direction, as in their `ignore="biasbn"` setting; `include_1d=True` instead treats each
    as a single filter.
    Drawn on the CPU in float64 from `seed`, so the same seed gives the same direction anywhere.
    """
    generator = torch.Generator().manual_seed(seed)
    columns = _filters_in_columns(model)
    direction: Direction = {}
    for name, p in _named_trainable(model, param_names).items():
        w = p.detach().to(device="cpu", dtype=torch.float64)
        if name in columns:
            w = w.T  # (out, in): one filter per row, as for nn.Linear
        # drawn even when zeroed, so a tensor's direction does not depend on include_1d
        d = torch.randn(w.shape, generator=generator, dtype=torch.float64)
        if p.dim() <= 1 and not include_1d:
            d.zero_()
        else:
            n_filters = w.shape[0] if w.dim() > 1 else 1
            d_rows = d.view(n_filters, -1)  # (n_filters, filter size), a view: scaled in place
            w_rows = w.reshape(n_filters, -1)
            d_rows.mul_(w_rows.norm(dim=1, keepdim=True) / (d_rows.norm(dim=1, keepdim=True) + 1e-10))
        if name in columns:
            d = d.T.contiguous()  # back to the stored (in, out)
        direction[name] = d.to(device=p.device, dtype=p.dtype)
    return direction


def direction_between(
    start: Mapping[str, torch.Tensor],
    end: Mapping[str, torch.Tensor],
    *,
    param_names: Iterable[str] | None = None,
) -> Direction:
    """end - start over the floating-point entries both state_dicts share (or the named ones).

    Names present in only one side (a fine-tuning head, a pretraining LM head) are left out,
    which is what a pretrained -> fine-tuned path needs. A shared name with different shapes
    is an error: it means the two checkpoints are not the same architecture.
    """
    names = [n for n in start if n in end] if param_names is None else list(param_names)
    direction: Direction = {}
    for name in names:
        if name not in start or name not in end:
            side = "start" if name not in start else "end"
            raise KeyError(f"{name!r} is not in the {side} state_dict")
        a, b = start[name], end[name]
        if not (a.is_floating_point() and b.is_floating_point()):
            continue
        if a.shape != b.shape:
            raise ValueError(f"{name}: start has shape {tuple(a.shape)}, end has {tuple(b.shape)}")
        direction[name] = (b.detach().to(a.device, torch.float64) - a.detach().double()).to(a.dtype)
    if not direction:
        raise ValueError("start and end share no floating-point parameters")
    return direction


# ---------------------------------------------------------------------------------------------
# moving the weights and measuring the loss


@contextlib.contextmanager
def _displaced(model: torch.nn.Module, names: Iterable[str]) -> Iterator[Callable[[Mapping[str, torch.Tensor]], None]]:
    """Yield place(offset) that sets θ_n = θ0_n + offset_n; θ0 is restored bit-for-bit on exit.

    Each placement starts from the saved θ0, never from the last point, so a grid walk does not
    accumulate rounding; the sum is formed in at least float32 even for bf16 weights.
    """
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"direction names {missing[:5]} are not parameters of {type(model).__name__}")
    saved = {n: params[n].detach().clone() for n in names}

    def place(offset: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, theta0 in saved.items():
                if n in offset:
                    acc_dtype = torch.promote_types(theta0.dtype, torch.float32)
                    params[n].copy_(theta0.to(acc_dtype) + offset[n].to(theta0.device, acc_dtype))
                else:
                    params[n].copy_(theta0)

    try:
        yield place
    finally:
        with torch.no_grad():
            for n, theta0 in saved.items():
                params[n].copy_(theta0)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _normalised_weights(weights: Sequence[float] | None, n_batches: int) -> list[float]:
    if n_batches == 0:
        raise ValueError("batches is empty: the loss is a mean over at least one batch")
    raw = np.ones(n_batches) if weights is None else np.asarray(weights, dtype=np.float64)
    if raw.shape != (n_batches,) or np.any(raw < 0) or raw.sum() <= 0:
        raise ValueError(f"weights must be {n_batches} non-negative numbers with a positive sum, got {weights}")
    return (raw / raw.sum()).tolist()


def _mean_loss(model: torch.nn.Module, loss_fn: LossFn, batches: list, weights: list[float]) -> float:
    with torch.no_grad():
        return sum(w * float(loss_fn(model, b)) for b, w in zip(batches, weights, strict=True))


def loss_at(
    model: torch.nn.Module, loss_fn: LossFn, batches: Iterable[Any], *, weights: Sequence[float] | None = None
) -> float:
    """The loss at the weights as every surface and sharpness here measures it (weighted mean, eval mode)."""
    batches = list(batches)
    with _eval_mode(model):
        return _mean_loss(model, loss_fn, batches, _normalised_weights(weights, len(batches)))


def _mean_loss_and_grad(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batches: list,
    weights: list[float],
    params: Mapping[str, torch.nn.Parameter],
) -> tuple[float, dict[str, torch.Tensor]]:
    loss = 0.0
    grads = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    with torch.enable_grad():
        for b, w in zip(batches, weights, strict=True):
            value = loss_fn(model, b)
            parts = torch.autograd.grad(value, list(params.values()), materialize_grads=True)
            loss += w * float(value.detach())
            for g, part in zip(grads.values(), parts, strict=True):
                g.add_(part.double(), alpha=w)
    return loss, grads


def _symmetric_grid(span: float, resolution: int) -> np.ndarray:
    """`resolution` points on [-span, span], mirror-symmetric, with an exact 0 when odd."""
    if resolution < 2 or span <= 0:
        raise ValueError(f"need resolution >= 2 and span > 0, got resolution={resolution}, span={span}")
    # the non-negative half, mirrored: odd -> 0, 2, ..., n-1; even -> 1, 3, ..., n-1 (in units of span/(n-1))
    half = span * np.arange(1 - resolution % 2, resolution, 2) / (resolution - 1)
    return np.concatenate([-half[:0:-1] if resolution % 2 else -half[::-1], half])


# ---------------------------------------------------------------------------------------------
# slices of the surface


@dataclass
class LossSurface1D:
    alphas: np.ndarray  # (n,)
    losses: np.ndarray  # (n,) mean loss at θ + α d

    def records(self) -> list[dict[str, float]]:
        return [{"alpha": float(a), "loss": float(loss)} for a, loss in zip(self.alphas, self.losses, strict=True)]


@dataclass
class LossSurface2D:
    alphas: np.ndarray  # (n,) along d1
    betas: np.ndarray  # (m,) along d2
    losses: np.ndarray  # (n, m) mean loss at θ + α_i d1 + β_j d2

    def points(self) -> list[tuple[float, float, float]]:
        """(alpha, beta, loss) for every grid point, alpha-major."""
        return [
            (float(a), float(b), float(self.losses[i, j]))
            for i, a in enumerate(self.alphas)
            for j, b in enumerate(self.betas)
        ]

    def records(self) -> list[dict[str, float]]:
        return [{"alpha": a, "beta": b, "loss": loss} for a, b, loss in self.points()]


def surface_1d(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    direction: Direction | None = None,
    *,
    alphas: Sequence[float] | np.ndarray | None = None,
    span: float = 1.0,
    resolution: int = 21,
    seed: int = 0,
    weights: Sequence[float] | None = None,
) -> LossSurface1D:
    """loss(θ + α d) for α in `alphas` (default: `resolution` points on [-span, span]).

    `direction` defaults to `filter_normalized_direction(model, seed=seed)`, the same d1 that
    `surface_2d` draws from that seed, so this curve is the β = 0 row of that surface.
    Costs len(alphas) * len(batches) forward passes; the weights are restored exactly after.
    """
    if direction is None:
        direction = filter_normalized_direction(model, seed=seed)
    batches = list(batches)
    w = _normalised_weights(weights, len(batches))
    grid = _symmetric_grid(span, resolution) if alphas is None else np.asarray(alphas, dtype=np.float64)
    losses = np.empty(len(grid))
    with _eval_mode(model), _displaced(model, direction) as place:
        for i, a in enumerate(grid):
            place({n: a * d for n, d in direction.items()})
            losses[i] = _mean_loss(model, loss_fn, batches, w)
    return LossSurface1D(alphas=grid, losses=losses)


def surface_2d(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    d1: Direction | None = None,
    d2: Direction | None = None,
    *,
    span: float = 1.0,
    resolution: int = 21,
    seed: int = 0,
    weights: Sequence[float] | None = None,
) -> LossSurface2D:
    """loss(θ + α d1 + β d2) on a resolution x resolution grid over [-span, span]².

    Li et al. 2018 plot this with two filter-normalised directions, the defaults here (seeds
    `seed` and `seed + 1`); in high dimension two random directions are nearly orthogonal, so
    they skip orthogonalising. With odd `resolution` the centre is exactly θ.
    Costs resolution² * len(batches) forward passes.
    """
    if d1 is None:
        d1 = filter_normalized_direction(model, seed=seed)
    if d2 is None:
        d2 = filter_normalized_direction(model, seed=seed + 1)
    batches = list(batches)
    w = _normalised_weights(weights, len(batches))
    grid = _symmetric_grid(span, resolution)
    losses = np.empty((len(grid), len(grid)))
    names = set(d1) | set(d2)
    with _eval_mode(model), _displaced(model, names) as place:
        for i, a in enumerate(grid):
            for j, b in enumerate(grid):
                offset = {}
                for n in names:
                    parts = [c * d[n] for c, d in ((a, d1), (b, d2)) if n in d]
                    offset[n] = parts[0] if len(parts) == 1 else parts[0] + parts[1]
                place(offset)
                losses[i, j] = _mean_loss(model, loss_fn, batches, w)
    return LossSurface2D(alphas=grid, betas=grid.copy(), losses=losses)


def surface_along(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    target: Mapping[str, torch.Tensor],
    *,
    alphas: Sequence[float] | np.ndarray | None = None,
    resolution: int = 21,
    weights: Sequence[float] | None = None,
) -> LossSurface1D:
    """loss(θ + α (θ_target - θ)) along the line from the model (α=0) to `target` (α=1).

    For pretrained -> fine-tuned, pass the pretrained model and the fine-tuned state_dict: only
    the shared parameters move, so heads present on one side only stay as the model has them.
    The default α is `resolution` points on [-0.5, 1.5], which shows both basins' walls as well
    as the barrier between them, plus α = 0 and 1 exactly when the grid misses them (e.g. for 11).
    """
    if alphas is None:
        if resolution < 2:
            raise ValueError(f"resolution={resolution}: a path needs at least 2 points")
        alphas = np.union1d(np.linspace(-0.5, 1.5, resolution).round(12), [0.0, 1.0])  # sorted
    start = {n: p for n, p in model.named_parameters() if p.requires_grad}
    shared = [n for n in start if n in target]
    return surface_1d(
        model,
        loss_fn,
        batches,
        direction_between(start, target, param_names=shared),
        alphas=alphas,
        weights=weights,
    )


# ---------------------------------------------------------------------------------------------
# sharpness: the worst loss rise in a neighbourhood scaled to the weights


def _ascent(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batches: list,
    weights: list[float],
    params: Mapping[str, torch.nn.Parameter],
    scale: Mapping[str, torch.Tensor],
    radius: float,
    norm: Literal["box", "ball", "tensor_ball"],
    n_steps: int,
    step_size: float,
    start: Mapping[str, torch.Tensor] | None,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Projected gradient ascent on u, with the offset z = scale ⊙ u and u in the radius-ball
    of `norm` (box: ℓ∞, ball: ℓ2, tensor_ball: an ℓ2 ball of that radius for each tensor, the
    step normalised per tensor). Returns (loss at θ, the largest loss seen, θ included).
    Where the ℓ2 gradient vanishes (θ exactly stationary) the step takes a random direction
    from `generator` instead, since the first-order worst case is then undefined.

    Ascent in u rather than z is what makes the neighbourhood scale-aware: the gradient in u
    is scale ⊙ ∇L, and a unit step in u moves each weight in proportion to its scale.
    """
    u = {n: torch.zeros_like(s) for n, s in scale.items()} if start is None else dict(start)
    with _eval_mode(model), _displaced(model, params) as place:
        place({})
        loss0 = _mean_loss(model, loss_fn, batches, weights)
        worst = loss0
        for _ in range(n_steps):
            place({n: scale[n] * u[n] for n in u})
            loss, grad = _mean_loss_and_grad(model, loss_fn, batches, weights, params)
            worst = max(worst, loss)
            g_u = {n: scale[n] * grad[n] for n in u}  # gradient with respect to u
            if norm == "box":
                u = {n: (u[n] + step_size * radius * g_u[n].sign()).clamp(-radius, radius) for n in u}
            elif norm == "tensor_ball":
                for n in u:
                    g_norm = float(g_u[n].norm())
                    if g_norm > 0:
                        u[n] = u[n] + step_size * radius * g_u[n] / g_norm
                    u_norm = float(u[n].norm())
                    if u_norm > radius:
                        u[n] = u[n] * (radius / u_norm)
            else:
                g_norm = float(torch.sqrt(torch.as_tensor(sum((g**2).sum() for g in g_u.values()))))
                if g_norm == 0:
                    if generator is None:
                        break
                    g_u = {
                        n: torch.randn(g.shape, generator=generator, dtype=torch.float64).to(g.device)
                        for n, g in g_u.items()
                    }
                    g_norm = float(torch.sqrt(torch.as_tensor(sum((g**2).sum() for g in g_u.values()))))
                u = {n: u[n] + step_size * radius * g_u[n] / g_norm for n in u}
                u_norm = float(torch.sqrt(torch.as_tensor(sum((x**2).sum() for x in u.values()))))
                if u_norm > radius:
                    u = {n: x * (radius / u_norm) for n, x in u.items()}
        place({n: scale[n] * u[n] for n in u})
        worst = max(worst, _mean_loss(model, loss_fn, batches, weights))
    return loss0, worst


def eps_sharpness(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    eps: float = 1e-3,
    norm: Literal["box", "ball"] = "box",
    n_steps: int = 10,
    step_size: float | None = None,
    seed: int = 0,
    param_names: Iterable[str] | None = None,
    weights: Sequence[float] | None = None,
) -> float:
    """Keskar et al. 2017 ε-sharpness: (max_{z ∈ C_ε} L(θ+z) - L(θ)) / (1 + L(θ)), as a fraction.

    C_ε is their box |z_i| <= ε (|θ_i| + 1) (their eq. 3 with A = I; "ball" uses the ℓ2 ball
    ||z|| <= ε (||θ|| + 1) instead). They solve the inner max with L-BFGS-B; we use n_steps of
    projected sign-gradient ascent from a seeded uniform start in the box (step_size defaults to
    2.5/n_steps of the radius, as in PGD, Madry et al. 2018). It is a lower bound on the true
    max, and >= 0 since θ itself is a candidate. Multiply by 100 for Keskar's percentages.
    """
    if eps <= 0 or n_steps < 1:
        raise ValueError(f"need eps > 0 and n_steps >= 1, got eps={eps}, n_steps={n_steps}")
    if norm not in ("box", "ball"):
        raise ValueError(f"norm={norm!r}, expected 'box' or 'ball'")
    batches = list(batches)
    w = _normalised_weights(weights, len(batches))
    params = _named_trainable(model, param_names)
    scale = {n: p.detach().double().abs() + 1 for n, p in params.items()}
    radius = eps
    if norm == "ball":  # same scaling, aggregated: ||z|| <= ε (||θ|| + 1) with z = u (||θ||+1)
        theta_norm = float(torch.sqrt(torch.as_tensor(sum((p.detach().double() ** 2).sum() for p in params.values()))))
        scale = {n: torch.full_like(p, theta_norm + 1, dtype=torch.float64) for n, p in params.items()}
    generator = torch.Generator().manual_seed(seed)
    start = {}
    for n, p in params.items():
        r = torch.rand(p.shape, generator=generator, dtype=torch.float64).to(p.device)
        start[n] = (2 * r - 1) * radius
    if norm == "ball":
        start_norm = float(torch.sqrt(torch.as_tensor(sum((x**2).sum() for x in start.values()))))
        start = {n: x * (radius * 0.5 / start_norm) for n, x in start.items()}  # inside the ball
    loss0, worst = _ascent(
        model,
        loss_fn,
        batches,
        w,
        params,
        scale,
        radius,
        norm,
        n_steps,
        2.5 / n_steps if step_size is None else step_size,
        start,
    )
    return (worst - loss0) / (1 + loss0)


def relative_sharpness(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    rho: float = 0.05,
    n_steps: int = 10,
    step_size: float | None = None,
    seed: int = 0,
    param_names: Iterable[str] | None = None,
    weights: Sequence[float] | None = None,
) -> float:
    """max L(θ + z) - L(θ) over offsets with ||z_T||₂ <= ρ ||θ_T||₂ for every parameter tensor T.

    The radius of each tensor is relative to that tensor's own norm, so the neighbourhood does not
    grow with the parameter count the way an absolute (|θ|+1)-box or one global ℓ2 ball does: a
    bigger model is perturbed by the same fraction of every weight matrix, not by more in total.
    Solved by `n_steps` of projected ascent, each tensor stepping step_size·ρ along its own
    normalised gradient (default step_size 0.5, as `adaptive_sharpness`), from a seeded start at
    half the radius.
    A lower bound on the true max and >= 0 (θ itself is a candidate); the absolute loss rise.
    """
    if rho <= 0 or n_steps < 1:
        raise ValueError(f"need rho > 0 and n_steps >= 1, got rho={rho}, n_steps={n_steps}")
    batches = list(batches)
    w = _normalised_weights(weights, len(batches))
    params = _named_trainable(model, param_names)
    scale = {n: torch.full_like(p, float(p.detach().double().norm()), dtype=torch.float64) for n, p in params.items()}
    generator = torch.Generator().manual_seed(seed)
    start = {}
    for n, p in params.items():
        r = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.device)
        start[n] = r * (0.5 * rho / max(float(r.norm()), 1e-300))
    loss0, worst = _ascent(
        model,
        loss_fn,
        batches,
        w,
        params,
        scale,
        rho,
        "tensor_ball",
        n_steps,
        0.5 if step_size is None else step_size,
        start,
    )
    return worst - loss0


def adaptive_sharpness(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    rho: float = 0.5,
    eta: float = 0.01,
    n_steps: int = 1,
    step_size: float | None = None,
    norm: Literal["ball", "box"] = "ball",
    seed: int = 0,
    param_names: Iterable[str] | None = None,
    weights: Sequence[float] | None = None,
) -> float:
    """Adaptive sharpness: max over ||T⁻¹ z||_p <= ρ of L(θ+z) - L(θ), T = diag(|θ| + η).

    T makes the measure invariant to the rescalings that leave a ReLU net's function unchanged
    (Dinh et al. 2017 showed plain sharpness is not). n_steps=1 (the default) is ASAM's
    first-order worst case z* = ρ T² ∇L / ||T ∇L|| (Kwon et al. 2021; ρ=0.5 and η=0.01 are their
    CIFAR settings), evaluated. n_steps > 1 is the adaptive worst-case sharpness of Andriushchenko
    et al. 2023 ("A modern look at the relationship between sharpness and generalization"): a few
    projected gradient-ascent steps in the same elementwise-|θ|-scaled ball (eta=0 is exactly
    their scaling; norm "box" their ℓ∞ variant), each of step_size·ρ in u = T⁻¹z (default 1 for
    one step, 0.5 for more: on a curved loss 20 steps of 0.5ρ came within 1e-6 of the exact
    maximum in tests/test_landscape.py, 20 of 0.1ρ only within 1.5%; they use Auto-PGD's
    adaptive steps instead), the largest loss met along the way kept. `seed` only matters
    at an exactly stationary θ (∇L = 0), where a step takes a seeded random direction instead.
    Returns the absolute loss rise, >= 0 since θ itself is a candidate.
    """
    if rho <= 0 or eta < 0 or n_steps < 1:
        raise ValueError(f"need rho > 0, eta >= 0, n_steps >= 1, got rho={rho}, eta={eta}, n_steps={n_steps}")
    if norm not in ("ball", "box"):
        raise ValueError(f"norm={norm!r}, expected 'ball' or 'box'")
    batches = list(batches)
    w = _normalised_weights(weights, len(batches))
    params = _named_trainable(model, param_names)
    scale = {n: p.detach().double().abs() + eta for n, p in params.items()}
    if step_size is None:
        step_size = 1.0 if n_steps == 1 else 0.5
    loss0, worst = _ascent(
        model,
        loss_fn,
        batches,
        w,
        params,
        scale,
        rho,
        norm,
        n_steps,
        step_size,
        start=None,
        generator=torch.Generator().manual_seed(seed),
    )
    return worst - loss0


# ---------------------------------------------------------------------------------------------
# parameter-space maps


@dataclass
class ParameterPCA:
    records: list[dict[str, Any]]  # one per point: {"label", "pc1", "pc2", ...}, DataFrame-ready
    explained_variance_ratio: np.ndarray  # (n_components,) share of the total variance
    n_params: int  # length of each flattened point
    param_names: list[str]  # the state_dict entries used; [] for flat vectors


def _as_float_arrays(point: Any) -> dict[str, torch.Tensor]:
    if isinstance(point, Mapping):
        return {n: t for n, t in point.items() if isinstance(t, torch.Tensor) and t.is_floating_point()}
    return {"": torch.as_tensor(np.asarray(point) if not isinstance(point, torch.Tensor) else point).reshape(-1)}


def parameter_pca(
    points: Sequence[Mapping[str, torch.Tensor] | torch.Tensor | np.ndarray],
    labels: Sequence[Any] | None = None,
    *,
    n_components: int = 2,
    param_names: Iterable[str] | None = None,
) -> ParameterPCA:
    """PCA of parameter vectors: a run's checkpoint trajectory, or fine-tuned endpoints across tasks.

    `points` are state_dicts (the floating-point entries shared by all, with equal shapes, or
    `param_names`) or flat vectors. We never build the n x P matrix: the n x n Gram matrix of the
    centred points is accumulated one entry at a time in float64, and its eigenvectors scaled by
    sqrt(eigenvalue) are exactly the PC scores of an SVD. Each component's sign is fixed so its
    largest-magnitude score is positive (as sklearn's svd_flip), so plots do not flip between runs.
    """
    n = len(points)
    labels = list(range(n)) if labels is None else list(labels)
    if len(labels) != n:
        raise ValueError(f"got {len(labels)} labels for {n} points")
    if n < 2 or not 1 <= n_components <= n:
        raise ValueError(f"need >= 2 points and 1 <= n_components <= {n}, got {n} points, n_components={n_components}")
    tensors = [_as_float_arrays(p) for p in points]
    if param_names is None:
        names = [k for k in tensors[0] if all(k in t and t[k].shape == tensors[0][k].shape for t in tensors)]
    else:
        names = list(param_names)
        for i, t in enumerate(tensors):
            missing = [k for k in names if k not in t]
            if missing:
                raise KeyError(f"point {i} ({labels[i]!r}) lacks {missing[:5]}")
    if not names:
        raise ValueError("the points share no floating-point entries of equal shape")

    gram = np.zeros((n, n))
    n_params = 0
    for k in names:
        X = torch.stack([t[k].detach().reshape(-1).to("cpu", torch.float64) for t in tensors]).numpy()
        X = X - X.mean(axis=0, keepdims=True)  # (n, numel_k), centred
        gram += X @ X.T
        n_params += X.shape[1]
    eigenvalues, U = np.linalg.eigh(gram)
    eigenvalues, U = np.clip(eigenvalues[::-1], 0, None), U[:, ::-1]
    total = eigenvalues.sum()
    if total <= 0:
        raise ValueError(f"all {n} points are identical over {n_params} parameters: no variance to explain")
    scores = U[:, :n_components] * np.sqrt(eigenvalues[:n_components])  # (n, n_components)
    signs = np.sign(scores[np.abs(scores).argmax(axis=0), range(n_components)])
    scores = scores * np.where(signs == 0, 1, signs)
    records = [
        {"label": label, **{f"pc{c + 1}": float(scores[i, c]) for c in range(n_components)}}
        for i, label in enumerate(labels)
    ]
    return ParameterPCA(
        records=records,
        explained_variance_ratio=eigenvalues[:n_components] / total,
        n_params=n_params,
        param_names=[] if names == [""] else names,
    )


def endpoint_pca(
    origin: Mapping[str, torch.Tensor],
    endpoints: Sequence[Mapping[str, torch.Tensor]],
    labels: Sequence[Mapping[str, Any]],
    *,
    n_components: int = 2,
    param_names: Iterable[str] | None = None,
) -> ParameterPCA:
    """PCA of fine-tuned endpoints (every task x split seed) together with the pretrained weights they start from.

    With the origin in the same map and several seeds per task, a task's direction (where its
    seeds go, together, away from the origin) can be told from seed scatter (how far they land
    from each other). `labels` are one mapping per endpoint (e.g. {"task": "bbbp", "split_seed": 0}),
    copied into its record; the origin's record comes first with origin=True. Each record also
    has `distance_from_origin`, ||θ_i - θ_0||₂ over the parameters used (the origin's is 0).
    Entries only some points have (task heads, an LM head) are left out, as in `parameter_pca`.
    """
    if len(labels) != len(endpoints) or not endpoints:
        raise ValueError(f"need one label per endpoint and at least one endpoint (got {len(labels)} labels for "
                         f"{len(endpoints)} endpoints)")  # fmt: skip
    pca = parameter_pca([origin, *endpoints], labels=list(range(len(endpoints) + 1)), n_components=n_components,
                        param_names=param_names)  # fmt: skip
    names = pca.param_names or [""]
    start = _as_float_arrays(origin)
    records = []
    for i, record in enumerate(pca.records):
        point = start if i == 0 else _as_float_arrays(endpoints[i - 1])
        distance = (
            0.0
            if i == 0
            else float(
                np.sqrt(
                    sum(
                        float(((point[k].detach().double().cpu() - start[k].detach().double().cpu()) ** 2).sum())
                        for k in names
                    )
                )
            )
        )
        extra = {"origin": True} if i == 0 else {"origin": False, **labels[i - 1]}
        records.append({**extra, **{k: v for k, v in record.items() if k != "label"},
                        "distance_from_origin": distance})  # fmt: skip
    return ParameterPCA(records=records, explained_variance_ratio=pca.explained_variance_ratio,
                        n_params=pca.n_params, param_names=pca.param_names)  # fmt: skip
