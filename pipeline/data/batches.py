"""HF `datasets` -> packed token streams (pretraining-style distillation) or prompt/response pairs (instruction
tuning, data.kind = chat).

Packed text: documents are tokenised with the shared tokenizer, joined with EOS, and cut into blocks of seq_len
tokens. A global micro-batch is micro_batch_size x world consecutive blocks of a seeded per-epoch permutation; rank r
takes its rows [r B, (r+1) B). So a run on P ranks with micro-batch B sees exactly the data of one rank with micro-batch P B,
and the position (epoch, index) is all a checkpoint needs to resume the stream exactly.

Instruction data: one example per row, either `prompt`/`response` columns or chat `messages` ([{role, content}],
the last turn the assistant's). With a chat template the prompt is the template up to the generation prompt and the
response the rest; without one, prompt tokens then response tokens then EOS. Batches are (tokens, attention mask,
loss mask) with the loss on response tokens only; the same per-epoch permutation and rank layout as packed text.
"""
from __future__ import annotations

import codecs
import collections
import dataclasses
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.config import DataConfig, resolve_files
from pipeline.data.teacher_topk import OfflineBlocks, TeacherTopk
from pipeline.data.token_store import TokenStore

EXT_FORMAT = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".md": "text"}


def check_files(files: list[str], fmt: str, what: str = "data.files", full: bool = True) -> None:
    """Cheap checks before the datasets library reads anything: no empty file; with `full` (everything will be
    read at start-up anyway), text files are valid UTF-8, since the library stores bad bytes silently and the error
    surfaces later without a file or an offset."""
    for f in files:
        if os.path.getsize(f) == 0:
            raise ValueError(f"{what}: {f} is empty")
        if not full or fmt == "parquet":
            continue
        decoder, offset, line = codecs.getincrementaldecoder("utf-8")(), 0, 1
        with open(f, "rb") as fh:
            while block := fh.read(16 << 20):
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as e:
                    at = offset + e.start
                    line += block[:e.start].count(b"\n")
                    raise ValueError(f"{what}: {f}: bytes that are not UTF-8 at byte offset {at} (line {line}); "
                                     f"re-encode the file") from None
                offset += len(block)
                line += block.count(b"\n")
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise ValueError(f"{what}: {f}: ends inside a multi-byte UTF-8 character (byte offset {offset}); "
                                 f"re-encode the file") from None


def diagnose(files: list[str], fmt: str, what: str = "data.files") -> str | None:
    """Why the datasets library could not read these files, naming the file and the line or byte: bytes that are
    not UTF-8, a JSON line that does not parse or is not an object. None when nothing is found (the caller then
    shows the library's own error)."""
    for f in files:
        with open(f, "rb") as fh:
            raw = fh.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            return f"{what}: {f}: bytes that are not UTF-8 at byte offset {e.start} (line {line}); re-encode the file"
        if fmt == "json" and f.endswith(".jsonl"):
            for i, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    return f"{what}: {f}:{i}: not valid JSON ({e.msg} at column {e.colno})"
                if not isinstance(row, dict):
                    return f"{what}: {f}:{i}: a JSON line must be an object with named fields, got {type(row).__name__}"
        elif fmt == "json":
            try:
                json.loads(text)
            except json.JSONDecodeError as e:
                return f"{what}: {f}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})"
    return None


def load_documents(d: DataConfig, what: str = "data.files"):
    """A datasets.Dataset (or IterableDataset when streaming) with a text column. Unreadable files are a ValueError
    that names the file and the line or byte."""
    import datasets  # deferred: only the data files that need HF datasets
    if d.files:
        files = resolve_files(d.files)
        fmt = d.format
        if fmt == "auto":
            kinds = {EXT_FORMAT.get(os.path.splitext(f)[1].lower()) for f in files}
            if None in kinds or len(kinds) != 1:
                raise ValueError(f"data.format: cannot tell the format of {files[:3]} from their extensions; "
                                 f"set data.format to json, parquet or text")
            fmt = kinds.pop()
        check_files(files, fmt, what, full=not d.streaming)
        extra = {"sample_by": "paragraph"} if fmt == "text" else {}
        try:
            ds = datasets.load_dataset(fmt, data_files=files, split="train", streaming=d.streaming, **extra)
            columns = ds.column_names if ds.column_names is not None else list(next(iter(ds)).keys())
        except Exception as e:  # the library's errors (ArrowInvalid, DatasetGenerationError, ...) name no row
            raise ValueError(diagnose(files, fmt, what) or f"{what}: {files} could not be read as {fmt}: "
                             f"{type(e).__name__}: {e}") from None
    else:
        ds = datasets.load_dataset(d.dataset, split="train", streaming=d.streaming)
        columns = ds.column_names if ds.column_names is not None else list(next(iter(ds)).keys())
    if d.text_field is not None and d.text_field not in columns:
        raise ValueError(f"data.text_field: no column {d.text_field!r} in the data (columns: {columns})")
    if d.max_documents is not None:
        ds = ds.take(d.max_documents) if d.streaming else ds.select(range(min(d.max_documents, len(ds))))
    return ds


