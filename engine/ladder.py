"""The named rungs of the model ladder as plain data, importable with the standard library alone.

A GPU box whose image has torch and transformers but not pydantic (benchmarks/gpu_readiness.py) still
needs the rung shapes and the FLOP formulas of engine/models.py, so the table lives here and
engine/config.py turns each rung into its validated pydantic `ModelSize`. engine/models.py reads
only `n_layer`, `d_model`, `n_head` and `ffn_dim` (and `name` for its table), so either kind works there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

# mlm: RoBERTa encoder; clm: GPT-2 decoder; llama: Llama decoder (RoPE, SwiGLU, RMSNorm, no bias);
# modernbert: ModernBERT encoder (RoPE, GeGLU, bias-free LayerNorms)
Family = Literal["mlm", "clm", "llama", "modernbert"]
Objective = Literal["mlm", "clm"]  # masked-token prediction (encoders) or next-token prediction (decoders)
FAMILIES: tuple[Family, ...] = ("mlm", "clm", "llama", "modernbert")
OBJECTIVES: dict[str, Objective] = {"mlm": "mlm", "clm": "clm", "llama": "clm", "modernbert": "mlm"}


def objective(family: str) -> Objective:
    """What a family is trained on: everything that branches on mlm / clm (data collation, the loss, special
    tokens, pooling) asks this, so llama goes where clm goes and modernbert where mlm goes."""
    if family not in OBJECTIVES:
        raise ValueError(f"family must be one of {', '.join(map(repr, FAMILIES))} (got {family!r})")
    return OBJECTIVES[family]


class RungShape(Protocol):
    """What engine/models.py reads of a size: a `Rung` here, or engine.config's pydantic `ModelSize`."""

    @property
    def name(self) -> str: ...
    @property
    def n_layer(self) -> int: ...
    @property
    def d_model(self) -> int: ...
    @property
    def n_head(self) -> int: ...
    @property
    def ffn_dim(self) -> int: ...


@dataclass(frozen=True)
class Rung:
    name: str
    n_layer: int
    d_model: int
    n_head: int
    d_ff: int | None = None  # None: 4 * d_model, as in BERT and GPT-2

    def __post_init__(self) -> None:
        if min(self.n_layer, self.d_model, self.n_head) <= 0 or (self.d_ff is not None and self.d_ff <= 0):
            raise ValueError(f"rung {self.name!r}: dimensions must be positive (got {self})")
        if self.d_model % self.n_head:
            raise ValueError(
                f"rung {self.name!r}: d_model must be divisible by n_head "
                f"(got d_model: {self.d_model} and n_head: {self.n_head})"
            )

    @property
    def ffn_dim(self) -> int:
        return self.d_ff or 4 * self.d_model


# Named rungs, smallest first. Widths grow ~1.5-2x per rung and depth slowly, roughly the
# aspect ratios of the Pythia / OLMo ladders; head width stays 16-128. Parameter counts depend on
# the vocabulary and family: `clmscale validate` prints them, `engine.models.count_params` computes them.
LADDER: dict[str, Rung] = {
    r.name: r
    for r in [
        Rung("xxs", 1, 16, 2),  # ~5e3 non-embedding: CPU tests
        Rung("xs", 2, 32, 2),  # ~2.5e4
        Rung("s", 2, 64, 4),  # ~1e5
        Rung("m", 4, 128, 4),  # ~8e5
        Rung("l", 6, 256, 8),  # ~5e6
        Rung("xl", 8, 384, 6),  # ~1.4e7
        Rung("2xl", 12, 512, 8),  # ~3.8e7
        Rung("3xl", 12, 768, 12),  # ~8.5e7: BERT-base shape
        Rung("4xl", 16, 1024, 16),  # ~2e8
        Rung("5xl", 24, 1536, 16),  # ~6.8e8
        Rung("6xl", 24, 2048, 16),  # ~1.2e9
    ]
}
