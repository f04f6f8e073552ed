"""Artifacts that prove what they are: content fingerprints for what a run reads (token stores, teacher caches,
teacher weights) and per-chunk checksums that catch a corrupted read before a step uses it.

- A data file is checksummed in chunks of CHUNK bytes (crc32 each, computed once when written). A reader asks for a
  byte range, gets the chunks covering it, and every one is checked: a flipped bit, a zeroed or overwritten region
  is CorruptData naming the file and the offset, and the run stops (exit 1) before the step uses it. Cost: the
  covering chunks' bytes and one crc32 pass over them (zlib: several GB/s).
- A fingerprint (sha256) names what an artifact holds: the digests of its files, computed when they were written,
  and what made it (tokenizer, teacher, the store it was computed over). A checkpoint records the fingerprints of
  its inputs; a resume over a changed input is refused before anything loads.
- Teacher weights are known by a sampled content hash (weights_fingerprint): every weight file's size and header
  and 16 spans of 64 KiB spread through it. Another model of the same shape differs in every span; reading 1 MiB per
  file instead of 15 GB keeps the check at start-up cheap. full=True hashes every byte.
"""
from __future__ import annotations

import hashlib
import json
import os
import zlib

import numpy as np

CHUNK = 1 << 16


class CorruptData(RuntimeError):
    """A read whose bytes do not match the checksums written with them: the message names the file and offset."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str, fsync: bool = False) -> tuple[int, str]:
    """(size, sha256) of a file read in full; fsync it too (Linux flushes a file's dirty pages through any
    descriptor)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
            size += len(block)
        if fsync:
            os.fsync(f.fileno())
    return size, h.hexdigest()


def chunk_sums(data: bytes | memoryview) -> np.ndarray:
    """One crc32 per CHUNK bytes of `data` (the last chunk may be shorter), uint32."""
    view = memoryview(data).cast("B")
    return np.fromiter((zlib.crc32(view[i:i + CHUNK]) for i in range(0, len(view), CHUNK)), dtype=np.uint32,
                       count=-(-len(view) // CHUNK))


def combine(parts: dict) -> str:
    """One fingerprint from named parts (strings, numbers, nested dicts), order-independent of the dict."""
    return sha256(json.dumps(parts, sort_keys=True, default=str).encode())


class CheckedFile:
    """A file read by byte ranges (pread), every read checked against its chunk checksums."""

    def __init__(self, path: str, sums: np.ndarray, size: int):
        actual = os.path.getsize(path)
        if actual != size:
            raise CorruptData(f"{path}: {actual} bytes, {size} when written (truncated or replaced): rebuild it")
        if len(sums) != -(-size // CHUNK):
            raise CorruptData(f"{path}: {len(sums)} chunk checksums for {size} bytes: its checksums do not belong to "
                              f"it; rebuild it")
        self.path, self.sums, self.size = path, sums, size
        self.fd = os.open(path, os.O_RDONLY)
        self.bytes_read = 0

    def pread(self, n: int, offset: int) -> bytes:
        """Bytes [offset, offset + n), read as whole chunks and checked."""
        if n <= 0:
            return b""
        first, last = offset // CHUNK, (offset + n - 1) // CHUNK
        start = first * CHUNK
        raw = os.pread(self.fd, min((last + 1) * CHUNK, self.size) - start, start)
        self.bytes_read += len(raw)
        got = chunk_sums(raw)
        want = self.sums[first:last + 1]
        if len(got) != len(want) or not np.array_equal(got, want):
            bad = first + int(np.flatnonzero(got != want[:len(got)])[0]) if len(got) == len(want) else last
            raise CorruptData(f"{self.path}: bytes {bad * CHUNK}-{(bad + 1) * CHUNK} do not match the checksum written "
                              f"with them (corrupted on disk or overwritten): restore the file, or build the store "
                              f"or cache it belongs to again")
        return raw[offset - start: offset - start + n]

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def check_whole(path: str, digest: str, what: str) -> bytes:
    """The bytes of a small file, refused unless their sha256 is `digest`."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CorruptData(f"{path} is missing ({what} lists it): restore it, or build it again") from None
    if sha256(data) != digest:
        raise CorruptData(f"{path}: its content does not match the digest recorded for {what} (corrupted or "
                          f"replaced): rebuild it")
    return data


WEIGHT_FILES = (".safetensors", ".bin", ".pt")
SAMPLES, SPAN = 16, 1 << 16


def weights_fingerprint(path: str, full: bool = False) -> str:
    """What a model checkpoint directory holds: its config.json, and for every weight file its name, size, first
    SPAN bytes (a safetensors header: names, shapes, offsets) and SAMPLES spans spread through it; full=True: every
    byte."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        p = os.path.join(path, name)
        if name == "config.json":
            h.update(b"config\0" + open(p, "rb").read())
        if not name.endswith(WEIGHT_FILES):
            continue
        size = os.path.getsize(p)
        h.update(f"{name}\0{size}\0".encode())
        with open(p, "rb") as f:
            if full:
                while block := f.read(8 << 20):
                    h.update(block)
                continue
            for i in range(SAMPLES + 1):
                f.seek(0 if i == 0 else max(0, (size - SPAN) * i // SAMPLES))
                h.update(f.read(SPAN))
    return h.hexdigest()


# the inputs a checkpoint records by content: a resume over another one is refused (rundir.check_resumable)
INPUT_FIELDS = ("data.store", "loss.offline_teacher", "loss.teacher_cache")


def input_fingerprints(cfg) -> dict:
    """{field: the fingerprint in its index.json} for each INPUT_FIELDS directory the config names (None for one
    without an index yet: the run's own checks then say what is missing). Reads only the index files."""
    out = {}
    for field in INPUT_FIELDS:
        section, leaf = field.split(".")
        path = getattr(getattr(cfg, section), leaf)
        if not path:
            continue
        try:
            with open(os.path.join(path, "index.json")) as f:
                out[field] = json.load(f).get("fingerprint")
        except (OSError, ValueError):
            out[field] = None
    return out
