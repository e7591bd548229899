"""The SMILES tokenizer: regex tokens, deterministic ids, exact round trips, [UNK] never silent."""

from __future__ import annotations

import pytest
from conftest import first_moses
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Regex, pre_tokenizers

from clmscale.engine.tokenizer import SMILES_REGEX, SPECIAL_TOKENS, build_tokenizer, count_unk, load_tokenizer, smiles_tokens


@pytest.fixture(scope="module")
def moses() -> list[str]:
    return first_moses(6_000)


@pytest.fixture(scope="module")
def tokenizer(moses, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    build_tokenizer(moses[:4_000], out_dir=out)
    return load_tokenizer(out)


@pytest.mark.parametrize(
    "smiles, tokens",
    [
        ("Brc1ccccc1Cl", ["Br", "c", "1", "c", "c", "c", "c", "c", "1", "Cl"]),
        ("C[C@@H](N)C(=O)[O-]", ["C", "[C@@H]", "(", "N", ")", "C", "(", "=", "O", ")", "[O-]"]),
        ("C%12CC%12", ["C", "%12", "C", "C", "%12"]),
        ("F/C=C\\F", ["F", "/", "C", "=", "C", "\\", "F"]),
        ("CC.[Na+]", ["C", "C", ".", "[Na+]"]),
        # unmatched runs become tokens of their own instead of vanishing
        ("CCZe", ["C", "C", "Ze"]),
        ("C[Fe", ["C", "[", "F", "e"]),
        ("C%1C", ["C", "%", "1", "C"]),
        ("", []),
    ],
)
def test_smiles_tokens(smiles, tokens):
    assert smiles_tokens(smiles) == tokens
    assert "".join(tokens) == smiles


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_smiles_tokens_match_the_rust_pre_tokenizer(text):
    pieces = pre_tokenizers.Split(Regex(SMILES_REGEX), behavior="isolated").pre_tokenize_str(text)
    assert smiles_tokens(text) == [piece for piece, _ in pieces]
    assert "".join(smiles_tokens(text)) == text


def test_ids_are_special_tokens_then_frequency_then_alphabet():
    tok = build_tokenizer(["CC", "CO", "N"])  # C: 3, N: 1, O: 1 -> C, N, O
    assert tok.convert_ids_to_tokens(list(range(10))) == [*SPECIAL_TOKENS.values(), "C", "N", "O"]
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id) == (0, 1, 2, 3)
    assert (tok.mask_token_id, tok.bos_token_id, tok.eos_token_id) == (4, 5, 6)
    assert len(tok) == 10


def test_post_processor_adds_cls_and_sep(tokenizer):
    ids = tokenizer("CCO")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id and len(ids) == 5
    assert tokenizer("CCO", add_special_tokens=False)["input_ids"] == ids[1:-1]


def test_round_trip_on_thousands_of_moses_smiles(moses, tokenizer):
    held_out = moses[4_000:]  # not seen when the vocabulary was built
    assert count_unk(tokenizer, held_out) == 0
    encoded = tokenizer(held_out, add_special_tokens=True)["input_ids"]
    assert [tokenizer.decode(ids, skip_special_tokens=True) for ids in encoded] == held_out
    assert all(len(ids) == len(smiles_tokens(s)) + 2 for ids, s in zip(encoded, held_out))


def test_auto_tokenizer_loads_the_saved_directory(moses, tmp_path):
    from transformers import AutoTokenizer

    built = build_tokenizer(moses[:500], out_dir=tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded.get_vocab() == built.get_vocab()
    assert loaded(moses[600])["input_ids"] == built(moses[600])["input_ids"]
    assert loaded.mask_token == "[MASK]" and loaded.bos_token == "[BOS]"


def test_load_tokenizer_needs_a_tokenizer_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_unknown_atoms_are_counted_not_dropped(tokenizer):
    assert count_unk(tokenizer, ["CC[Fe]CC", "C[Fe][Fe]", "CCZe"]) == 4
    ids = tokenizer("CC[Fe]CC", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "CC[UNK]CC"
    assert count_unk(tokenizer, []) == 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(max_size=30), max_size=5))
def test_tokenizer_never_crashes_on_arbitrary_text(tokenizer, texts):
    n_unk = count_unk(tokenizer, texts)
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert n_unk == sum(ids.count(tokenizer.unk_token_id) for ids in encoded)
    for text, ids in zip(texts, encoded):
        assert len(ids) == len(smiles_tokens(text)) or any(s in text for s in SPECIAL_TOKENS.values())
        if tokenizer.unk_token_id not in ids:
            assert tokenizer.decode(ids) == text
