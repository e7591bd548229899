"""SMILES shards -> token ids -> training batches, locally or through Ray Data into Ray Train workers.

The story, top to bottom:
  encode    SMILES -> token ids, wrapped per objective (mlm, modernbert `[CLS] … [SEP]`; clm, llama
            `[BOS] … [EOS]`), truncated; shards from prepare carry the ids already (`ids` column), so the
            training paths only wrap them.
  collate   token ids -> one batch dict (docs/CONTRACTS.md): padding, MLM masking or CLM labels, packing.
  local_batches / validation_batches   the plain path: pyarrow + numpy, no Ray (standalone or torch.distributed).
  train_dataset / worker_batches       the Ray path: Ray Data reads, shuffles, encodes and collates on its
                                       own CPUs (reading prepare's ids; encoding only older shards, or
                                       random SMILES with data.randomized_smiles), one micro-batch per
                                       row, mlm rows unmasked; each Ray Train worker unpacks its shard of
                                       those rows into tensors on its device and masks them there.

Determinism: the masking generator of a batch (`mask_tokens`, torch) is seeded from (seed, epoch, the batch's
token ids), so the same molecules in the same order get the same masks whichever process masks them, on one
kind of device. Everything above the Ray section imports without Ray.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from clmscale.engine.ladder import Family, objective
from clmscale.engine.representations import randomized_smiles

if TYPE_CHECKING:
    import ray.data
    from transformers import PreTrainedTokenizerFast

    from clmscale.engine.config import Trial
    from clmscale.engine.rundir import RunDir

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]

IGNORE_INDEX = -100  # label of positions without loss (the HF / PyTorch cross-entropy convention)
PAD_MULTIPLE = 8  # pad lengths to a multiple of 8: tensor cores want it, and few distinct shapes
ENCODE_ROWS = 1024  # molecules per tokenizer call: the Rust batch encoder amortizes its overhead
PACK_FACTOR = 8  # packing: molecules per Ray map call = 8x, so the one short batch per call is rare
SMILES_COLUMN = "smiles"
IDS_COLUMN = "ids"  # prepare's token ids per molecule, no special tokens (uint8 / uint16 list)


# ---------------------------------------------------------------------------------------------
# encode: SMILES -> token ids


def _wrap_ids(tokenizer: PreTrainedTokenizerFast, family: Family) -> tuple[int, int]:
    names = {"mlm": ("cls_token_id", "sep_token_id"), "clm": ("bos_token_id", "eos_token_id")}[objective(family)]
    ids = tuple(getattr(tokenizer, name) for name in names)
    if None in ids:
        raise ValueError(f"tokenizer has no {' / '.join(names)}: build it with engine.tokenizer")
    return ids


def encode(
    smiles: Sequence[str], tokenizer: PreTrainedTokenizerFast, family: Family, max_seq_len: int
) -> list[list[int]]:
    """Token ids of each SMILES wrapped per family, cut to `max_seq_len` keeping the closing token."""
    open_id, close_id = _wrap_ids(tokenizer, family)
    body = max_seq_len - 2
    # through __call__, not backend_tokenizer.encode_batch: a caller's earlier tokenizer(..., padding=True)
    # leaves padding switched on in the shared Rust tokenizer, and only __call__ resets it
    bodies = tokenizer(list(smiles), add_special_tokens=False, padding=False, truncation=False,
                       return_attention_mask=False)["input_ids"]  # fmt: skip
    return [[open_id, *ids[:body], close_id] for ids in bodies]


# ---------------------------------------------------------------------------------------------
# collate: token ids -> one batch


def collate_args(tokenizer: PreTrainedTokenizerFast) -> dict:
    """The tokenizer facts `collate` needs, as plain data (picklable, cheap to ship to workers)."""
    return {
        "pad_id": tokenizer.pad_token_id,
        "mask_id": tokenizer.mask_token_id,
        "vocab_size": len(tokenizer),
        "special_ids": sorted(set(tokenizer.all_special_ids)),  # [UNK] too: never a masking target
    }


def _ids_digest(ids: Sequence[Sequence[int]]) -> int:
    lengths = np.fromiter((len(s) for s in ids), dtype=np.int64, count=len(ids))
    digest = hashlib.blake2b(lengths.tobytes(), digest_size=8)  # lengths first: [1,2],[3] != [1],[2,3]
    digest.update(np.concatenate([np.asarray(s, dtype=np.int64) for s in ids]).tobytes() if ids else b"")
    return int.from_bytes(digest.digest(), "little")


def batch_rng(seed: int, epoch: int, ids: Sequence[Sequence[int]]) -> np.random.Generator:
    """A batch's RNG (length buckets' order): a function of (seed, epoch, its token ids) and nothing else."""
    return np.random.default_rng([seed % 2**63, epoch % 2**63, _ids_digest(ids)])


def batch_seed(seed: int, epoch: int, ids: Sequence[Sequence[int]]) -> int:
    """The masking seed of one batch (a torch generator's, `mask_tokens`): a function of (seed, epoch, its token
    ids) and nothing else, below 2**63."""
    return int(np.random.default_rng([seed % 2**63, epoch % 2**63, _ids_digest(ids)]).integers(2**63))


def _padded_length(longest: int, max_seq_len: int | None) -> int:
    rounded = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    return rounded if max_seq_len is None else min(rounded, max(longest, max_seq_len))


def _next_fit(seqs: Iterable[Sequence[int]], max_seq_len: int) -> Iterator[list[Sequence[int]]]:
    """Rows by next-fit in order: molecules fill a row until the next one does not fit; none is split."""
    row: list[Sequence[int]] = []
    used = 0
    for seq in seqs:
        if len(seq) > max_seq_len:
            raise ValueError(f"a sequence of {len(seq)} tokens does not fit max_seq_len={max_seq_len}")
        if row and used + len(seq) > max_seq_len:
            yield row
            row, used = [], 0
        row.append(seq)
        used += len(seq)
    if row:
        yield row


def _pack(ids: Sequence[Sequence[int]], max_seq_len: int) -> list[list[Sequence[int]]]:
    return list(_next_fit(ids, max_seq_len))


def collate(
    ids: Sequence[Sequence[int]],
    family: Family,
    pad_id: int,
    mask_id: int,
    vocab_size: int,
    special_ids: Sequence[int],
    mlm_probability: float,
    mask_seed: int | None,
    packing: bool = False,
    max_seq_len: int | None = None,
) -> Batch:
    """One batch dict of int64 tensors (docs/CONTRACTS.md) from encoded sequences.

    mlm families: masked here with `mask_tokens` seeded by `mask_seed`; `mask_seed=None` leaves the batch
    unmasked and without labels, for the Ray Train worker to mask on its device (`worker_batches`).

    Without packing: one molecule per row, right-padded to the longest (rounded up to a multiple of 8,
    never past max_seq_len). With packing: molecules fill rows of at most max_seq_len tokens in order
    (next-fit), `position_ids` restart at 0 for every molecule (and for the trailing padding).
    Packed rows and attention: the 2D `attention_mask` only hides padding, so with it every token attends
    to the whole row, across molecule boundaries; each molecule keeps its own [CLS]/[SEP] or [BOS]/[EOS],
    which is standard in LM pretraining. For clm, HF decoders (GPT-2 in transformers 5) block
    cross-molecule attention cheaply when called with `attention_mask=None` and these `position_ids`:
    they detect the restarts (masking_utils.find_packed_sequence_indices). Trailing padding is never seen
    by a causal model and has no labels, so dropping the mask is safe. Bidirectional models have no such
    path, so packed mlm rows attend across molecules; masking and labels stay per token and are correct.
    """
    masked = objective(family) == "mlm"  # llama collates as clm, modernbert as mlm
    if not ids:
        raise ValueError("collate needs at least one sequence")
    if packing and max_seq_len is None:
        raise ValueError("packing needs max_seq_len (the row length)")
    rows = _pack(ids, max_seq_len) if packing and max_seq_len is not None else [[seq] for seq in ids]
    lengths = np.array([len(seq) for seq in ids], dtype=np.int64)  # per molecule
    row_lengths = np.array([sum(len(seq) for seq in row) for row in rows], dtype=np.int64)
    n_rows, width = len(rows), _padded_length(int(row_lengths.max()), max_seq_len)

    real = np.arange(width) < row_lengths[:, None]  # (B, T); row-major order = the molecules in order
    input_ids = np.full((n_rows, width), pad_id, dtype=np.int64)
    input_ids[real] = np.concatenate([np.asarray(seq, dtype=np.int64) for seq in ids])
    batch = {"input_ids": input_ids, "attention_mask": real.astype(np.int64)}

    if packing:
        starts = np.cumsum(lengths) - lengths  # flat offset of each molecule among the real tokens
        offsets = np.arange(int(lengths.sum())) - np.repeat(starts, lengths)
        position_ids = np.arange(width) - row_lengths[:, None]  # padding: its own run from 0
        position_ids[real] = offsets
        batch["position_ids"] = position_ids

    tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
    if masked:
        if mask_seed is not None:
            tensors["input_ids"], tensors["labels"] = mask_tokens(
                tensors["input_ids"], tensors["attention_mask"], special_ids, mask_id, vocab_size, mlm_probability,
                mask_seed,
            )  # fmt: skip
        return tensors
    else:
        labels = np.where(real, input_ids, IGNORE_INDEX)
        if packing:  # no loss on predicting a molecule's [BOS] from the previous molecule's [EOS]
            flat_labels = labels[real]
            flat_labels[starts] = IGNORE_INDEX
            labels[real] = flat_labels
        tensors["labels"] = torch.from_numpy(labels)
    return tensors


@functools.lru_cache(maxsize=8)
def _id_tensors(special_ids: tuple[int, ...], vocab_size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The special ids and the ordinary ones (a random replacement's choices) on `device`, made once, not per
    batch (on a GPU each would be a host-to-device copy)."""
    ordinary = np.setdiff1d(np.arange(vocab_size), special_ids)
    return torch.as_tensor(special_ids, dtype=torch.int64, device=device), torch.as_tensor(ordinary, device=device)


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    special_ids: Sequence[int],
    mask_id: int,
    vocab_size: int,
    probability: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking (Devlin et al. 2019) with torch on the tensors' device: pick `probability` of the non-special
    tokens; 80 % -> [MASK], 10 % -> a random non-special token, 10 % unchanged. At least one token per batch is
    picked, so the loss is never an empty mean. A torch generator on that device seeded with `seed` draws every
    choice, so a batch gets the same masks wherever it is masked on one kind of device (CPU and CUDA generators
    differ). No host synchronisation: the at-least-one rule is a tensor operation, not a branch."""
    device = input_ids.device
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    specials, ordinary = _id_tensors(tuple(special_ids), vocab_size, device)
    candidates = attention_mask.bool() & ~torch.isin(input_ids, specials)  # (B, T)
    picked = candidates & (torch.rand(input_ids.shape, generator=g, device=device) < probability)
    # a batch with nothing picked gets its candidate of the highest random score (a no-op when one is picked)
    scores = torch.where(candidates, torch.rand(input_ids.shape, generator=g, device=device), -1.0).flatten()
    none = ~picked.any() & candidates.any()
    best = scores.argmax().unsqueeze(0)
    flat = picked.flatten()
    picked = flat.scatter(0, best, flat.gather(0, best) | none.unsqueeze(0)).view(input_ids.shape)
    labels = torch.where(picked, input_ids, IGNORE_INDEX)
    action = torch.rand(input_ids.shape, generator=g, device=device)
    random = ordinary[torch.randint(len(ordinary), input_ids.shape, generator=g, device=device)]
    masked = torch.where(picked & (action < 0.8), mask_id, input_ids)
    masked = torch.where(picked & (action >= 0.8) & (action < 0.9), random, masked)
    return masked, labels


# ---------------------------------------------------------------------------------------------
# from a stream of encoded molecules to batches (shared by the local and the Ray path)


def _groups(seqs: Iterable[Sequence[int]], micro_batch_size: int, packing: bool, max_seq_len: int):
    """Molecules per batch: `micro_batch_size` of them, or with packing as many as next-fit puts in
    `micro_batch_size` rows (the rows `collate` rebuilds with the same `_next_fit`). The last may be short."""
    rows = _next_fit(seqs, max_seq_len) if packing else ([seq] for seq in seqs)
    group: list[Sequence[int]] = []
    n_rows = 0
    for row in rows:
        if n_rows == micro_batch_size:
            yield group
            group, n_rows = [], 0
        group.extend(row)
        n_rows += 1
    if group:
        yield group


def _collated(
    seqs: Iterable[Sequence[int]],
    tokenizer: PreTrainedTokenizerFast,
    family: Family,
    micro_batch_size: int,
    max_seq_len: int,
    seed: int,
    epoch: int,
    mlm_probability: float,
    packing: bool,
    length_buckets: bool = False,
    defer_masking: bool = False,
) -> Iterator[Batch]:
    """Batches of `seqs`; `defer_masking`: mlm batches left unmasked, each with its `mask_seed` (a 0-d tensor) for
    the Ray Train worker to mask on its device (`worker_batches`)."""
    args = collate_args(tokenizer)
    groups = (
        _length_buckets(seqs, micro_batch_size, seed, epoch)
        if length_buckets and not packing
        else _groups(seqs, micro_batch_size, packing, max_seq_len)
    )
    for group in groups:
        mask_seed = batch_seed(seed, epoch, group)
        batch = collate(group, family, **args, mlm_probability=mlm_probability, packing=packing,
                        mask_seed=None if defer_masking else mask_seed, max_seq_len=max_seq_len)  # fmt: skip
        if defer_masking and "labels" not in batch:
            batch["mask_seed"] = torch.tensor(mask_seed)
        yield batch


def bucket_window(micro_batch_size: int) -> int:
    """Molecules per length-bucketing window: whole micro-batches, about ENCODE_ROWS (one Ray map call)."""
    return micro_batch_size * max(1, ENCODE_ROWS // micro_batch_size)


def _length_buckets(seqs: Iterable[Sequence[int]], micro_batch_size: int, seed: int, epoch: int):
    """Micro-batches of molecules of about the same length, so little of a batch is padding (HF's
    group_by_length): the (shuffled) stream is cut into windows of `bucket_window` molecules, each window
    sorted by length (stably) and cut into micro-batches, and the window's micro-batches are dealt in an order
    seeded by (seed, epoch, the window's ids), so no window goes from short to long molecules. Every molecule
    is in exactly one batch; only the stream's last window can hold a short batch."""
    window = bucket_window(micro_batch_size)
    it = iter(seqs)
    while chunk := list(itertools.islice(it, window)):
        ordered = sorted(chunk, key=len)
        groups = [ordered[i : i + micro_batch_size] for i in range(0, len(ordered), micro_batch_size)]
        for k in batch_rng(seed, epoch, chunk).permutation(len(groups)):
            yield groups[k]


# ---------------------------------------------------------------------------------------------
# the plain path: pyarrow + numpy, no Ray


def _as_tokenizer(tokenizer: PreTrainedTokenizerFast | str | Path) -> PreTrainedTokenizerFast:
    """A tokenizer object, or the directory `engine.tokenizer` saved one to (runs/<sweep>/data/tokenizer/)."""
    if isinstance(tokenizer, (str, Path)):
        from clmscale.engine.tokenizer import load_tokenizer

        return load_tokenizer(tokenizer)
    return tokenizer


def read_smiles(shard_paths: Sequence[str | Path]) -> list[str]:
    """The `smiles` column of the shards, in the order given."""
    out: list[str] = []
    for path in shard_paths:
        names = pq.read_schema(path).names
        if SMILES_COLUMN not in names:
            raise ValueError(f"{path}: no '{SMILES_COLUMN}' column (found {names}); shards come from prepare")
        out.extend(pq.read_table(path, columns=[SMILES_COLUMN]).column(SMILES_COLUMN).to_pylist())
    return out


def _randomized_views(smiles: Sequence[str], k: int, seed: int, epoch: int) -> list[str]:
    """The k random SMILES of every molecule of `smiles`, in a seeded random order (views of one molecule are not
    kept together, so they rarely share a batch)."""
    views = [v for vs in randomized_smiles(smiles, k, seed, epoch) for v in vs]
    order = np.random.default_rng([seed, epoch, len(views)]).permutation(len(views))
    return [views[i] for i in order]


def _encoded(smiles: Sequence[str], tokenizer, family: Family, max_seq_len: int) -> Iterator[list[int]]:
    for start in range(0, len(smiles), ENCODE_ROWS):
        yield from encode(smiles[start : start + ENCODE_ROWS], tokenizer, family, max_seq_len)


class TokenIds:
    """The `ids` column of pre-tokenised shards (prepare's token ids, no special tokens) as one flat array and
    offsets: molecule i is flat[offsets[i]:offsets[i + 1]]. A uint8 / uint16 array, not a Python list per molecule."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat, self.offsets = flat, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def wrapped(self, indices: Iterable[int], open_id: int, close_id: int, max_seq_len: int) -> Iterator[Any]:
        """Molecules `indices` as `encode` gives them: [open, body cut to max_seq_len - 2, close], int64."""
        body = max_seq_len - 2
        for i in indices:
            start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
            out = np.empty(min(stop - start, body) + 2, dtype=np.int64)
            out[0], out[-1] = open_id, close_id
            out[1:-1] = self.flat[start : start + len(out) - 2]
            yield out


def read_ids(shard_paths: Sequence[str | Path], tokenizer: PreTrainedTokenizerFast | None = None) -> TokenIds | None:
    """The `ids` column of the shards, in the order given; None when a shard has none (shards of an older prepare:
    callers encode the SMILES instead). With `tokenizer`, ids it does not have are an error naming the shard."""
    chunks = []
    for path in shard_paths:
        if IDS_COLUMN not in pq.read_schema(path).names:
            return None
        column = pq.read_table(path, columns=[IDS_COLUMN]).column(IDS_COLUMN).combine_chunks()
        if tokenizer is not None and len(column.values) and int(pc.max(column.values).as_py()) >= len(tokenizer):
            raise ValueError(
                f"{path}: token id {pc.max(column.values).as_py()} is not in the tokenizer ({len(tokenizer)} ids);"
                " the shards and the tokenizer come from different prepares"
            )
        chunks.append(column)
    lengths = np.concatenate([np.diff(c.offsets.to_numpy()) for c in chunks]) if chunks else np.zeros(0, np.int64)
    flat = np.concatenate([c.values.to_numpy() for c in chunks]) if chunks else np.zeros(0, np.uint8)
    return TokenIds(flat, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))


def _molecules(
    shard_paths: Sequence[str | Path], tokenizer, family: Family, max_seq_len: int, n_molecules: int | None = None
) -> tuple[int, Callable[[Any], Iterator[Any]]]:
    """(number of molecules, a function from molecule indices to their wrapped token ids): read from the shards'
    `ids` column when prepare wrote one, else encoded from the SMILES. `n_molecules`: only the first n."""
    ids = read_ids(shard_paths, tokenizer)
    if ids is not None:
        open_id, close_id = _wrap_ids(tokenizer, family)
        n = len(ids) if n_molecules is None else min(len(ids), n_molecules)
        return n, lambda indices: ids.wrapped(indices, open_id, close_id, max_seq_len)
    smiles = read_smiles(shard_paths)[:n_molecules]
    return len(smiles), lambda indices: _encoded([smiles[i] for i in indices], tokenizer, family, max_seq_len)


def local_batches(
    shard_paths: Sequence[str | Path],
    tokenizer: PreTrainedTokenizerFast | str | Path,
    family: Family,
    micro_batch_size: int,
    max_seq_len: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    mlm_probability: float = 0.15,
    packing: bool = False,
    rank: int = 0,
    world_size: int = 1,
    n_molecules: int | None = None,
    length_buckets: bool = False,
    randomized: int = 0,
) -> Iterator[Batch]:
    """One epoch of batches without Ray: the standalone loop, or one rank of a torch.distributed run.

    The shuffle is a permutation seeded by (seed, epoch), the same on every rank; rank r takes every
    world_size-th molecule of it from r on, cut to an equal count per rank (at most world_size - 1 molecules
    of the epoch dropped), so ranks are disjoint and, without packing, run the same number of steps. With
    packing the number of rows per rank can differ by one batch: stop the loop on a step count.
    Call it again with epoch + 1 for the next epoch. The shards' token ids are read, not encoded again (shards
    without an `ids` column: their SMILES are held and encoded per batch).
    `n_molecules`: only the first n molecules of the shards, in the order given (budget.unique_molecules).
    `length_buckets` (train.length_buckets, not with packing): batches of molecules of about one length.
    `randomized` (data.randomized_smiles): each of this rank's molecules `randomized` times, each a random SMILES
    of it (`randomized_smiles`), encoded here; the views in a seeded random order.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) (got rank: {rank} and world_size: {world_size})")
    tokenizer = _as_tokenizer(tokenizer)
    if randomized:
        n, molecules = len(smiles := read_smiles(shard_paths)[:n_molecules]), None
    else:
        n, molecules = _molecules(shard_paths, tokenizer, family, max_seq_len, n_molecules)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    per_rank = n // world_size
    mine = order[rank : per_rank * world_size : world_size]
    if molecules is None:
        views = _randomized_views([smiles[i] for i in mine], randomized, seed, epoch)
        seqs: Iterable[Any] = _encoded(views, tokenizer, family, max_seq_len)
    else:
        seqs = molecules(mine)
    yield from _collated(seqs, tokenizer, family, micro_batch_size, max_seq_len, seed, epoch,
                         mlm_probability, packing, length_buckets)  # fmt: skip


