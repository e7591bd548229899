"""Peak memory of `engine.hessian.spectrum` against max_iter: the fixed-basis implementation vs the
float64 full-basis baseline, each (implementation, max_iter) in a fresh process.

The model is a ~1M-parameter RoBERTa MLM (float32, untrained: memory does not depend on the point)
on one synthetic batch; spectrum runs top-5 Lanczos with tol=0 (so it runs to max_iter, or until
the top-5 residuals are exactly zero, i.e. converged to rounding; either way past the basis size,
so the basis fills and restarts), Hutch++ with 30 matvecs and one 30-step SLQ run.
The baseline is the same call with n_basis=max_iter and vector_dtype=float64: Lanczos without
restarts, every vector kept in float64 (the implementation before the fixed basis; its Hutch++
sketch is then uncapped too).

Measurement: peak resident set size (resource.getrusage ru_maxrss) of the child process. It sees
torch's CPU tensors (tracemalloc does not: torch allocates through c10's allocator with malloc,
outside Python's allocator; a 200 MB tensor shows as 80 bytes in tracemalloc). glibc is told to
mmap every allocation >= 64 KiB (MALLOC_MMAP_THRESHOLD_), so a freed tensor leaves the RSS and the
peak is that of live memory. "extra" is the peak during spectrum minus the peak after building the
model and running one warm-up HVP (of a vector of the run's dtype): the memory the estimators add
beyond the model, its batch and one HVP. It is printed per parameter, beside engine.hessian
.memory_estimate's figure for the same thing (krylov_bytes less the warm-up's input vector).

    python benchmarks/hessian_memory.py                    # max_iter 30 and 120, ~4-8 min on 2 busy cores
    python benchmarks/hessian_memory.py --max-iter 30 240
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

IMPLEMENTATIONS = ("fixed_basis", "float64_full_basis")
GROWTH_TARGET = 0.10  # the fixed-basis peak may grow at most 10 % from the smallest to the largest max_iter


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child(implementation: str, max_iter: int, seed: int) -> dict:
    """One measurement, in this (fresh) process."""
    import torch
    from hessian_lanczos_vs_power import VOCAB_SIZE, mlm_loss, synthetic_batches
    from transformers import RobertaConfig, RobertaForMaskedLM

    from clmscale.engine.hessian import (
        HVPOperator,
        double_backward_safe,
        memory_estimate,
        spectrum,
    )

    torch.set_num_threads(1)
    seq_len = 32
    config = RobertaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=128, num_hidden_layers=5, num_attention_heads=4,
        intermediate_size=512, max_position_embeddings=seq_len + 2, type_vocab_size=1, pad_token_id=1,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RobertaForMaskedLM(config).eval()
    batches = synthetic_batches(1, 8, seq_len, seed=seed + 1, language_seed=seed)
    baseline = implementation == "float64_full_basis"
    vector_dtype = torch.float64 if baseline else torch.float32
    with double_backward_safe(model):  # the warm-up: the model, its batch and one HVP are the reference
        op = HVPOperator(model, mlm_loss, batches)
        n_params = op.dim
        op.matvec(torch.ones(n_params, dtype=vector_dtype))
        del op
    reference = _peak_rss_bytes()
    settings = {"top_k": 5, "tol": 0.0, "max_iter": max_iter, "trace_matvecs": 30, "density_runs": 1, "density_steps": 30,
                    "seed": seed}
    start = time.perf_counter()
    result = spectrum(model, mlm_loss, batches, **settings,
                      **({"n_basis": max_iter, "vector_dtype": torch.float64} if baseline else {}))
    wall_s = time.perf_counter() - start
    peak = _peak_rss_bytes()
    if baseline:  # the stored basis, as the old implementation allocated it
        estimate = max_iter * n_params * 8
    else:
        est = memory_estimate(n_params, torch.float32, max_iter, 5, 30, density_runs=1)
        estimate = est["krylov_bytes"] - n_params * 4  # the warm-up's input vector is in the reference
    return {
        "implementation": implementation, "max_iter": max_iter, "n_params": n_params,
        "reference_rss": reference, "peak_rss": peak, "extra": peak - reference, "estimate": estimate,
        "n_basis": result.n_basis, "n_matvecs": result.n_matvecs, "wall_s": wall_s,
        "lambda_max": float(result.eigenvalues[0]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-iter", type=int, nargs="+", default=[30, 120])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", nargs=2, metavar=("IMPLEMENTATION", "MAX_ITER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.seed)))
        return

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    rows = []
    for implementation in IMPLEMENTATIONS:
        for max_iter in args.max_iter:
            out = subprocess.run(
                [sys.executable, __file__, "--child", implementation, str(max_iter), "--seed", str(args.seed)],
                env=env, capture_output=True, text=True, check=True,
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{implementation:19s} max_iter={max_iter:4d} n_params={r['n_params']:,} n_basis={r['n_basis']:4d} "
                  f"matvecs={r['n_matvecs']:4d} wall={r['wall_s']:6.1f}s peak RSS={r['peak_rss'] / 2**20:7.1f} MiB "
                  f"(reference {r['reference_rss'] / 2**20:6.1f}) extra={r['extra'] / 2**20:7.1f} MiB "
                  f"= {r['extra'] / r['n_params']:6.1f} B/param (estimate {r['estimate'] / r['n_params']:6.1f})",
                  flush=True)

    def by(implementation: str) -> list[dict]:
        return [r for r in rows if r["implementation"] == implementation]

    new, old = by("fixed_basis"), by("float64_full_basis")
    grow_extra = new[-1]["extra"] / new[0]["extra"] - 1
    grow_peak = new[-1]["peak_rss"] / new[0]["peak_rss"] - 1
    lo, hi = args.max_iter[0], args.max_iter[-1]
    print(f"fixed basis, max_iter {lo} -> {hi}: extra {new[0]['extra'] / 2**20:.1f} -> {new[-1]['extra'] / 2**20:.1f} MiB "
          f"({grow_extra:+.1%}), whole-process peak {grow_peak:+.1%} (target <= {GROWTH_TARGET:.0%}: "
          f"{'met' if max(grow_extra, grow_peak) <= GROWTH_TARGET else 'NOT met'})")
    print(f"hessian memory per parameter at max_iter {hi}: fixed basis {new[-1]['extra'] / new[-1]['n_params']:.1f} B, "
          f"float64 full basis {old[-1]['extra'] / old[-1]['n_params']:.1f} B "
          f"({old[-1]['extra'] / new[-1]['extra']:.1f}x); at {lo}: {new[0]['extra'] / new[0]['n_params']:.1f} B vs "
          f"{old[0]['extra'] / old[0]['n_params']:.1f} B")


if __name__ == "__main__":
    main()
