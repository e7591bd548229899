"""The SMILES tokenizer: one token per atom, bond, branch or ring closure.

Atoms and symbols are split with the regex of Schwaller et al. 2019 (Molecular Transformer,
ACS Cent. Sci. 5, 1572; `smi_tokenizer` in pschwllr/MolecularTransformer). Text the regex does not
match is not dropped: each unmatched run becomes a token of its own (then [UNK] when it is not in
the vocabulary), so decode(encode(s)) == s for any string made of known tokens, and anything
unknown shows up in `count_unk` instead of vanishing.

The vocabulary is the special tokens, then every token of the training SMILES, most frequent
first with ties broken alphabetically, so ids are deterministic; then (`extend_vocab`) the token
types that only the downstream tasks' canonical SMILES have, in the same order, so a MOSES corpus
without stereo still gives `[C@@H]` an id of its own instead of [UNK]. The corpus's ids do not
depend on the tasks. The result is a `PreTrainedTokenizerFast` directory that
`transformers.AutoTokenizer.from_pretrained` loads. The other representations' tokenizers
(engine.representations) are built the same way with their own regex (SELFIES: one token per bracket symbol).
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from clmscale.engine.representations import Representation, token_regex

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# Schwaller et al. 2019; `\\` is one literal backslash (a SMILES bond), `\%[0-9]{2}` a two-digit ring closure.
SMILES_REGEX = r"(\[[^\]]+]|Br?|Cl?|N|O|S|P|F|I|b|c|n|o|s|p|\(|\)|\.|=|#|-|\+|\\|\/|:|~|@|\?|>|\*|\$|\%[0-9]{2}|[0-9])"
_SMILES_RE = re.compile(SMILES_REGEX)

# In this id order (docs/CONTRACTS.md): PAD=0, UNK=1, CLS=2, SEP=3, MASK=4, BOS=5, EOS=6.
SPECIAL_TOKENS = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
    "bos_token": "[BOS]",
    "eos_token": "[EOS]",
}


def smiles_tokens(smiles: str, pattern: re.Pattern[str] = _SMILES_RE) -> list[str]:
    """Regex tokens of one SMILES (or of another representation's text, with its `pattern`), with each unmatched
    run kept as a token (no vocabulary involved).

    Gives exactly the pieces of the `Split(..., "isolated")` pre-tokenizer below.
    """
    tokens = pattern.findall(smiles)
    if sum(map(len, tokens)) == len(smiles):  # the usual case: the regex covers every character
        return tokens
    tokens, end = [], 0
    for match in pattern.finditer(smiles):
        if match.start() > end:
            tokens.append(smiles[end : match.start()])  # an unmatched run
        tokens.append(match.group())
        end = match.end()
    if end < len(smiles):
        tokens.append(smiles[end:])
    return tokens


def tokens_of(representation: Representation) -> Callable[[str], list[str]]:
    """The token splitter of a representation's texts (`smiles_tokens` with its regex)."""
    return functools.partial(smiles_tokens, pattern=re.compile(token_regex(representation)))


def build_vocab(smiles: Iterable[str], representation: Representation = "smiles") -> dict[str, int]:
    """Special tokens first, then tokens by falling frequency, ties alphabetical."""
    return extend_vocab({token: i for i, token in enumerate(SPECIAL_TOKENS.values())}, smiles, representation)


def extend_vocab(
    vocab: dict[str, int], smiles: Iterable[str], representation: Representation = "smiles"
) -> dict[str, int]:
    """`vocab` plus the tokens of `smiles` it lacks, appended by falling frequency, ties alphabetical."""
    return extend_vocab_from_counts(vocab, Counter(chain.from_iterable(map(tokens_of(representation), smiles))))


def extend_vocab_from_counts(vocab: dict[str, int], counts: Mapping[str, int]) -> dict[str, int]:
    """`extend_vocab` from token counts already summed (prepare adds them up over blocks on the cluster)."""
    vocab = dict(vocab)
    for token, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        vocab.setdefault(token, len(vocab))  # a SMILES that contains the text '[UNK]' keeps id 1
    return vocab


def build_tokenizer(
    smiles: Iterable[str], out_dir: Path | None = None, representation: Representation = "smiles"
) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer over the regex tokens of `smiles`; saved to `out_dir` when given."""
    return tokenizer_from_vocab(build_vocab(smiles, representation), out_dir, representation)


def tokenizer_from_vocab(
    vocab: dict[str, int], out_dir: Path | None = None, representation: Representation = "smiles"
) -> PreTrainedTokenizerFast:
    """The WordLevel tokenizer of a `build_vocab` / `extend_vocab` vocabulary, splitting texts of `representation`
    (engine.representations); saved to `out_dir` when given."""
    from transformers import PreTrainedTokenizerFast  # seconds to import; Ray workers only need smiles_tokens

    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(token_regex(representation)), behavior="isolated")
    core.decoder = decoders.Fuse()  # tokens are glued back together with no spaces
    cls, sep = SPECIAL_TOKENS["cls_token"], SPECIAL_TOKENS["sep_token"]
    core.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        clean_up_tokenization_spaces=False,  # decode gives the SMILES back as it is, never 'tidied'
        **SPECIAL_TOKENS,
    )
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer written by `build_tokenizer(..., out_dir)` (runs/<sweep>/data/tokenizer/)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json here; run `prepare` first")
    return AutoTokenizer.from_pretrained(str(path))  # type: ignore[return-value]  # a tokenizer.json dir: the fast one


def count_unk(tokenizer: PreTrainedTokenizerFast, smiles: Iterable[str], batch_size: int = 4096) -> int:
    """How many tokens of `smiles` map to [UNK] (specials not added): atoms the vocabulary never saw."""
    unk_id = tokenizer.unk_token_id
    backend = tokenizer.backend_tokenizer
    n_unk, batch = 0, list[str]()

    def flush() -> int:
        encodings = backend.encode_batch(batch, add_special_tokens=False)
        return sum(e.ids.count(unk_id) for e in encodings)

    for s in smiles:
        batch.append(s)
        if len(batch) == batch_size:
            n_unk += flush()
            batch = []
    if batch:
        n_unk += flush()
    return n_unk