def validation_batches(
    val_shard_paths: Sequence[str | Path],
    tokenizer: PreTrainedTokenizerFast | str | Path,
    family: Family,
    n_batches: int,
    micro_batch_size: int,
    max_seq_len: int,
    seed: int = 0,
    mlm_probability: float = 0.15,
    packing: bool = False,
) -> list[Batch]:
    """A fixed list: the first molecules of the validation shards in file order, masks from a fixed seed.

    It depends only on the files and these arguments (not on the trial seed), so every run of a sweep
    is scored on the same tokens and the same masks, and validation losses are comparable.
    """
    tokenizer = _as_tokenizer(tokenizer)
    n, molecules = _molecules(val_shard_paths, tokenizer, family, max_seq_len)
    seqs = molecules(range(n))
    stream = _collated(seqs, tokenizer, family, micro_batch_size, max_seq_len, seed, 0, mlm_probability, packing)
    batches = list(itertools.islice(stream, n_batches))
    if len(batches) < n_batches:
        logger.warning("validation split holds %d batches, %d asked for", len(batches), n_batches)
    return batches


def trial_validation_batches(
    rd: RunDir,
    trial: Trial,
    max_seq_len: int,
    *,
    n_batches: int | None = None,
    tokenizer: PreTrainedTokenizerFast | str | Path | None = None,
) -> list[Batch]:
    """The fixed validation batches a trial is scored on: its own micro-batch size, masking and packing
    (rung overrides applied), the first `n_batches` (default `train.val_batches`) of them. The sweep's
    val_loss and the analysis' Hessians and landscapes of a checkpoint read the same tokens."""
    assert trial.train.micro_batch_size != "auto"  # a started trial's settings are concrete (trial.json)
    return validation_batches(
        rd.data_of(trial).shard_paths("val"),
        tokenizer if tokenizer is not None else rd.data_of(trial).tokenizer,
        family=trial.family,
        n_batches=trial.train.val_batches if n_batches is None else n_batches,
        micro_batch_size=trial.train.micro_batch_size,
        max_seq_len=max_seq_len,
        mlm_probability=trial.mlm_probability or 0.0,  # None: a clm family, which masks nothing
        packing=trial.train.packing,
    )


