"""Mean-pooled probes read what pretraining learned: a pretrained checkpoint beats a random-init one of its size.

A tiny RoBERTa (2 layers, width 64) is pretrained here by masked LM on MOSES SMILES (the shipped
corpus), then probed on the shipped solubility task next to `random_init=True` (the same config,
fresh weights). At this size random mean-pooled features are already a decent bag of tokens, so
the gap is modest; 750 steps of batch 64 is the least pretraining measured to win on all three
splits (on val and test; 400 steps of batch 32 did not).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import first_moses
from rdkit import Chem, rdBase
from transformers import RobertaConfig, RobertaForMaskedLM

from clmscale.engine.finetune import FinetuneData, finetune
from clmscale.engine.tokenizer import build_tokenizer
from clmscale.fits._blas import one_blas_thread

DATA = Path(__file__).resolve().parents[1] / "data"
N_STEPS, BATCH, LR = 750, 64, 2e-3
MASK_ID, FIRST_ATOM_ID = 4, 7  # engine/tokenizer.py: specials take ids 0-6

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    with one_blas_thread():
        yield


@pytest.fixture(scope="module")
def solubility() -> pd.DataFrame:
    table = pd.read_csv(DATA / "solubility.csv")
    with rdBase.BlockLogs():
        return table[[Chem.MolFromSmiles(s) is not None for s in table.smiles]].reset_index(drop=True)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, solubility) -> Path:
    """Masked-LM pretraining, 15% of atom tokens replaced by [MASK], AdamW at a constant lr."""
    out = tmp_path_factory.mktemp("pretrained")
    corpus = first_moses(20_000)
    tokenizer = build_tokenizer(corpus + list(solubility.smiles), out)  # the task's tokens must have ids too
    config = RobertaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=128, max_position_embeddings=130, pad_token_id=0, bos_token_id=2,
                           eos_token_id=3, type_vocab_size=1)  # fmt: skip
    assert len(tokenizer) <= config.vocab_size
    ids = [[tokenizer.cls_token_id, *e.ids[:100], tokenizer.sep_token_id]
           for e in tokenizer.backend_tokenizer.encode_batch(corpus, add_special_tokens=False)]  # fmt: skip
    torch.manual_seed(0)
    model = RobertaForMaskedLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(N_STEPS):
        rows = torch.randint(0, len(ids), (BATCH,), generator=g).tolist()
        length = max(len(ids[r]) for r in rows)
        x = torch.zeros(BATCH, length, dtype=torch.long)  # (B, T), [PAD] = 0
        for b, r in enumerate(rows):
            x[b, : len(ids[r])] = torch.tensor(ids[r])
        mask = (x != 0).long()
        chosen = (torch.rand(x.shape, generator=g) < 0.15) & (x >= FIRST_ATOM_ID)
        loss = model(input_ids=torch.where(chosen, MASK_ID, x), attention_mask=mask,
                     labels=torch.where(chosen, x, -100)).loss  # fmt: skip
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-50:]) < 0.5 * np.mean(losses[:10])  # it learned something
    model.save_pretrained(out)
    return out


def test_mean_pooled_probe_of_a_pretrained_checkpoint_beats_random_init(pretrained, solubility):
    n = len(solubility)
    scores = {"pretrained": [], "random_init": []}
    for split_seed in (0, 1, 2):
        perm = np.random.default_rng(split_seed).permutation(n)
        split = perm[: int(0.8 * n)], perm[int(0.8 * n) : int(0.9 * n)], perm[int(0.9 * n) :]
        data = FinetuneData(list(solubility.smiles), solubility.sol.to_numpy(np.float32), "regression", split,
                            name="solubility")  # fmt: skip
        for name in scores:
            row = finetune(pretrained, data, mode="probe", epochs=1, patience=1, lr=1.0, batch_size=64,
                           split_seed=split_seed, finetune_seed=0, device="cpu",
                           random_init=name == "random_init")  # fmt: skip
            assert row["pooling"] == "mean" and row["probe_layer"] == 2
            scores[name].append((row["val"], row["test"]))
    pre, rnd = np.array(scores["pretrained"]), np.array(scores["random_init"])  # (seed, [val, test]) RMSE
    assert (pre[:, 0] < rnd[:, 0]).all(), scores  # on every split's validation part
    assert pre[:, 1].mean() < 0.97 * rnd[:, 1].mean(), scores  # and on test, on average (measured 0.924 vs 0.996)