def text_cell(value, field: str, row: int | str) -> str:
    """A text cell, or a ValueError naming the row and the field (null and empty count as empty text)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"data: row {row}, field {field!r}: expected text, got {type(value).__name__} {value!r}")
    return value


def pack_blocks(docs, tokenizer, text_field: str, seq_len: int) -> Tensor:
    """[num_blocks, seq_len] int64; the tail shorter than a block is dropped."""
    def tok(batch, indices):
        texts = [text_cell(t, text_field, i) for t, i in zip(batch[text_field], indices)]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return {"ids": [x + [tokenizer.eos_token_id] for x, t in zip(ids, texts) if t]}
    try:
        tokenised = docs.map(tok, batched=True, with_indices=True, remove_columns=docs.column_names)
    except ValueError as e:
        raise ValueError(f"data.files: {e}") from None
    flat = torch.tensor([t for ids in tokenised["ids"] for t in ids], dtype=torch.long)
    n = flat.numel() // seq_len
    return flat[: n * seq_len].view(n, seq_len)


class PackedBatches:
    """This rank's micro-batches from indexable rows: blocks [n, seq_len] (a tensor, or a token store's StoreBlocks:
    returns [B, seq_len]) or instruction examples (a list: returns B of them); a seeded permutation per epoch;
    resumable via state_dict(). prefetch: read that many next micro-batches in background threads while the step
    runs (store reads are I/O; a served teacher's scores are a network round trip)."""

    def __init__(self, blocks, micro_batch: int, rank: int, world: int, seed: int, *, prefetch: int = 0):
        per_global = micro_batch * world
        if len(blocks) < per_global:
            if not (isinstance(blocks, list) or hasattr(blocks, "prompt_lengths")):  # examples: a list or a store
                raise ValueError(f"the data holds {len(blocks)} blocks of data.seq_len tokens but one global "
                                 f"micro-batch needs {per_global} (train.micro_batch_size x world size): add data or "
                                 f"shorten data.seq_len")
            raise ValueError(f"the instruction data holds {len(blocks)} usable examples but one step needs "
                             f"{per_global} (train.micro_batch_size x grad_accum x world size): add data")
        self.blocks, self.B, self.rank, self.world, self.seed = blocks, micro_batch, rank, world, seed
        self.per_epoch = len(blocks) // per_global
        self.epoch, self.index = 0, 0
        self._perm = self._permutation(0)
        self._depth = int(prefetch)
        self._pool = ThreadPoolExecutor(self._depth, thread_name_prefix="prefetch") if self._depth else None
        self._ahead: collections.deque = collections.deque()  # ((epoch, index), future) of micro-batches read ahead
        self.wait_s = 0.0   # time next() spent waiting for data (the prefetch did not hide)

    def _permutation(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.blocks), generator=g)

    def _take(self, rows: Tensor):
        return [self.blocks[i] for i in rows.tolist()] if isinstance(self.blocks, list) else self.blocks[rows]

    def _rows(self, index: int) -> Tensor:
        start = (index * self.world + self.rank) * self.B
        return self._perm[start:start + self.B]

    def next(self):
        if self.index == self.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        t0 = time.perf_counter()
        while self._ahead and self._ahead[0][0] != (self.epoch, self.index):
            self._ahead.popleft()
        batch = self._ahead.popleft()[1].result() if self._ahead else self._take(self._rows(self.index))
        self.wait_s += time.perf_counter() - t0
        self.index += 1
        if self._pool is not None:  # (no read-ahead across an epoch boundary)
            nxt = self._ahead[-1][0][1] + 1 if self._ahead else self.index
            while len(self._ahead) < self._depth and nxt < self.per_epoch:
                self._ahead.append(((self.epoch, nxt), self._pool.submit(self._take, self._rows(nxt))))
                nxt += 1
        return batch

    @property
    def tokens_read(self) -> int | None:
        """Tokens this process has read from a token store (None for in-memory rows)."""
        store = getattr(self.blocks, "store", None)
        return store.bytes_read // store.dtype.itemsize if store is not None else None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._perm = self._permutation(self.epoch)
        self._ahead.clear()


