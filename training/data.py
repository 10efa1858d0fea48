"""Shards to batches: the WebDataset side of training (shard contract v1, written by the ingest flow).

A sample is one window of turns. It becomes one CSM sequence of positions, each with 32 audio codebooks and a
text column: per turn its text tokens, then its audio frames, then one all-zero end-of-audio frame. Batches are
length-bucketed and right-padded, with an attention mask.

Data order is a pure function of (seed, epoch, rank, worker): shards are shuffled per epoch, split over ranks and
DataLoader workers, samples shuffled in a seeded buffer, bucketed, and the batches shuffled. The main process
reads the workers round-robin itself (not in the DataLoader's order), so a loader position (per-worker batch
counts plus the next worker) resumes exactly: each worker skips its consumed batches before decoding any npy.
Nothing is unpickled: .npy members go through np.load(allow_pickle=False).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import random
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from training.config import TrainConfig

SCHEMA_VERSION = 1
NUM_CODEBOOKS = 32
CODEBOOK_SIZE = 2048
# Position kinds in a batch's `kinds` tensor.
PAD, TEXT, AUDIO, EOS = 0, 1, 2, 3
PAD_MULTIPLE = 8  # padded length rounds up to this: friendlier shapes for GPU kernels

Batch = dict[str, Any]


class OutOfData(Exception):
    """The configured epochs are used up: no batch is left for this rank."""


@dataclass(frozen=True)
class Manifest:
    """The parts of a dataset's manifest.json that training reads."""

    uri: str
    dataset: str
    shard_urls: list[str]
    shard_samples: list[int]
    shard_sha256: list[str]
    raw: dict[str, Any] = field(repr=False)

    @property
    def total_samples(self) -> int:
        return sum(self.shard_samples)


def _join(base_uri: str, rel: str) -> str:
    if "://" in base_uri:
        return posixpath.join(posixpath.dirname(base_uri), rel)
    return os.path.join(os.path.dirname(os.path.abspath(base_uri)), rel)


def load_manifest(uri: str) -> Manifest:
    """Read manifest.json from a local path or fsspec URI; shard paths resolve against its directory."""
    with fsspec.open(uri, "r") as f:
        raw = json.load(f)
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{uri}: schema_version {raw.get('schema_version')!r}, training reads {SCHEMA_VERSION}")
    shards = raw.get("shards") or []
    if not shards:
        raise ValueError(f"{uri}: the manifest lists no shards")
    return Manifest(
        uri=uri,
        dataset=str(raw.get("dataset", "")),
        shard_urls=[_join(uri, s["path"]) for s in shards],
        shard_samples=[int(s.get("samples", 0)) for s in shards],
        shard_sha256=[str(s.get("sha256", "")) for s in shards],
        raw=raw,
    )


