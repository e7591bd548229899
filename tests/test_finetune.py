"""Fine-tuning and probing tiny RoBERTa / GPT-2 checkpoints on the shipped solubility and FreeSolv data."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from rdkit import Chem, RDLogger
from safetensors.torch import load_file
from transformers import AutoModel, GPT2Config, GPT2LMHeadModel, RobertaConfig, RobertaForMaskedLM

from clmscale.engine.finetune import (
    FinetuneData,
    encode_smiles,
    finetune,
    fingerprint_baseline,
    finetuning_loss,
    masked_loss,
    metric_rows,
    pool,
    select_lr,
)
from clmscale.engine.metrics import mae, mean_prc_auc, mean_roc_auc, prc_auc, rmse, roc_auc
from clmscale.engine.tokenizer import build_tokenizer, smiles_tokens
from clmscale.fits._blas import one_blas_thread

DATA = Path(__file__).resolve().parents[1] / "data"
VOCAB_SIZE = 64  # room for the ~40 tokens of both files
# tiny models learn in a few epochs at this lr; cpu even on a GPU box, as CUDA's embedding backward
# is not bitwise deterministic
FAST = dict(patience=3, lr=2e-3, batch_size=32, split_seed=0, finetune_seed=0, device="cpu")


def _valid(df: pd.DataFrame) -> pd.DataFrame:
    """Drop what RDKit cannot parse, as engine.tasks does (the fingerprint baseline refuses such SMILES)."""
    RDLogger.DisableLog("rdApp.*")
    try:
        return df[[Chem.MolFromSmiles(s) is not None for s in df.smiles]].reset_index(drop=True)
    finally:
        RDLogger.EnableLog("rdApp.*")


def _random_split(n: int, seed: int, fractions=(0.6, 0.2, 0.2)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_train, n_val = int(fractions[0] * n), int(fractions[1] * n)
    return perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """Tiny models on a shared 2-core box: extra torch and OpenBLAS threads only spin (75 s instead of 2 s)."""
    with one_blas_thread():  # the same for the L-BFGS fits of the probe and the fingerprint baseline
        yield


@pytest.fixture(scope="module")
def solubility() -> pd.DataFrame:
    return _valid(pd.read_csv(DATA / "solubility.csv"))


@pytest.fixture(scope="module")
def freesolv() -> pd.DataFrame:
    return _valid(pd.read_csv(DATA / "freesolv.csv"))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, solubility, freesolv) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    tokenizer = build_tokenizer(list(solubility.smiles) + list(freesolv.smiles), out)
    assert len(tokenizer) <= VOCAB_SIZE
    return out


def _save_checkpoint(model, tokenizer_dir: Path, out: Path) -> Path:
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():  # the tokenizer lives in the checkpoint directory
        (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.fixture(scope="module")
def mlm_checkpoint(tmp_path_factory, tokenizer_dir) -> Path:
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=130, pad_token_id=0, bos_token_id=2, eos_token_id=3, type_vocab_size=1,
    )
    return _save_checkpoint(RobertaForMaskedLM(config), tokenizer_dir, tmp_path_factory.mktemp("mlm"))


@pytest.fixture(scope="module")
def clm_checkpoint(tmp_path_factory, tokenizer_dir) -> Path:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB_SIZE, n_embd=32, n_layer=1, n_head=2, n_positions=128, bos_token_id=5, eos_token_id=6, pad_token_id=0,
    )
    return _save_checkpoint(GPT2LMHeadModel(config), tokenizer_dir, tmp_path_factory.mktemp("clm"))


@pytest.fixture(scope="module")
def heavy_atoms(solubility) -> FinetuneData:
    """An easy synthetic target even an untrained tiny model can learn: the number of heavy atoms."""
    sub = solubility.sample(160, random_state=0).reset_index(drop=True)
    n_heavy = np.array([Chem.MolFromSmiles(s).GetNumHeavyAtoms() for s in sub.smiles], dtype=np.float32)
    return FinetuneData(list(sub.smiles), n_heavy[:, None], "regression", _random_split(160, 0), name="n_heavy")


@pytest.fixture(scope="module")
def sol_class(solubility) -> FinetuneData:
    sub = solubility.sample(150, random_state=1).reset_index(drop=True)
    return FinetuneData(list(sub.smiles), sub.sol_class.to_numpy(np.float32), "classification", _random_split(150, 1),
                        n_classes=3, name="sol_class")


def _mean_predictor_rmse(data: FinetuneData) -> float:
    train, _, test = data.split
    return rmse(data.labels[test], np.full_like(data.labels[test], data.labels[train].mean()))


# ---------------------------------------------------------------------------------------------
# metrics and the masked loss


def test_roc_auc_equals_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 2, size=40)
        scores = rng.integers(0, 5, size=40).astype(float)  # five values: many ties
        pos, neg = scores[y == 1], scores[y == 0]
        brute = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (pos.size * neg.size)
        assert roc_auc(y, scores) == pytest.approx(brute, abs=1e-12)
    assert math.isnan(roc_auc(np.ones(5), np.arange(5.0)))


def test_mean_roc_auc_skips_nan_and_single_class_columns():
    labels = np.array([[0, 1, np.nan], [1, 1, 0], [1, 1, np.nan], [0, 1, 1]], dtype=np.float32)
    scores = np.array([[0.1, 0.3, 9.0], [0.9, 0.2, 0.0], [0.8, 0.1, 9.0], [0.2, 0.4, 1.0]])
    # column 0: perfect; column 1: one class, skipped; column 2: the two labelled rows, perfect
    assert mean_roc_auc(labels, scores) == pytest.approx(1.0)
    # multi-class macro one-vs-rest: argmax-perfect probabilities give 1
    y = np.array([0, 1, 2, 1, np.nan], dtype=np.float32)[:, None]
    probs = np.eye(3)[[0, 1, 2, 1, 0]] * 0.8 + 0.1
    assert mean_roc_auc(y, probs, n_classes=3) == pytest.approx(1.0)


def test_prc_auc_is_average_precision_and_masks_like_roc_auc():
    rng = np.random.default_rng(1)
    for _ in range(20):
        y = rng.integers(0, 2, size=30)
        scores = rng.permutation(30).astype(float)  # distinct scores: AP = mean precision at each positive
        order = np.argsort(-scores)
        hits = np.cumsum(y[order])
        brute = np.mean([hits[k] / (k + 1) for k in range(30) if y[order][k] == 1])
        assert prc_auc(y, scores) == pytest.approx(brute, abs=1e-12)
    assert math.isnan(prc_auc(np.zeros(5), np.arange(5.0))) and math.isnan(prc_auc(np.ones(5), np.arange(5.0)))
    labels = np.array([[0, 1, np.nan], [1, 1, 0], [1, 1, np.nan], [0, 1, 1]], dtype=np.float32)
    scores = np.array([[0.1, 0.3, 9.0], [0.9, 0.2, 0.0], [0.8, 0.1, 9.0], [0.2, 0.4, 1.0]])
    assert mean_prc_auc(labels, scores) == pytest.approx(1.0)  # as mean_roc_auc: column 1 skipped, NaN rows dropped
    y = np.array([0, 1, 2, 1, np.nan], dtype=np.float32)[:, None]
    assert mean_prc_auc(y, np.eye(3)[[0, 1, 2, 1, 0]] * 0.8 + 0.1, n_classes=3) == pytest.approx(1.0)
    mean_absolute = mae(np.array([[1.0, np.nan], [3.0, 2.0]]), np.array([[2.0, 9.0], [1.0, 2.5]]))
    assert mean_absolute == pytest.approx((1.5 + 0.5) / 2)


def test_masked_loss_ignores_nan_labels():
    labels = torch.tensor([[1.0, float("nan")], [0.0, 1.0], [float("nan"), 0.0]])
    missing = torch.isnan(labels)
    outputs = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss = masked_loss(outputs, labels, "classification")
    loss.backward()
    assert torch.isfinite(loss)
    assert (outputs.grad[missing] == 0).all()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(outputs[~missing], labels[~missing])
    assert loss.item() == pytest.approx(expected.item())
    # whatever the model says where the label is missing, the loss stays the same
    moved = outputs.detach().clone()
    moved[missing] += 100.0
    assert masked_loss(moved, labels, "classification").item() == pytest.approx(loss.item())
    assert masked_loss(moved, labels, "regression").item() == pytest.approx(masked_loss(outputs, labels, "regression").item())
    # multi-class: a NaN row is skipped
    logits = torch.randn(3, 3, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([[2.0], [float("nan")], [0.0]])
    expected = torch.nn.functional.cross_entropy(logits[[0, 2]], torch.tensor([2, 0]))
    assert masked_loss(logits, y, "classification", n_classes=3).item() == pytest.approx(expected.item())


def test_pool_mean_over_real_tokens_cls_and_last_real_token():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)  # (B, T, H)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert pool(hidden, mask, "mean").flatten().tolist() == [1.0, 5.5]  # (0+1+2)/3: the pad (3.0) is left out
    assert pool(hidden, mask).flatten().tolist() == [1.0, 5.5]  # mean is the default
    assert pool(hidden, mask, "cls").flatten().tolist() == [0.0, 4.0]
    assert pool(hidden, mask, "last").flatten().tolist() == [2.0, 7.0]
    with pytest.raises(ValueError, match="pooling must be one of 'mean', 'cls', 'last'"):
        pool(hidden, mask, "max")


# ---------------------------------------------------------------------------------------------
# fine-tuning and probing


def test_regression_finetune_and_probe_beat_the_mean(mlm_checkpoint, heavy_atoms, tmp_path):
    baseline = _mean_predictor_rmse(heavy_atoms)
    tuned = finetune(mlm_checkpoint, heavy_atoms, mode="finetune", epochs=8, **FAST, save_to=tmp_path / "enc.safetensors")
    probed = finetune(mlm_checkpoint, heavy_atoms, mode="probe", epochs=1, **FAST)
    for result in (tuned, probed):
        assert result["metric"] == "rmse"
        assert math.isfinite(result["test"]) and result["test"] < 0.7 * baseline, (result["test"], baseline)
        assert (result["n_train"], result["n_val"], result["n_test"]) == (96, 32, 32)
    assert probed["l2"] is not None and probed["best_epoch"] is None
    # the saved encoder has the keys of AutoModel on the checkpoint and moved away from the pretrained weights
    saved = load_file(tuned["weights_path"])
    pretrained = AutoModel.from_pretrained(mlm_checkpoint, add_pooling_layer=False).state_dict()
    assert saved.keys() == pretrained.keys()
    assert any(not torch.equal(saved[k], pretrained[k]) for k in saved)


def test_results_carry_every_metric_and_the_primary_one_selects(mlm_checkpoint, heavy_atoms, sol_class):
    tuned = finetune(mlm_checkpoint, heavy_atoms, mode="finetune", epochs=2, **FAST)
    assert set(tuned["metrics"]) == {"rmse", "mae"} and tuned["metric"] == "rmse" and not tuned["higher_is_better"]
    assert tuned["test"] == tuned["metrics"]["rmse"]["test"] and tuned["val"] == tuned["metrics"]["rmse"]["val"]
    rows = metric_rows(tuned)
    assert [(r["metric"], r["primary"], r["higher_is_better"]) for r in rows] == [("rmse", True, False),
                                                                                  ("mae", False, False)]
    assert rows[1]["value"] == tuned["metrics"]["mae"]["test"]
    assert (tuned["split_seed"], tuned["finetune_seed"], tuned["seed"], tuned["pooling"]) == (0, 0, 0, "mean")
    assert tuned["lr"] == FAST["lr"] and tuned["lr_schedule"] == "linear" and tuned["warmup_fraction"] == 0.1
    by_prc = FinetuneData(sol_class.smiles, sol_class.labels, "classification", sol_class.split, n_classes=3,
                          name="sol_class", primary_metric="prc_auc")  # fmt: skip
    probed = finetune(mlm_checkpoint, by_prc, mode="probe", epochs=1, **FAST)
    assert probed["metric"] == "prc_auc" and probed["higher_is_better"]
    assert set(probed["metrics"]) == {"roc_auc", "prc_auc"}
    assert probed["test"] == probed["metrics"]["prc_auc"]["test"]
    with pytest.raises(ValueError, match=r"one of \('rmse', 'mae'\) for regression \(got 'roc_auc'\)"):
        FinetuneData(heavy_atoms.smiles, heavy_atoms.labels, "regression", heavy_atoms.split, primary_metric="roc_auc")


def test_the_old_single_seed_sets_both_and_one_of_them_is_not_enough(mlm_checkpoint, heavy_atoms):
    kwargs = {k: v for k, v in FAST.items() if k not in ("split_seed", "finetune_seed")}
    old = finetune(mlm_checkpoint, heavy_atoms, mode="probe", epochs=1, **kwargs, seed=3)  # as analyze.py calls it
    assert (old["split_seed"], old["finetune_seed"], old["seed"]) == (3, 3, 3)
    with pytest.raises(TypeError, match="pass split_seed and finetune_seed"):
        finetune(mlm_checkpoint, heavy_atoms, mode="probe", epochs=1, **kwargs, split_seed=3)
    assert fingerprint_baseline(heavy_atoms, seed=2, n_bits=64)["split_seed"] == 2


def test_warmup_then_linear_decay(mlm_checkpoint, heavy_atoms):
    # 96 train molecules in batches of 32: 3 steps an epoch, 12 in all, the first 6 warming up
    result = finetune(mlm_checkpoint, heavy_atoms, mode="finetune", epochs=4, **{**FAST, "patience": 10},
                      warmup_fraction=0.5)  # fmt: skip
    lrs = [h["lr"] / FAST["lr"] for h in result["history"][1:]]
    assert lrs == pytest.approx([0.5, 1.0, 0.5, 0.0])  # after steps 3, 6, 9 and 12
    constant = finetune(mlm_checkpoint, heavy_atoms, mode="finetune", epochs=4, **{**FAST, "patience": 10},
                        warmup_fraction=0.5, lr_schedule="constant")  # fmt: skip
    assert [h["lr"] / FAST["lr"] for h in constant["history"][1:]] == pytest.approx([0.5, 1.0, 1.0, 1.0])


def test_flags_for_a_diverging_run_and_an_untrained_one(mlm_checkpoint, heavy_atoms):
    diverged = finetune(mlm_checkpoint, heavy_atoms, mode="finetune", epochs=3, **{**FAST, "lr": 1e30})
    assert diverged["flag"] == "non_finite_loss" and diverged["best_epoch"] == 0
    assert not math.isfinite(diverged["history"][-1]["train_loss"])
    assert diverged["val"] == pytest.approx(diverged["history"][0]["val"], rel=1e-6)  # the epoch-0 weights came back
    assert math.isfinite(diverged["test"])
    frozen = finetune(mlm_checkpoint, heavy_atoms, mode="finetune", epochs=2, **{**FAST, "lr": 1e-30})  # moves nothing
    assert frozen["flag"] == "best_epoch_0" and frozen["best_epoch"] == 0
    assert finetune(mlm_checkpoint, heavy_atoms, mode="finetune", epochs=2, **FAST)["flag"] == ""


def test_lr_grid_picks_the_rate_that_converges(mlm_checkpoint, heavy_atoms):
    """Planted: in 4 epochs 1e-6 barely moves, 1e30 blows up, and only 3e-3 learns the heavy-atom count."""
    kwargs = {k: v for k, v in FAST.items() if k not in ("lr", "split_seed", "finetune_seed")}
    chosen = select_lr(mlm_checkpoint, heavy_atoms, [1e30, 3e-3, 1e-6], split_seed=0, finetune_seed=0, epochs=4,
                       **{**kwargs, "patience": 4})  # fmt: skip
    assert chosen["lr"] == 3e-3 and chosen["metric"] == "rmse" and chosen["n_flagged"] >= 1
    records = {r["lr"]: r for r in chosen["records"]}
    assert list(records) == [1e-6, 3e-3, 1e30]  # ascending
    assert records[1e30]["flag"] == "non_finite_loss" and records[3e-3]["flag"] == ""
    assert records[3e-3]["val"] < 0.8 * records[1e-6]["val"], records  # converged vs not
    assert chosen["val"] == records[3e-3]["val"] and set(records[3e-3]["val_metrics"]) == {"rmse", "mae"}
    assert all("test" not in r for r in records.values())  # chosen on val; test is read once, at the chosen lr
    nothing = select_lr(mlm_checkpoint, heavy_atoms, [1e30], split_seed=0, finetune_seed=0, epochs=2, **kwargs)
    assert nothing["lr"] is None and nothing["n_flagged"] == 1 and math.isnan(nothing["val"])


def test_probe_layers_and_pooling_options(mlm_checkpoint, clm_checkpoint, heavy_atoms, tmp_path):
    last = finetune(mlm_checkpoint, heavy_atoms, mode="probe", epochs=1, **FAST)
    best = finetune(mlm_checkpoint, heavy_atoms, mode="probe", epochs=1, **FAST, probe_layer="best")
    assert last["probe_layer"] == 2 and last["n_layers_probed"] == 1  # 2 layers: 0 is the embedding output
    assert best["n_layers_probed"] == 3 and 0 <= best["probe_layer"] <= 2 and best["val"] <= last["val"]
    fixed = finetune(mlm_checkpoint, heavy_atoms, mode="probe", epochs=1, **FAST, probe_layer=best["probe_layer"])
    assert fixed["val"] == pytest.approx(best["val"]) and fixed["test"] == pytest.approx(best["test"])
    cls = finetune(mlm_checkpoint, heavy_atoms, mode="probe", epochs=1, **FAST, pooling="cls")
    assert cls["pooling"] == "cls" and cls["val"] != last["val"]
    with pytest.raises(ValueError, match="probe_layer must be 'last', 'best' or a layer index 0..2"):
        finetune(mlm_checkpoint, heavy_atoms, mode="probe", epochs=1, **FAST, probe_layer=3)
    with pytest.raises(ValueError, match="pooling 'cls' reads the first token"):
        finetune(clm_checkpoint, heavy_atoms, mode="probe", epochs=1, **FAST, pooling="cls")
    # the Hessian's model is rebuilt with the pooling it was fine-tuned with
    saved = tmp_path / "last.safetensors"
    finetune(mlm_checkpoint, heavy_atoms, mode="finetune", epochs=1, **FAST, pooling="last", save_to=saved)
    model, loss_fn, batches = finetuning_loss(mlm_checkpoint, heavy_atoms, saved, n_batches=2, batch_size=16)
    assert model.pooling == "last" and len(batches) == 2 and math.isfinite(loss_fn(model, batches[0]).detach().item())
    _, _, sampled = finetuning_loss(mlm_checkpoint, heavy_atoms, saved, n_batches=2, batch_size=16, sample_seed=0)
    assert not torch.equal(sampled[0]["labels"], batches[0]["labels"])  # a random sample of train, not its head


def test_task_loss_sharpness_at_the_pretrained_encoder_moves_the_encoder_only(mlm_checkpoint, heavy_atoms, tmp_path):
    """analyze's `pretrained_task:<task>` sharpness: the probe head's task loss, perturbed over the encoder alone."""
    import dataclasses

    from clmscale.engine.analyze import sharpness, task_problem
    from clmscale.engine.hessian import spectrum
    from clmscale.engine.landscape import loss_at
    from clmscale.engine.rundir import head_file

    head = tmp_path / "probe.safetensors"
    finetune(mlm_checkpoint, heavy_atoms, mode="finetune", epochs=1, **FAST, freeze_encoder=True, save_to=head)
    assert head_file(head).exists() and not head.exists()  # the head alone: the encoder is the checkpoint's
    problem = task_problem(mlm_checkpoint, heavy_atoms, head, pretrained_encoder=True, n_batches=2, batch_size=16,
                           sample_seed=0)
    model = problem.model
    names = {n for n, _ in model.named_parameters()}
    assert set(problem.param_names) == {n for n in names if n.startswith("encoder.")} != names  # the head is left out
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    moved: set[str] = set()

    def recording_loss(m, batch):  # the loss the sharpness sees, and which weights were displaced for it
        moved.update(n for n, p in m.named_parameters() if not torch.equal(p.detach(), start[n]))
        return problem.loss_fn(m, batch)

    record = sharpness(dataclasses.replace(problem, loss_fn=recording_loss), rho=0.05, adaptive_rho=0.5, n_steps=3)
    assert moved and moved <= set(problem.param_names)  # the encoder was perturbed, the head never
    assert any(n.startswith("encoder.encoder.layer.") for n in moved)
    for name in ("eps_sharpness", "adaptive_sharpness"):
        assert 0 < record[name] < math.inf, record
    weights = [problem.count_fn(b) for b in problem.batches]
    assert record["loss"] == pytest.approx(loss_at(model, problem.loss_fn, problem.batches, weights=weights))
    for n, p in model.named_parameters():  # the weights come back bit for bit
        assert torch.equal(p.detach(), start[n]), n
    # the very loss the pretrained_task Hessian is taken of (same batches, weighting and parameters)
    spec = spectrum(model, problem.loss_fn, problem.batches, top_k=1, count_fn=problem.count_fn,
                    param_names=problem.param_names, max_iter=3, trace_matvecs=0, density_runs=0, half_batches=False)
    assert spec.loss == pytest.approx(record["loss"], rel=1e-6) and spec.n_params == sum(
        p.numel() for n, p in model.named_parameters() if n in problem.param_names)


def test_finetune_is_deterministic_per_seed(mlm_checkpoint, heavy_atoms):
    kwargs = dict(FAST, epochs=1)
    first = finetune(mlm_checkpoint, heavy_atoms, mode="finetune", **kwargs)
    again = finetune(mlm_checkpoint, heavy_atoms, mode="finetune", **kwargs)
    other = finetune(mlm_checkpoint, heavy_atoms, mode="finetune", **{**kwargs, "finetune_seed": 1})
    assert first["history"] == again["history"] and first["test"] == again["test"]
    assert other["history"] != first["history"]


def test_early_stopping_restores_the_best_epoch(mlm_checkpoint, heavy_atoms):
    result = finetune(mlm_checkpoint, heavy_atoms, mode="finetune", **{**FAST, "epochs": 12, "patience": 1, "lr": 3e-2, "batch_size": 16})
    history, best = result["history"], result["best_epoch"]
    vals = [h["val"] for h in history]
    assert best == int(np.argmin(vals))  # RMSE: lower is better; epoch 0 is the untrained head
    assert result["n_epochs"] == len(history) - 1 == min(12, best + 1)
    assert best < result["n_epochs"]  # the last epoch was worse, so restoring matters
    # the reported val is recomputed after the restore, so it matches the best epoch, not the last
    assert result["val"] == pytest.approx(vals[best], rel=1e-6)
    assert result["val"] != pytest.approx(vals[-1], rel=1e-6)


def test_three_class_classification_auc(mlm_checkpoint, sol_class):
    for mode in ("finetune", "probe"):
        result = finetune(mlm_checkpoint, sol_class, mode=mode, epochs=2, **FAST)
        assert result["metric"] == "roc_auc"
        assert 0.0 <= result["test"] <= 1.0 and 0.0 <= result["val"] <= 1.0


def test_multitask_with_missing_labels(mlm_checkpoint, solubility):
    sub = solubility.sample(150, random_state=2).reset_index(drop=True)
    labels = np.stack([sub.sol_class == 2, sub.sol_class == 0, sub.smiles.str.contains("N")], axis=1).astype(np.float32)
    labels[np.random.default_rng(0).random(labels.shape) < 0.3] = np.nan  # Tox21-style sparse labels
    data = FinetuneData(list(sub.smiles), labels, "classification", _random_split(150, 2), name="multitask")
    tuned = finetune(mlm_checkpoint, data, mode="finetune", epochs=2, **FAST)
    fp = fingerprint_baseline(data, split_seed=0, n_bits=128)
    for result in (tuned, fp):
        assert 0.0 <= result["test"] <= 1.0
    assert fp["mode"] == "morgan_fp" and fp.keys() == tuned.keys()


def test_random_init_baseline_needs_only_config_and_tokenizer(mlm_checkpoint, heavy_atoms, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (bare / name).write_bytes((mlm_checkpoint / name).read_bytes())
    result = finetune(bare, heavy_atoms, mode="finetune", epochs=1, **FAST, random_init=True, save_to=tmp_path / "w.safetensors")
    assert result["random_init"] and math.isfinite(result["test"])
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        finetune(bare, heavy_atoms, mode="probe", epochs=1, **FAST)


def test_fingerprint_baseline_beats_the_mean_on_solubility(solubility):
    sub = solubility.sample(600, random_state=3).reset_index(drop=True)
    split = _random_split(600, 3, (0.8, 0.1, 0.1))
    data = FinetuneData(list(sub.smiles), sub.sol.to_numpy(np.float32), "regression", split, name="solubility")
    result = fingerprint_baseline(data, split_seed=0, n_bits=1024)
    assert result["mode"] == "morgan_fp" and result["metric"] == "rmse"
    assert result["test"] < 0.75 * _mean_predictor_rmse(data), result  # log S tracks structure closely


def test_clm_checkpoint_smoke(clm_checkpoint, freesolv):
    sub = freesolv.sample(90, random_state=4).reset_index(drop=True)
    data = FinetuneData(list(sub.smiles), sub.expt.to_numpy(np.float32), "regression", _random_split(90, 4), name="freesolv")
    for mode in ("finetune", "probe"):
        result = finetune(clm_checkpoint, data, mode=mode, epochs=1, **FAST, max_seq_len=16)  # 16: truncation too
        assert math.isfinite(result["test"]) and result["unk_fraction"] == 0.0
        long = sum(len(smiles_tokens(s)) > 14 for s in data.smiles) / len(data.smiles)  # 16 minus [BOS] and [EOS]
        assert 0 < long < 1 and result["truncated_fraction"] == pytest.approx(long)


def test_encode_smiles_counts_unknown_tokens_and_truncation():
    tokenizer = build_tokenizer(["CC(C)O", "c1ccccc1"])
    encoded = encode_smiles(tokenizer, ["CCO", "C[C@@H](O)Cl", "c1ccccc1CCCCCC"], "mlm", 8)
    assert encoded.ids[0] == [tokenizer.cls_token_id, *tokenizer.convert_tokens_to_ids(["C", "C", "O"]),
                              tokenizer.sep_token_id]
    assert encoded.unk_fraction == pytest.approx(2 / (3 + 6 + 14))  # [C@@H] and Cl
    assert encoded.truncated_fraction == pytest.approx(1 / 3) and len(encoded.ids[2]) == 8


def test_task_smiles_pass_through_the_corpus_canonicalisation(tmp_path):
    """analyze hands every model-facing job its task SMILES spelled as prepare spells the corpus: canonical,
    with the sweep's isomeric setting; a [C@@H] the corpus never had is then no [UNK] when isomeric is false."""
    from clmscale.engine.analyze import Context, _task_split
    from clmscale.engine.config import SweepConfig
    from clmscale.engine.prepare import canonicalize_chunk
    from clmscale.engine.rundir import RunDir

    raw = ["OCC", "[H]OC([H])([H])C([H])([H])[H]", "C(C)(C)O", "OC(C)CC", "N[C@@H](C)C(=O)O", "OCCCC", "C(O)CCCC",
           "OC(C)(C)C", "C(=O)(O)C", "ClCCO"]
    (tmp_path / "t.csv").write_text("smiles,y\n" + "".join(f"{s},{i}\n" for i, s in enumerate(raw)))
    doc = {"name": "t", "data": {"corpus": ["x.csv"]}, "model": {"sizes": ["xxs"]}, "budget": {"tokens": [1000]},
           "downstream": {"tasks": ["t"], "split": "random", "custom": [
               {"name": "t", "path": str(tmp_path / "t.csv"), "label_columns": ["y"], "task_type": "regression"}]}}
    for isomeric in (True, False):
        doc["data"]["isomeric"] = isomeric
        ctx = Context(rd=RunDir(tmp_path / "run"), cfg=SweepConfig.model_validate(doc), trials={})
        data = _task_split(ctx, "t", 0)
        assert data.smiles == [c.smiles for c in canonicalize_chunk(raw, isomeric)]
        assert data.smiles[:2] == ["CCO", "CCO"]  # the explicit-hydrogen spelling too
        assert data.smiles[4] == ("C[C@H](N)C(=O)O" if isomeric else "CC(N)C(=O)O")
    corpus_tokenizer = build_tokenizer(["CCO", "CC(N)C(=O)O", "CCCCCO", "OCCCl"])  # a stereo-free corpus
    assert encode_smiles(corpus_tokenizer, data.smiles, "mlm", 64).unk_fraction == 0
    assert encode_smiles(corpus_tokenizer, raw, "mlm", 64).unk_fraction > 0  # the raw spellings have [H], [C@@H]