class StreamingBatches:
    """Packed blocks from a streamed dataset, for corpora nobody pre-tokenises: each rank streams only its share of
    the documents (datasets' split_dataset_by_node: whole files when the files divide evenly among the ranks, else
    every world-th document), tokenises and packs them on the fly, and checkpoints the stream's own position plus
    the tokens of its unfinished block, so a resume reads on instead of replaying what was consumed. Unlike the store
    and the in-memory path, which rows a rank sees depends on the number of ranks."""

    def __init__(self, docs, tokenizer, text_field: str, seq_len: int, micro_batch: int, *, rank: int, world: int):
        self.base, self.tok, self.field, self.seq_len = docs, tokenizer, text_field, seq_len
        self.B, self.rank, self.world = micro_batch, rank, world
        self.epoch = 0
        self.buffer: list[int] = []  # tokens read but not yet in a returned block
        self.tokens_read = 0
        self.docs = self._split()
        self._it = None

    def _split(self):
        from datasets.distributed import split_dataset_by_node  # deferred: only the data files that need HF datasets
        # a fresh object per epoch: a loaded stream state applies to the first pass only
        return split_dataset_by_node(self.base, rank=self.rank, world_size=self.world) if self.world > 1 \
            else self.base

    def next(self) -> Tensor:
        T, rows = self.seq_len, []
        while len(self.buffer) < self.B * T:
            if self._it is None:
                self._it = iter(self.docs)
            try:
                row = next(self._it)
            except StopIteration:
                self.epoch += 1
                self.docs, self._it = self._split(), None
                continue
            text = text_cell(row[self.field], self.field, f"(rank {self.rank}'s stream, epoch {self.epoch})")
            if text:
                ids = self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
                self.buffer.extend(ids)
                self.tokens_read += len(ids)
        rows, self.buffer = self.buffer[: self.B * T], self.buffer[self.B * T:]
        return torch.tensor(rows, dtype=torch.long).view(self.B, T)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "stream": self.docs.state_dict(), "buffer": list(self.buffer)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.buffer = int(state["epoch"]), list(state["buffer"])
        self.docs = self._split()
        self.docs.load_state_dict(state["stream"])
        self._it = None


@dataclass
class Batch:
    """Right-padded sequences: tokens [B, T], attention_mask [B, T] (1 = real token), loss_mask [B, T-1] over
    next-token targets (1 = a target the loss is taken on)."""
    tokens: Tensor
    attention_mask: Tensor
    loss_mask: Tensor
    teacher_logprobs: Tensor | None = None  # [B, T-1, k]: the teacher's stored top-k (loss.offline_teacher)
    teacher_ids: Tensor | None = None       # [B, T-1, k]
    teacher_hidden: Tensor | None = None    # [loss rows, H]: the teacher's stored hidden states (loss.teacher_cache)
    documents: Tensor | None = None         # [B, T]: each position's document in its packed row (data.document_mask)

    def to(self, device) -> "Batch":
        return Batch(*(None if t is None else to_device(t, device) for t in (
            self.tokens, self.attention_mask, self.loss_mask, self.teacher_logprobs, self.teacher_ids,
            self.teacher_hidden, self.documents)))


def to_device(t: Tensor, device) -> Tensor:
    """A host tensor on `device`. To a GPU through pinned memory without blocking: a blocking copy from pageable
    memory is a host synchronisation (cudaMemcpy, then a stream sync) per tensor, several per micro-batch. The
    pinned buffer comes from torch's caching host allocator, which keeps it until the copy has run."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def text_batch(block, eos_id: int | None = None) -> Batch:
    """A packed block [B, T] (or (block, teacher log-probs, teacher ids) from an offline-teacher store): every target
    counts. eos_id (data.document_mask): attention stays inside each document (documents end with eos_id), else
    every position attends to the whole row."""
    tokens, lp, ids = block if isinstance(block, tuple) else (block, None, None)
    return Batch(tokens, torch.ones_like(tokens), torch.ones_like(tokens[:, 1:]), lp, ids,
                 documents=None if eos_id is None else documents(tokens, eos_id))


def document_end(cfg, tokenizer) -> int | None:
    """The token that ends a packed document when data.document_mask applies (text), else None."""
    return tokenizer.eos_token_id if cfg.data.kind == "text" and cfg.data.document_mask else None


def input_documents(b: Batch) -> Tensor | None:
    """The documents of a batch's inputs (every position but the last)."""
    return None if b.documents is None else b.documents[:, :-1]


