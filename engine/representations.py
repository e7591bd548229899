"""Molecular strings other than SMILES: SELFIES, DeepSMILES and SAFE, written from the canonical SMILES.

`data.representation` makes the string a model reads an axis of the grid (MLM-Scaling, arXiv 2601.22757, finds
it changes scaling behaviour). prepare writes every molecule it keeps in each representation the grid names, with
the package made for it (`selfies`, `deepsmiles`, `safe-mol`), and checks the round trip: the text decoded again
must give back the very canonical SMILES it came from, or the molecule is rejected for every representation (so
all arms train on the same molecules, split the same way) with the reason in rejects.csv. Downstream task
molecules are written the same way before each checkpoint tokenises them (engine.analyze).

  smiles      the RDKit canonical SMILES itself;
  selfies     SELFIES (Krenn et al. 2020), every string decodes to a molecule; tokens are its bracket symbols;
  deepsmiles  DeepSMILES (O'Boyle & Dalke 2018), rings as one closing digit, branches as runs of ')';
  safe        SAFE (Noutahi et al. 2024), the molecule as BRICS fragments joined by ring-closure digits; a
              molecule with no BRICS bond is one fragment (its SMILES).

The tokenizers split SMILES, DeepSMILES and SAFE with the SMILES regex (they share its alphabet) and SELFIES by
its symbols (`token_regex`). The packages are imported on first use (safe-mol imports datamol, which is slow).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Literal, get_args

Representation = Literal["smiles", "selfies", "deepsmiles", "safe"]
REPRESENTATIONS: tuple[Representation, ...] = get_args(Representation)
SELFIES_REGEX = r"(\[[^\]]*\]|\.)"  # one symbol per bracket, and the dot between fragments


class Unconvertible(ValueError):
    """A molecule that a representation cannot write, or whose text does not decode to the same molecule."""


def token_regex(representation: Representation) -> str:
    """The pre-tokenizer's regex of a representation (engine.tokenizer)."""
    from clmscale.engine.tokenizer import SMILES_REGEX

    return SELFIES_REGEX if representation == "selfies" else SMILES_REGEX


def ordered(representations: Sequence[str]) -> list[Representation]:
    """The representations in their fixed order (smiles, selfies, deepsmiles, safe), each once."""
    return [r for r in REPRESENTATIONS if r in representations]


def convert(smiles: Sequence[str], representation: Representation, isomeric: bool = True) -> list[str | None]:
    """Each canonical SMILES written in `representation`, or None where it cannot be (see `why_not`)."""
    return [text for text, _ in convert_with_reasons(smiles, representation, isomeric)]


def convert_with_reasons(
    smiles: Sequence[str], representation: Representation, isomeric: bool = True
) -> list[tuple[str | None, str | None]]:
    """(text, None) per canonical SMILES, or (None, why) when the representation cannot write it or its text
    decodes to another molecule; `isomeric` is the canonicalisation the SMILES went through (data.isomeric)."""
    if representation == "smiles":
        return [(s, None) for s in smiles]
    from clmscale.engine.prepare import canonicalize_chunk

    encode, decode = codec(representation)
    out: list[tuple[str | None, str | None]] = []
    for s in smiles:
        try:
            text = encode(s)
            back = decode(text) if text else None
        except Exception as err:  # each package raises its own errors (EncoderError, SAFEFragmentationError, ...)
            out.append((None, f"{representation}: {type(err).__name__}: {_first_line(err)}"))
            continue
        again = canonicalize_chunk([back], isomeric)[0].smiles if back else None
        if not text or again != s:
            out.append((None, f"{representation}: {text!r} decodes to {back!r}, not the molecule"))
        else:
            out.append((text, None))
    return out


def _first_line(err: BaseException) -> str:
    return " ".join(str(err).split("\n")[0].split())[:200]


@functools.cache
def codec(representation: Representation) -> tuple[Callable[[str], str], Callable[[str], str | None]]:
    """(encode, decode) of a representation, with the package's log lines silenced."""
    if representation == "selfies":
        import selfies

        return selfies.encoder, selfies.decoder
    if representation == "deepsmiles":
        import deepsmiles

        converter = deepsmiles.Converter(rings=True, branches=True)
        return converter.encode, converter.decode
    if representation == "safe":
        try:
            import safe
            from loguru import logger
        except ImportError:
            raise ImportError(
                "data.representation safe needs the safe-mol package: pip install 'clmscale[safe]'"
            ) from None

        logger.disable("safe")  # it logs a warning per molecule it cannot slice
        logging.getLogger("datamol").setLevel(logging.ERROR)
        return (
            functools.partial(safe.encode, canonical=True, allow_empty=True),
            functools.partial(safe.decode, canonical=True),
        )
    raise ValueError(f"unknown representation {representation!r}; one of {', '.join(REPRESENTATIONS)}")


def randomized_smiles(smiles: Sequence[str], k: int, seed: int, epoch: int) -> list[list[str]]:
    """k random SMILES of each molecule (RDKit `MolToRandomSmilesVect`, the atom order drawn at random, as
    `MolToSmiles(doRandom=True)`): data.randomized_smiles. The draw is seeded by (seed, epoch, the SMILES), so a
    pass gives the same strings whichever process or batch holds the molecule, and the next pass new ones."""
    import hashlib

    from rdkit import Chem

    out = []
    for s in smiles:
        key = hashlib.blake2b(f"{seed}:{epoch}:{s}".encode(), digest_size=4).digest()
        mol = Chem.MolFromSmiles(s)
        out.append(list(Chem.MolToRandomSmilesVect(mol, k, randomSeed=int.from_bytes(key, "little") & 0x7FFFFFFF)))
    return out