def verify_checksums(manifest: Manifest) -> None:
    """Raise ValueError for the first shard whose sha256 differs from the manifest's."""
    for url, want in zip(manifest.shard_urls, manifest.shard_sha256, strict=True):
        h = hashlib.sha256()
        with fsspec.open(url, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        if want and h.hexdigest() != want:
            raise ValueError(f"{url}: sha256 {h.hexdigest()} does not match the manifest's {want}")


def is_eval(recording_id: str, fraction: float) -> bool:
    """Held-out split by recording: every window of a recording lands on the same side."""
    h = int.from_bytes(hashlib.sha1(recording_id.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def sequence_from_sample(
    meta: dict[str, Any],
    text_ids: np.ndarray,
    codes: np.ndarray,
    *,
    max_positions: int,
    text_vocab_size: int,
    where: str = "",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One sample in CSM layout: (text ids (T,), codes (T, 32), kinds (T,)); contract violations raise ValueError.

    Per turn: text_tokens text positions, frames audio positions, one end-of-audio frame (all-zero codes).
    """
    turns = meta.get("turns") or []
    if not turns:
        raise ValueError(f"{where}: sample has no turns")
    n_text = np.array([int(t["text_tokens"]) for t in turns])
    n_frames = np.array([int(t["frames"]) for t in turns])
    if (n_text < 0).any() or (n_frames < 0).any():
        raise ValueError(f"{where}: negative text_tokens or frames")
    n = int((n_text + n_frames + 1).sum())
    if n != int(meta.get("n_positions", n)):
        raise ValueError(f"{where}: n_positions {meta.get('n_positions')} but the turns add up to {n}")
    if n > max_positions:
        raise ValueError(f"{where}: {n} positions, more than max_positions {max_positions}")
    if n_text[0] < 1:
        raise ValueError(f"{where}: the first turn has no text tokens (position 0 must be text)")
    if not np.issubdtype(codes.dtype, np.integer) or codes.shape != (int(n_frames.sum()), NUM_CODEBOOKS):
        raise ValueError(f"{where}: codes {codes.dtype} {codes.shape}, want integer ({n_frames.sum()}, {NUM_CODEBOOKS})")
    if not np.issubdtype(text_ids.dtype, np.integer) or text_ids.shape != (int(n_text.sum()),):
        raise ValueError(f"{where}: text ids {text_ids.dtype} {text_ids.shape}, want integer ({n_text.sum()},)")
    if codes.size and (codes.min() < 0 or codes.max() >= CODEBOOK_SIZE):
        raise ValueError(f"{where}: codes outside 0..{CODEBOOK_SIZE - 1}")
    if text_ids.size and (text_ids.min() < 0 or text_ids.max() >= text_vocab_size):
        raise ValueError(f"{where}: text ids outside the model's text vocab ({text_vocab_size})")

    per_turn = np.stack([n_text, n_frames, np.ones_like(n_text)], axis=1).reshape(-1)
    kinds = np.repeat(np.tile(np.array([TEXT, AUDIO, EOS], np.uint8), len(turns)), per_turn)
    text = np.zeros(n, np.int64)
    text[kinds == TEXT] = text_ids
    seq_codes = np.zeros((n, NUM_CODEBOOKS), np.int16)  # EOS frames stay all-zero, as CSM's codebook_eos_token_id
    seq_codes[kinds == AUDIO] = codes
    return text, seq_codes, kinds


def collate(seqs: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Batch:
    """Right-pad sequences to a common length (a multiple of PAD_MULTIPLE); codes stay int16 until the device."""
    longest = max(len(k) for _, _, k in seqs)
    t = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    b = len(seqs)
    text = torch.zeros(b, t, dtype=torch.long)
    codes = torch.zeros(b, t, NUM_CODEBOOKS, dtype=torch.int16)
    kinds = torch.zeros(b, t, dtype=torch.uint8)
    for i, (tx, cd, kd) in enumerate(seqs):
        n = len(kd)
        text[i, :n] = torch.from_numpy(tx)
        codes[i, :n] = torch.from_numpy(cd)
        kinds[i, :n] = torch.from_numpy(kd)
    return {"text": text, "codes": codes, "kinds": kinds, "attention_mask": (kinds != PAD).long()}


def _open_shards(urls: Iterable[str]) -> Iterator[dict[str, Any]]:
    # fsspec instead of webdataset's gopen: any fsspec URI (s3://, gs://, hf://, file paths) works the same
    for url in urls:
        with fsspec.open(url, "rb") as stream:
            yield {"url": url, "stream": stream}


def _load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def resolve_split_by(split_by: str, n_shards: int, world_size: int, num_workers: int) -> str:
    """`auto` splits whole shards when every reader (rank x worker) gets at least one, else samples."""
    if split_by != "auto":
        return split_by
    return "shards" if n_shards >= world_size * max(1, num_workers) else "samples"


class ShardDataset(IterableDataset):
    """One epoch of one rank's batches; each DataLoader worker yields its share, then an end marker."""

    def __init__(
        self,
        urls: list[str],
        cfg: TrainConfig,
        *,
        split: str,
        epoch: int,
        rank: int,
        world_size: int,
        text_vocab_size: int,
        shuffle: bool,
        skip: list[int] | None = None,
    ) -> None:
        self.urls, self.cfg, self.split, self.epoch = list(urls), cfg, split, epoch
        self.rank, self.world_size, self.text_vocab_size = rank, world_size, text_vocab_size
        self.shuffle, self.skip = shuffle, skip
        self.split_by = resolve_split_by(cfg.split_by, len(self.urls), world_size, cfg.num_workers)

    def _samples(self, worker: int, n_workers: int) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        reader, readers = self.rank * n_workers + worker, self.world_size * n_workers
        urls = list(self.urls)
        if self.shuffle:  # same permutation on every rank and worker, new each epoch
            random.Random(f"{cfg.seed}/shards/{self.epoch}").shuffle(urls)
        if self.split_by == "shards":
            urls = urls[reader::readers]
        files = wds.tariterators.tar_file_expander(_open_shards(urls))
        grouped = wds.tariterators.group_by_keys(files, suffixes={"json", "codes.npy", "text.npy"})
        for i, raw in enumerate(grouped):
            if self.split_by == "samples" and i % readers != reader:
                continue
            where = f"{raw.get('__url__')}:{raw['__key__']}"
            missing = {"json", "codes.npy", "text.npy"} - raw.keys()
            if missing:
                raise ValueError(f"{where}: missing members {sorted(missing)}")
            meta = json.loads(raw["json"])
            if is_eval(str(meta["recording_id"]), cfg.eval_fraction) != (self.split == "eval"):
                continue
            n = int(meta["n_positions"])
            yield {"key": raw["__key__"], "where": where, "meta": meta, "n": n,
                   "codes": raw["codes.npy"], "text": raw["text.npy"]}  # fmt: skip

    def _groups(self, samples: Iterator[dict[str, Any]], rng: random.Random | None) -> Iterator[list[dict[str, Any]]]:
        # length bucketing: sort a window of samples by length, cut into batches, shuffle the batches
        bs, window = self.cfg.batch_size, self.cfg.batch_size * self.cfg.bucket_batches
        buf: list[dict[str, Any]] = []

        def flush() -> list[list[dict[str, Any]]]:
            buf.sort(key=lambda s: s["n"])
            groups = [buf[i : i + bs] for i in range(0, len(buf), bs)]
            if rng is not None:
                rng.shuffle(groups)
            return groups

        for s in samples:
            buf.append(s)
            if len(buf) == window:
                yield from flush()
                buf = []
        if buf:
            yield from flush()

    def _decode(self, s: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return sequence_from_sample(
            s["meta"],
            _load_npy(s["text"]),
            _load_npy(s["codes"]),
            max_positions=self.cfg.max_positions,
            text_vocab_size=self.text_vocab_size,
            where=s["where"],
        )

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = self.rank * n_workers + worker
        samples = self._samples(worker, n_workers)
        rng = None
        if self.shuffle:
            rng = random.Random(f"{self.cfg.seed}/batches/{self.epoch}/{reader}")
            samples = wds.filters.shuffle(self.cfg.shuffle_buffer, self.cfg.shuffle_buffer, rng=rng)(samples)
        skip = self.skip[worker] if self.skip else 0
        for i, group in enumerate(self._groups(samples, rng)):
            if i < skip:  # resume: consumed before the checkpoint; never decode its arrays
                continue
            batch = collate([self._decode(s) for s in group])
            batch["keys"] = [s["key"] for s in group]
            batch["worker"] = worker
            yield batch
        yield {"worker": worker, "end": True}


class Loader:
    """One rank's training batches across epochs, with a position that a checkpoint can store and resume.

    `next()` raises OutOfData once `cfg.epochs` epochs are used up.
    """

    def __init__(
        self,
        manifest: Manifest,
        cfg: TrainConfig,
        *,
        rank: int,
        world_size: int,
        text_vocab_size: int,
        pin_memory: bool = False,
        position: dict[str, Any] | None = None,
    ) -> None:
        self.manifest, self.cfg = manifest, cfg
        self.rank, self.world_size, self.text_vocab_size = rank, world_size, text_vocab_size
        self.pin_memory = pin_memory
        self.n_readers = max(1, cfg.num_workers)
        self.position = position or {"epoch": 0, "consumed": [0] * self.n_readers, "next_worker": 0}
        if len(self.position["consumed"]) != self.n_readers:
            raise ValueError("loader position was saved with a different num_workers")
        self._it: Iterator[Batch] | None = None
        self._buffers: list[deque[Batch]] = []
        self._done: list[bool] = []

    def state_dict(self) -> dict[str, Any]:
        """Where this rank is: epoch, batches consumed per worker, the worker whose batch comes next."""
        p = self.position
        return {"epoch": p["epoch"], "consumed": list(p["consumed"]), "next_worker": p["next_worker"]}

    def _start_epoch(self) -> None:
        ds = ShardDataset(
            self.manifest.shard_urls,
            self.cfg,
            split="train",
            epoch=self.position["epoch"],
            rank=self.rank,
            world_size=self.world_size,
            text_vocab_size=self.text_vocab_size,
            shuffle=True,
            skip=list(self.position["consumed"]),
        )
        nw = self.cfg.num_workers
        dl = DataLoader(ds, batch_size=None, num_workers=nw, pin_memory=self.pin_memory, prefetch_factor=4 if nw else None)
        self._it = iter(dl)
        self._buffers = [deque() for _ in range(self.n_readers)]
        self._done = [False] * self.n_readers

    def next(self) -> Batch:
        """The next batch for this rank; OutOfData when all epochs are done."""
        while True:
            p = self.position
            if p["epoch"] >= self.cfg.epochs:
                raise OutOfData(f"rank {self.rank}: all {self.cfg.epochs} epochs used up")
            if self._it is None:
                self._start_epoch()
            assert self._it is not None
            order = [(p["next_worker"] + i) % self.n_readers for i in range(self.n_readers)]
            w = next((w for w in order if self._buffers[w] or not self._done[w]), None)
            if w is None:  # every worker has finished this epoch
                self._it = None
                self.position = {"epoch": p["epoch"] + 1, "consumed": [0] * self.n_readers, "next_worker": 0}
                continue
            while not self._buffers[w] and not self._done[w]:
                try:
                    item = next(self._it)
                except StopIteration:
                    self._done = [True] * self.n_readers
                    break
                if item.get("end"):
                    self._done[item["worker"]] = True
                else:
                    self._buffers[item["worker"]].append(item)
            if self._buffers[w]:
                p["consumed"][w] += 1
                p["next_worker"] = (w + 1) % self.n_readers
                return self._buffers[w].popleft()


def eval_batches(
    manifest: Manifest, cfg: TrainConfig, *, rank: int, world_size: int, text_vocab_size: int
) -> list[Batch]:
    """This rank's held-out batches (at most cfg.eval_batches), read once in a fixed order."""
    ds = ShardDataset(
        manifest.shard_urls,
        cfg,
        split="eval",
        epoch=0,
        rank=rank,
        world_size=world_size,
        text_vocab_size=text_vocab_size,
        shuffle=False,
    )
    out: list[Batch] = []
    nw = cfg.num_workers
    for item in DataLoader(ds, batch_size=None, num_workers=nw, prefetch_factor=2 if nw else None):
        if item.get("end"):
            continue
        out.append(item)
        if len(out) >= cfg.eval_batches:
            break
    return out
