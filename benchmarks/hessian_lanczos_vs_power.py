"""Top-k Hessian eigenvalues: Lanczos (engine.hessian.lanczos) vs PyHessian's power iteration.

Same model, same batches, same HVPOperator. Power iteration finds eigenvalues one at a time by
deflation and stops on PyHessian's rule (relative change of the Rayleigh quotient < 1e-3), so
its target is the top-k by magnitude; Lanczos is run with which="LM" (tol 1e-4 on the residuals)
to find the same ones. Printed: HVPs and wall time of each, the HVP ratio (target: Lanczos <=
1/3 of power iteration's), the largest relative difference between the two sets of
eigenvalues, and each one's error against a tol=1e-10 Lanczos reference (not timed). The model
is a small RoBERTa MLM trained for 200 steps on synthetic "SMILES" (a seeded Markov chain over a
40-token vocabulary), so the point is not a random init.

    python benchmarks/hessian_lanczos_vs_power.py                       # CPU, 16k parameters, ~1 min
    python benchmarks/hessian_lanczos_vs_power.py --size medium --threads 2
    python benchmarks/hessian_lanczos_vs_power.py --size large --device cuda --dtype float32
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from transformers import RobertaConfig, RobertaForMaskedLM

from clmscale.engine.hessian import HVPOperator, double_backward_safe, lanczos, power_iteration

# hidden, layers, heads, batch size, sequence length
SIZES = {
    "small": dict(hidden=32, layers=1, heads=2, batch_size=8, seq_len=24),
    "medium": dict(hidden=64, layers=2, heads=4, batch_size=16, seq_len=48),
    "large": dict(hidden=256, layers=4, heads=4, batch_size=32, seq_len=96),
}
VOCAB_SIZE = 40  # about the size of a SMILES character vocabulary
PAD, MASK = 1, 3  # RoBERTa's pad id; token 3 plays <mask>


def synthetic_batches(n_batches: int, batch_size: int, seq_len: int, seed: int, language_seed: int) -> list[dict]:
    """MLM batches sampled (from `seed`) from one Markov chain (`language_seed`): half a Zipf
    unigram, half a peaked random bigram row, so the loss falls fast; train and eval share it."""
    tokens = np.arange(4, VOCAB_SIZE)
    zipf = 1.0 / np.arange(1, len(tokens) + 1) ** 1.2
    bigram = np.random.default_rng(language_seed).dirichlet(np.full(len(tokens), 0.1), size=len(tokens))
    transition = 0.5 * zipf / zipf.sum() + 0.5 * bigram  # (V', V'), rows sum to 1
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n_batches):
        ids = np.empty((batch_size, seq_len), dtype=np.int64)
        state = rng.integers(len(tokens), size=batch_size)
        for t in range(seq_len):
            ids[:, t] = tokens[state]
            state = np.array([rng.choice(len(tokens), p=transition[s]) for s in state])
        masked = rng.random(ids.shape) < 0.15
        masked[:, 0] = True  # at least one label per row
        labels = np.where(masked, ids, -100)
        batches.append({"input_ids": torch.from_numpy(np.where(masked, MASK, ids)), "labels": torch.from_numpy(labels)})
    return batches


def mlm_loss(model, batch):
    device = next(model.parameters()).device
    return model(input_ids=batch["input_ids"].to(device), labels=batch["labels"].to(device)).loss


def build(size: str, dtype: torch.dtype, device: str, train_steps: int, seed: int):
    s = SIZES[size]
    config = RobertaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=s["hidden"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], intermediate_size=4 * s["hidden"],
        max_position_embeddings=s["seq_len"] + 2, type_vocab_size=1, pad_token_id=PAD,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RobertaForMaskedLM(config).to(device)
    train = synthetic_batches(train_steps, s["batch_size"], s["seq_len"], seed=seed + 1, language_seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for batch in train:  # a few steps away from init, in float32
        optimizer.zero_grad()
        mlm_loss(model, batch).backward()
        optimizer.step()
    held_out = synthetic_batches(2, s["batch_size"], s["seq_len"], seed=seed + 2, language_seed=seed)
    return model.to(dtype).eval(), held_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--power-max-iter", type=int, default=100, help="per eigenvalue, PyHessian's default")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, batches = build(args.size, getattr(torch, args.dtype), args.device, args.train_steps, args.seed)
    with double_backward_safe(model):
        op = HVPOperator(model, mlm_loss, batches)
        loss, grad = op.loss_and_grad()
        print(f"size={args.size} n_params={op.dim:,} dtype={args.dtype} device={args.device} "
              f"batches={len(batches)}x{batches[0]['input_ids'].shape[0]} loss={loss:.4f} |grad|={grad.norm():.3e}")
        op.matvec(torch.ones(op.dim, dtype=torch.float64))  # warm-up, not counted below

        def timed(run):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = run()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            return result, time.perf_counter() - start

        lz, lz_s = timed(lambda: lanczos(op.matvec, op.dim, args.k, which="LM", tol=1e-4, max_iter=300,
                                         seed=args.seed, device=args.device))
        pw, pw_s = timed(lambda: power_iteration(op.matvec, op.dim, args.k, tol=1e-3,
                                                 max_iter=args.power_max_iter, seed=args.seed, device=args.device))
        # the yardstick for both: Lanczos run to tol=1e-10 from another start vector
        ref = lanczos(op.matvec, op.dim, args.k, which="LM", tol=1e-10, max_iter=400,
                      seed=args.seed + 1, device=args.device)

    by_magnitude = lambda x: x[np.argsort(-np.abs(x))]  # power iteration reports in the order found
    lz_eig, pw_eig = by_magnitude(lz.eigenvalues), by_magnitude(pw.eigenvalues)
    rel = np.abs(pw_eig - lz_eig) / np.abs(lz_eig)
    ref_eig = by_magnitude(ref.eigenvalues)
    err = lambda x: np.max(np.abs(x - ref_eig) / np.abs(ref_eig))
    print(f"{'':10s} {'HVPs':>6s} {'wall_s':>8s}  eigenvalues (by |λ|)")
    print(f"{'lanczos':10s} {lz.n_matvecs:6d} {lz_s:8.2f}  {np.array2string(lz_eig, precision=5)}"
          f"  converged={lz.converged} max residual/|λ|={np.max(lz.residuals / np.abs(lz.eigenvalues)):.1e}")
    print(f"{'power':10s} {pw.n_matvecs:6d} {pw_s:8.2f}  {np.array2string(pw_eig, precision=5)}"
          f"  converged={pw.converged} per eigenvalue={pw.n_iter}")
    print(f"HVP ratio lanczos/power = {lz.n_matvecs / pw.n_matvecs:.3f} (target <= 0.333); "
          f"wall ratio = {lz_s / pw_s:.3f}; max rel diff of eigenvalues = {rel.max():.2e}")
    print(f"max rel error vs a tol=1e-10 Lanczos reference ({ref.n_matvecs} HVPs, converged={ref.converged}): "
          f"lanczos {err(lz_eig):.1e}, power {err(pw_eig):.1e}")


if __name__ == "__main__":
    main()