# ---------------------------------------------------------------------------------------------
# the Ray path: Ray Data reads, shuffles, encodes and collates on its own CPUs; workers only unpack
#
# Epochs in Ray Train V2 (ray 2.60): the trainer gets this dataset once (`datasets={"train": ds}`) and
# splits it with `streaming_split(world_size, equal=True)` (ray.train.DataConfig.configure). A row of the
# dataset is one whole micro-batch, so the split deals out batches: every worker gets the same number of
# batches per epoch (at most world_size - 1 dropped), none twice, and so the same number of steps.
# `ray.train.get_dataset_shard("train")` returns the worker's DataIterator; each call of its
# `iter_batches` / `iter_torch_batches` executes the whole pipeline again, so one call is one epoch (all
# workers must start it: there is a barrier at the start of each pass). Ray counts the executions of a
# dataset (DataContext._execution_idx): the shuffle reseeds from (seed, execution) through
# RandomSeedConfig(reseed_after_execution=True), and the masks use the same count as their epoch. A fresh
# trainer therefore repeats epoch 0, 1, ... exactly; executing the dataset on the driver first (take,
# count, show) shifts that count, and a worker group that Ray Train restarts after a failure gets a fresh
# copy of the dataset that counts from 0 again (worker_batches warns when the counts disagree).