def documents(tokens: Tensor, eos_id: int) -> Tensor | None:
    """[B, T] -> each position's document index in its row: a document ends with (and includes) eos_id. None when
    every row is one document (no end of document before its last position): plain causal attention."""
    end = tokens == eos_id
    if not end[:, :-1].any():
        return None
    return torch.cumsum(end, 1) - end.long()


def collate(prompts: list, responses: list, pad_id: int) -> Batch:
    """prompt + response per row, right-padded; loss on the response tokens (a generation's EOS included)."""
    rows = [list(p) + list(r) for p, r in zip(prompts, responses)]
    T = max(len(r) for r in rows)
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), T), dtype=torch.long)
    loss = torch.zeros((len(rows), T - 1), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        tokens[i, :n] = torch.tensor(rows[i], dtype=torch.long)
        attn[i, :n] = 1
        loss[i, len(p) - 1:n - 1] = 1  # target j is token j + 1: the response starts at target len(p) - 1
    return Batch(tokens, attn, loss)


def pack_order(lengths: list[int], width: int) -> list[list[int]]:
    """Rows of example indices, each row's lengths summing to at most `width`: first fit, longest first (fewest
    rows; ties keep the examples' order, so the packing depends on the lengths alone)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        j = next((j for j, r in enumerate(room) if r >= lengths[i]), None)
        if j is None:
            rows.append([i])
            room.append(width - lengths[i])
        else:
            rows[j].append(i)
            room[j] -= lengths[i]
    return rows


def collate_packed(prompts: list, responses: list, pad_id: int, width: int = 0) -> tuple[Batch, list[int]]:
    """Padding-free instruction batch (data.padding_free): prompt + response examples packed into rows as wide as the
    longest example or `width` (data.seq_len), whichever puts fewer positions through the models (never more than
    the padded batch), each example a document of its own (attention inside it, positions restarting with it), the
    loss on response tokens as in collate(). Returns the batch and the examples' order in it (row by row): its loss
    rows are those of collate() over the examples in that order."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width, rows = min(((w, pack_order(lengths, w)) for w in sorted({max(lengths), max(width, max(lengths))})),
                      key=lambda wr: wr[0] * len(wr[1]))
    R = len(rows)
    tokens = torch.full((R, width), pad_id, dtype=torch.long)
    attn = torch.zeros((R, width), dtype=torch.long)
    loss = torch.zeros((R, width - 1), dtype=torch.long)
    docs = torch.zeros((R, width), dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for d, i in enumerate(members):
            p, n = len(prompts[i]), lengths[i]
            tokens[r, at:at + n] = torch.tensor(list(prompts[i]) + list(responses[i]), dtype=torch.long)
            attn[r, at:at + n] = 1
            loss[r, at + p - 1:at + n - 1] = 1
            docs[r, at:at + n] = d
            at += n
        docs[r, at:] = len(members)  # the row's padding: a document of its own, never a target
    return Batch(tokens, attn, loss, documents=docs), [i for row in rows for i in row]


def chat_layout(ds, d: DataConfig) -> str:
    columns = ds.column_names if ds.column_names is not None else list(next(iter(ds)).keys())
    if d.messages_field in columns:
        return "messages"
    missing = [c for c in (d.prompt_field, d.response_field) if c not in columns]
    if missing:
        raise ValueError(f"data.kind chat needs a {d.messages_field!r} column or {d.prompt_field!r} and "
                         f"{d.response_field!r} columns (data.messages_field / prompt_field / response_field); "
                         f"the data has {columns}")
    return "pairs"


def tokenize_example(row: dict, tokenizer, d: DataConfig, layout: str, index: int = 0) -> tuple[list, list] | None:
    """(prompt ids, response ids) of one row; the prompt keeps its last max_prompt_len tokens (where a chat
    template puts the assistant header), the response is cut to fit seq_len. None for a row whose prompt or
    response text is empty (dropped and counted by the caller); a ValueError naming the row and field for a row
    that is malformed."""
    if layout == "messages":
        messages = row[d.messages_field]
        if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict) \
                or messages[-1].get("role") != "assistant":
            raise ValueError(f"data: row {index}, field {d.messages_field!r}: must be a list of {{role, content}} "
                             f"ending with an assistant turn, got {messages!r}"[:400])
        for m in messages:
            text_cell(m.get("content") if isinstance(m, dict) else m, f"{d.messages_field}[].content", index)
        context, answer = messages[:-1], messages[-1]["content"] or ""
        if not context or not any(text_cell(m.get("content"), "content", index).strip() for m in context):
            return None
    else:
        prompt_text = text_cell(row[d.prompt_field], d.prompt_field, index)
        answer = text_cell(row[d.response_field], d.response_field, index)
        if not prompt_text.strip():
            return None
        context = [{"role": "user", "content": prompt_text}]
    if not answer.strip():
        return None
    if getattr(tokenizer, "chat_template", None):
        prompt = list(tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False))
        full = list(tokenizer.apply_chat_template(context + [{"role": "assistant", "content": answer}],
                                                  tokenize=True, return_dict=False))
        if full[:len(prompt)] != prompt:
            raise ValueError("the tokenizer's chat template does not render the prompt as a prefix of the whole "
                             "conversation, so response tokens cannot be told apart; use prompt/response data")
        response = full[len(prompt):]
    else:
        text = "\n".join(m["content"] for m in context)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        response = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt = prompt[-d.max_prompt_len:]
    return prompt, response[: d.seq_len - len(prompt)]