# ---------------------------------------------------------------------------------------------
# errors


def test_checkpoint_errors_name_the_directory_and_the_missing_files(tmp_path, heavy_atoms, mlm_checkpoint):
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        finetune(tmp_path / "nowhere", heavy_atoms, mode="probe", epochs=1, **FAST)
    (tmp_path / "config.json").write_bytes((mlm_checkpoint / "config.json").read_bytes())
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}.*model.safetensors.*tokenizer.json"):
        finetune(tmp_path, heavy_atoms, mode="probe", epochs=1, **FAST)


def test_bad_splits_are_rejected_with_the_task_and_split_named():
    smiles = ["C", "CC", "CCC", "CCCC", "CCO", "CCN"]
    with pytest.raises(ValueError, match="tox: the val split .* single class"):
        FinetuneData(smiles, np.array([0, 1, 1, 1, 0, 1.0]), "classification", ([0, 1], [2, 3], [4, 5]), name="tox")
    with pytest.raises(ValueError, match="esol: the train split .* no labels"):
        FinetuneData(smiles, np.array([np.nan, np.nan, 1, 2, 3, 4]), "regression", ([0, 1], [2, 3], [4, 5]), name="esol")
    with pytest.raises(ValueError, match="esol: the train and test splits share 1"):
        FinetuneData(smiles, np.arange(6.0), "regression", ([0, 1, 4], [2, 3], [4, 5]), name="esol")
    with pytest.raises(ValueError, match="integers 0..2"):
        FinetuneData(smiles, np.array([0, 1, 2, 3, 0, 1.0]), "classification", ([0, 1], [2, 3], [4, 5]), n_classes=3)