BATCH_COLUMNS = ("input_ids", "attention_mask", "labels", "position_ids")


def _make_batches(
    batch: dict[str, np.ndarray],
    tokenizer,
    family: Family,
    micro_batch_size: int,
    max_seq_len: int,
    seed: int,
    mlm_probability: float,
    packing: bool,
    length_buckets: bool = False,
    randomized: int = 0,
) -> dict[str, np.ndarray]:
    """map_batches body: SMILES -> whole micro-batches, one per output row (flattened, with its shape)."""
    from ray.data import DataContext

    # the pass of the pipeline this task belongs to: the same count RandomSeedConfig reseeds the shuffle with
    epoch = getattr(DataContext.get_current(), "_execution_idx", 0)
    seqs: Sequence[Sequence[int]]
    if IDS_COLUMN in batch:  # pre-tokenised shards: a read, no encoding
        column = batch[IDS_COLUMN]
        flat = TokenIds(np.concatenate(column) if len(column) else np.zeros(0, np.int64),
                        np.concatenate([[0], np.cumsum([len(x) for x in column])]))  # fmt: skip
        seqs = list(flat.wrapped(range(len(column)), *_wrap_ids(tokenizer, family), max_seq_len))
    elif randomized:  # data.randomized_smiles: k random SMILES per molecule, this pass's
        seqs = encode(_randomized_views(batch[SMILES_COLUMN].tolist(), randomized, seed, epoch), tokenizer, family,
                      max_seq_len)  # fmt: skip
    else:
        seqs = encode(batch[SMILES_COLUMN].tolist(), tokenizer, family, max_seq_len)
    made = list(_collated(seqs, tokenizer, family, micro_batch_size, max_seq_len, seed, epoch,
                          mlm_probability, packing, length_buckets, defer_masking=True))  # fmt: skip
    out = {"shape": np.array([b["input_ids"].shape for b in made], dtype=np.int64), "epoch": np.full(len(made), epoch)}
    if made and "mask_seed" in made[0]:  # mlm: the worker masks each batch on its device with this seed
        out["mask_seed"] = np.array([int(b["mask_seed"]) for b in made], dtype=np.int64)
    for name in [n for n in (BATCH_COLUMNS if packing else BATCH_COLUMNS[:3]) if not made or n in made[0]]:
        column = np.empty(len(made), dtype=object)
        column[:] = [b[name].numpy().ravel() for b in made]  # 1-D per row: one Arrow type for every width
        out[name] = column
    return out