def load_examples(d: DataConfig, tokenizer, files: list | None = None, what: str = "data.files"
                  ) -> list[tuple[list, list]]:
    """Every example of the instruction files, tokenised. Rows with an empty prompt or response are dropped (and
    counted on stderr); none left is an error, since training on template tokens alone teaches nothing."""
    docs = load_documents(dataclasses.replace(d, files=files or d.files, streaming=False, text_field=None), what)
    layout = chat_layout(docs, d)
    try:
        out = [tokenize_example(row, tokenizer, d, layout, i) for i, row in enumerate(docs)]
    except ValueError as e:  # name the files too (rows count from 0 across them, in order)
        raise ValueError(f"{what} {resolve_files(files or d.files)}: {e}") from None
    kept = [ex for ex in out if ex is not None and ex[0] and ex[1]]
    if not kept:
        raise ValueError(f"{what}: none of the {len(out)} rows has both a non-empty prompt and a non-empty "
                         f"response: nothing to train on")
    if len(kept) < len(out):
        print(f"data: {len(out) - len(kept)} of {len(out)} rows of {what} dropped (empty prompt or response)",
              file=sys.stderr)
    return kept


def make_batches(cfg, tokenizer, rank: int, world: int, teacher=None):
    """This rank's batches of the job's data; `teacher` (a remote_teacher.TeacherClient, loss.teacher remote): packed
    text comes with the served teacher's top-k, requested loss.remote.prefetch micro-batches ahead."""
    d = cfg.data
    if d.kind == "chat":
        per_step = cfg.train.micro_batch_size * cfg.train.grad_accum
        if d.store:
            store = TokenStore(d.store)
            store.check_tokenizer(tokenizer)
            return PackedBatches(store.examples(d), per_step, rank, world, d.shuffle_seed, prefetch=1)
        return PackedBatches(load_examples(d, tokenizer), per_step, rank, world, d.shuffle_seed)
    if d.store:
        store = TokenStore(d.store)
        store.check_tokenizer(tokenizer)
        blocks = store.blocks(d.seq_len)
        if cfg.loss.offline_teacher:
            topk = TeacherTopk(cfg.loss.offline_teacher)
            topk.check(cfg, store)
            blocks = OfflineBlocks(blocks, topk)
        if teacher is not None:
            return PackedBatches(teacher.wrap(blocks), cfg.train.micro_batch_size, rank, world, d.shuffle_seed,
                                 prefetch=cfg.loss.remote.prefetch)
        return PackedBatches(blocks, cfg.train.micro_batch_size, rank, world, d.shuffle_seed, prefetch=1)
    docs = load_documents(d)
    if d.streaming:
        return StreamingBatches(docs, tokenizer, d.text_field, d.seq_len, cfg.train.micro_batch_size, rank=rank,
                                world=world)
    blocks = pack_blocks(docs, tokenizer, d.text_field, d.seq_len)
    if teacher is not None:
        return PackedBatches(teacher.wrap(blocks), cfg.train.micro_batch_size, rank, world, d.shuffle_seed,
                             prefetch=cfg.loss.remote.prefetch)
    return PackedBatches(blocks, cfg.train.micro_batch_size, rank, world, d.shuffle_seed)
