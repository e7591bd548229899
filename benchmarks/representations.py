"""Every shipped MOSES molecule in each representation: refusals, round trips, tokens per molecule, cost.

    python benchmarks/representations.py               # the 100,000 molecules of data/moses_100k.csv.gz
    python benchmarks/representations.py --n 5000      # the first n

The SMILES are canonicalised as prepare does (`engine.prepare.canonical_smiles`), then written in SELFIES, DeepSMILES
and SAFE by `engine.representations.convert_with_reasons`, which decodes each text again with its own package and
compares the result's canonical SMILES to the input. Printed per representation: molecules refused (and why, by
reason), tokens per molecule (regex tokens, as the tokenizers count them; SMILES the baseline), distinct token
types, and the conversion's cost per molecule (ms, one process; the round trip included). tests/test_representations.py
runs the same check on 300 of them.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import itertools
import time
from collections import Counter
from pathlib import Path

from clmscale.engine.prepare import canonical_smiles
from clmscale.engine.representations import REPRESENTATIONS, convert_with_reasons
from clmscale.engine.tokenizer import tokens_of

MOSES = Path(__file__).resolve().parents[1] / "data" / "moses_100k.csv.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=None, help="the first n molecules (default: all)")
    args = parser.parse_args()
    with gzip.open(MOSES, "rt") as f:
        raw = [row[0] for row in itertools.islice(csv.reader(f), 1, None if args.n is None else args.n + 1)]
    smiles = canonical_smiles(raw)
    print(f"{len(smiles):,} canonical MOSES SMILES from {MOSES.name}")
    base = None
    for r in REPRESENTATIONS:
        t0 = time.perf_counter()
        out = convert_with_reasons(smiles, r)
        seconds = time.perf_counter() - t0
        texts = [t for t, _ in out if t is not None]
        reasons = Counter(why.split(":", 2)[1].strip() if why.count(":") > 1 else why for _, why in out if why)
        split = tokens_of(r)
        tokens = [split(t) for t in texts]
        per_molecule = sum(map(len, tokens)) / len(texts)
        base = base or per_molecule
        types = len(set(itertools.chain.from_iterable(tokens)))
        print(f"{r:>10}: {len(smiles) - len(texts):,} refused {dict(reasons)}; {per_molecule:.2f} tokens/molecule "
              f"({per_molecule / base:.2f}x SMILES), {types} token types; {1e3 * seconds / len(smiles):.3f} ms/molecule")


if __name__ == "__main__":
    main()