def train_dataset(
    shard_paths: Sequence[str | Path],
    tokenizer: PreTrainedTokenizerFast | str | Path,
    family: Family,
    micro_batch_size: int,
    max_seq_len: int,
    seed: int,
    mlm_probability: float = 0.15,
    packing: bool = False,
    shuffle: bool = True,
    n_molecules: int | None = None,
    length_buckets: bool = False,
    randomized_smiles: int = 0,
) -> ray.data.Dataset:
    """The training stream for Ray Train: read -> shuffle per epoch -> (encode) + collate, one batch per row.

    Shards with prepare's `ids` column are read as token ids and only wrapped and collated; older shards are encoded.

    Pass it as `datasets={"train": ds}` to a TorchTrainer; workers read their shard with `worker_batches`.
    Sets `engine.raydata`'s settings on the current DataContext (Train V2 copies the driver's DataContext when
    the trainer is built): batches in stream order, so a rerun repeats every batch, and a scheduling loop that
    does not spin while the trainer holds the stream back.
    Ray Data needs CPUs left over by the train workers (notes/ray-deepspeed-on-cpu.md), or it stalls.
    `n_molecules`: only the first n molecules of the shards, in the order given (budget.unique_molecules); with
    `preserve_order` the limit takes the same ones at every pass. `length_buckets`: each map call (one
    bucketing window, as in `local_batches`) makes batches of molecules of about one length.
    `randomized_smiles` (data.randomized_smiles): the SMILES are read, not the ids, and each map call writes each
    of its molecules k times in a random atom order (drawn anew each pass) and encodes them.
    """
    import ray.data
    from ray.data import RandomSeedConfig

    from clmscale.engine import raydata

    tokenizer = _as_tokenizer(tokenizer)
    _wrap_ids(tokenizer, family)  # fail here, on the driver, not inside a Ray task
    raydata.configure()
    # the token ids when prepare wrote them (every shard of one prepare has them), else the SMILES to encode
    pretokenised = shard_paths and IDS_COLUMN in pq.read_schema(shard_paths[0]).names
    column = IDS_COLUMN if pretokenised and not randomized_smiles else SMILES_COLUMN
    if n_molecules is None:
        ds = ray.data.read_parquet([str(p) for p in shard_paths]).select_columns([column])
    else:
        # Only the shards that hold the first n molecules are read. Their read tasks take no CPU: once the
        # limit is reached, a read task that has more rows waits on backpressure until the pass ends, and
        # holding a CPU it starved the shuffle's tasks behind it (a trial hung on a 2-CPU cluster).
        ds = ray.data.read_parquet(_prefix_shards(shard_paths, n_molecules), num_cpus=0)
        ds = ds.select_columns([column]).limit(n_molecules)
    if shuffle:
        # a full shuffle of short SMILES strings is cheap next to training; block order alone would
        # keep each shard's row groups together
        ds = ds.random_shuffle(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    # exact-size blocks, so every map call gets whole micro-batches: the only short batch is the epoch's
    # last (with packing, also the last of each call, which holds PACK_FACTOR times more molecules)
    per_call = bucket_window(micro_batch_size) * (PACK_FACTOR if packing else 1)
    ds = ds.repartition(target_num_rows_per_block=per_call, strict=True)
    return ds.map_batches(
        _make_batches,  # type: ignore[arg-type]  # its extra arguments arrive through fn_kwargs
        batch_format="numpy",
        batch_size=per_call,
        fn_kwargs={
            "tokenizer": tokenizer,
            "family": family,
            "micro_batch_size": micro_batch_size,
            "max_seq_len": max_seq_len,
            "seed": seed,
            "mlm_probability": mlm_probability,
            "packing": packing,
            "length_buckets": length_buckets,
            "randomized": randomized_smiles,
        },  # fmt: skip
    )


def _prefix_shards(shard_paths: Sequence[str | Path], n_molecules: int) -> list[str]:
    """The first shards, in order, that together hold at least `n_molecules` rows (from the Parquet footers)."""
    out, rows = [], 0
    for path in shard_paths:
        if rows >= n_molecules:
            break
        out.append(str(path))
        rows += pq.read_metadata(path).num_rows
    return out


@dataclass(frozen=True)
class Masking:
    """What a Train worker needs to mask mlm batches itself (`mask_tokens`): the tokenizer's ids and the ratio."""

    special_ids: tuple[int, ...]
    mask_id: int
    vocab_size: int
    probability: float

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerFast, probability: float) -> Masking:
        args = collate_args(tokenizer)
        return cls(tuple(args["special_ids"]), args["mask_id"], args["vocab_size"], probability)


def worker_batches(
    shard: ray.data.DataIterator | ray.data.Dataset,
    epoch: int,
    masking: Masking | None = None,
    device: torch.device | str | None = None,
) -> Iterator[Batch]:
    """One epoch of this worker's batches from its shard (`ray.train.get_dataset_shard("train")`).

    Ray prefetches two blocks ahead. mlm streams arrive unmasked, each batch with its seed: they are moved to
    `device` (default: stay on the CPU; a CUDA device through pinned memory, the copy asynchronous) and masked
    there (`mask_tokens` with `masking`), so the masking runs on the worker's GPU when it has one and the data
    CPUs only read and pad. On the CPU the masks equal `local_batches`' for the same batch.

    Call it once per epoch: each call is a new pass over the dataset (see the note above). `epoch` is the
    caller's count; when it differs from the pipeline's own (a restarted worker group starts again at 0,
    a driver-side `take` adds one) a warning says so: the order is still a fresh shuffle, not the
    one a run from scratch would give at that epoch.
    """
    warned = False
    # batch_size=None: the blocks as they come, one micro-batch per row (ray's stubs want an int)
    for rows in shard.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):  # type: ignore[arg-type]
        for i, (n_rows, width) in enumerate(rows["shape"]):
            if rows["epoch"][i] != epoch and not warned:
                logger.warning("batches of pipeline pass %d read as epoch %d", rows["epoch"][i], epoch)
                warned = True
            batch = {name: torch.from_numpy(np.array(rows[name][i], dtype=np.int64).reshape(n_rows, width))
                     for name in BATCH_COLUMNS if name in rows}  # fmt: skip
            if device is not None and torch.device(device).type == "cuda":  # pinned, so the copy overlaps the step
                batch = {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
            elif device is not None:
                batch = {k: v.to(device) for k, v in batch.items()}
            if "mask_seed" in rows:
                if masking is None:
                    raise ValueError("an mlm stream's batches are masked by the worker: pass masking=Masking.of(...)")
                batch["input_ids"], batch["labels"] = mask_tokens(
                    batch["input_ids"], batch["attention_mask"], masking.special_ids, masking.mask_id,
                    masking.vocab_size, masking.probability, int(rows["mask_seed"][i]),
                )  # fmt: skip
            yield batch
