"""The served teacher's client (loss.teacher remote): this rank's token rows go out, the teacher's top-k log-probs
per position come back, through vLLM's OpenAI-compatible completions API (`prompt_logprobs` of given token ids: no
re-tokenisation), into the same fused top-k loss as loss.offline_teacher. A server is a network dependency: the
client waits for it within a bound, retries with backoff, and checks that it serves the teacher and tokenizer the
config names (and, on a resume, the same teacher as the run's first launch) before a step runs.

Address and key: `loss.remote.address` is a URL or the address file `python -m pipeline.teacher_server` writes
({"url", "model", "key_file"}, user-only permissions); the API key comes from a file with user-only permissions or
the environment (TEACHER_API_KEY), never from a command line."""
from __future__ import annotations

import dataclasses
import http.client
import json
import os
import threading
import time
import urllib.parse

import numpy as np
import torch
from torch import Tensor

from pipeline.data.batches import Batch, document_end

KEY_ENV = "TEACHER_API_KEY"
PROBE_TEXT = "The quick brown fox jumps over the lazy dog, and 12 + 30 = 42."
PROBE_FILE = "teacher_probe.json"  # in the run directory: the teacher's scores of the probe at the first launch
PROBE_TOLERANCE = 1e-3             # log-probs of the same teacher on another server launch (kernels may differ)


class TeacherUnavailable(RuntimeError):
    """The server did not answer within the retries: the run checkpoints and stops (relaunch to resume)."""


class TeacherMismatch(ValueError):
    """The server serves another model or tokenizer than the config names, or refuses this run's key."""


def read_secret(path: str) -> str:
    """A key file's content; refused when others than its owner may read it."""
    mode = os.stat(path).st_mode
    if mode & 0o077:
        raise TeacherMismatch(f"{path}: the API key file is readable by others (mode {oct(mode & 0o777)}): "
                              f"chmod 600 {path}")
    with open(path) as f:
        return f.read().strip()


def resolve(rc, wait_s: float, log=print) -> tuple[str, str | None, str | None]:
    """(base URL, API key or None, the served model name the address file records or None). An address file that
    does not exist yet (its server job has not started) is waited for, within `wait_s`."""
    address, key_file, model = rc.address, rc.api_key_file, None
    if not address.startswith(("http://", "https://")):
        deadline, said = time.monotonic() + wait_s, False
        while not os.path.isfile(address):
            if time.monotonic() > deadline:
                raise TeacherUnavailable(f"loss.remote.address: {address} did not appear within {wait_s:.0f} s "
                                         f"(loss.remote.wait_s): is the teacher's server job running?")
            if not said:
                log(f"waiting for the teacher server's address file {address}")
                said = True
            time.sleep(2.0)
        with open(address) as f:
            info = json.load(f)
        address, model = info["url"], info.get("model")
        key_file = key_file or info.get("key_file")
    key = read_secret(key_file) if key_file else os.environ.get(KEY_ENV) or None
    return address.rstrip("/"), key, model


class TeacherClient:
    """One rank's connection to the served teacher. score() is thread-safe (one HTTP connection per thread), so the
    prefetch threads can have requests in flight while the step computes."""

    def __init__(self, rc, *, url: str, key: str | None, log=print):
        self.rc, self.url, self.key, self.log = rc, url, key, log
        parts = urllib.parse.urlsplit(url)
        self._host, self._port, self._https = parts.hostname, parts.port, parts.scheme == "https"
        self._local = threading.local()
        self.model: str | None = None       # the served name, from the server (wait_until_up)
        self.max_model_len: int | None = None
        self.bytes_received = 0             # response bytes, for the benchmark's bytes per token
        self.document_end: int | None = None  # packed text with data.document_mask: documents end with this token

    # ---- transport ---------------------------------------------------------------------------------------------
    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = self._local.conn = cls(self._host, self._port, timeout=self.rc.request_timeout_s)
        return conn

    def _once(self, method: str, path: str, body: dict | None) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        conn = self._connection()
        try:
            conn.request(method, path, None if body is None else json.dumps(body), headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        except BaseException:
            conn.close()
            self._local.conn = None
            raise

    def request(self, method: str, path: str, body: dict | None = None, *, retries: int | None = None) -> dict:
        """The JSON answer; a refused key or a bad request is an error at once, a server that does not answer or
        fails (5xx) is retried with backoff (1, 2, 4, ... s), then TeacherUnavailable."""
        retries = self.rc.retries if retries is None else retries
        for attempt in range(retries + 1):
            try:
                status, raw = self._once(method, path, body)
            except (OSError, http.client.HTTPException) as e:
                status, raw = None, str(e).encode()
            if status is not None and status < 500:
                break
            if attempt < retries:
                time.sleep(min(2.0 ** attempt, 30.0))
        else:
            raise TeacherUnavailable(f"the teacher server at {self.url} did not answer {path} after {retries + 1} "
                                     f"tries ({status or 'no connection'}: {raw[:200].decode(errors='replace')})")
        if status == 401:
            raise TeacherMismatch(f"the teacher server at {self.url} refused this run's API key: give the key its "
                                  f"server was started with (loss.remote.api_key_file, the address file's key_file, "
                                  f"or {KEY_ENV})")
        if status != 200:
            raise TeacherMismatch(f"the teacher server at {self.url} answered {path} with {status}: "
                                  f"{raw[:300].decode(errors='replace')}")
        self.bytes_received += len(raw)
        return json.loads(raw)

    def wait_until_up(self) -> None:
        """Polls the server until it answers, within loss.remote.wait_s; learns the served model's name."""
        deadline, said = time.monotonic() + self.rc.wait_s, False
        while True:
            try:
                models = self.request("GET", "/v1/models", retries=0)
                break
            except TeacherUnavailable:
                if time.monotonic() > deadline:
                    raise TeacherUnavailable(f"the teacher server at {self.url} did not come up within "
                                             f"{self.rc.wait_s:.0f} s (loss.remote.wait_s)") from None
                if not said:
                    self.log(f"waiting for the teacher server at {self.url}")
                    said = True
                time.sleep(2.0)
        served = models["data"][0]
        self.model, self.max_model_len = served["id"], served.get("max_model_len")
        self._root = served.get("root")

    # ---- scoring -----------------------------------------------------------------------------------------------
    def score(self, rows: list[list[int]]) -> list[tuple[Tensor, Tensor]]:
        """Per row of n token ids: the teacher's top-k (log-probs [n-1, k] float32, ids [n-1, k] int64) for the
        targets 1..n-1 (entry t predicts token t + 1), normalised over the full vocabulary. One request per call."""
        k = self.rc.top_k
        out = self.request("POST", "/v1/completions", {
            "model": self.model, "prompt": [list(map(int, r)) for r in rows], "max_tokens": 1, "temperature": 0.0,
            "prompt_logprobs": k, "return_tokens_as_token_ids": True})
        choices = sorted(out["choices"], key=lambda c: c["index"])
        if len(choices) != len(rows):
            raise TeacherMismatch(f"the teacher server at {self.url} answered {len(choices)} of {len(rows)} rows")
        return [_topk(c["prompt_logprobs"], len(r), k) for c, r in zip(choices, rows)]

    def score_block(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Packed rows [B, T] -> (log-probs [B, T-1, k], ids [B, T-1, k]), as an offline cache gives them. With
        document_end set (data.document_mask), each document is scored on its own, as the student sees it."""
        if self.document_end is not None:
            scored = self.score_documents(tokens.tolist(), self.document_end)
        else:
            scored = self.score(tokens.tolist())
        return torch.stack([lp for lp, _ in scored]), torch.stack([ids for _, ids in scored])

    def score_documents(self, rows: list[list[int]], eos_id: int) -> list[tuple[Tensor, Tensor]]:
        """Like score(), with attention inside each document of a row (documents end with eos_id): every document is
        a prompt of its own; a document's last position (its end, predicting the next document's first token) is
        the distribution of the token the API generates after it. One request per call."""
        k = self.rc.top_k
        docs, owner = [], []
        for i, row in enumerate(rows):
            start = 0
            for t, tok in enumerate(row):
                if tok == eos_id or t == len(row) - 1:
                    docs.append(row[start:t + 1])
                    owner.append((i, start, tok == eos_id and t < len(row) - 1))
                    start = t + 1
        out = self.request("POST", "/v1/completions", {
            "model": self.model, "prompt": docs, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k,
            "logprobs": k, "return_tokens_as_token_ids": True})
        choices = sorted(out["choices"], key=lambda c: c["index"])
        if len(choices) != len(docs):
            raise TeacherMismatch(f"the teacher server at {self.url} answered {len(choices)} of {len(docs)} prompts")
        lps = [np.empty((len(r) - 1, k), dtype=np.float32) for r in rows]
        idss = [np.empty((len(r) - 1, k), dtype=np.int64) for r in rows]
        for doc, (i, start, continues), c in zip(docs, owner, choices):
            n = len(doc)
            if n > 1:
                lp, ids = _topk(c["prompt_logprobs"], n, k)
                lps[i][start:start + n - 1], idss[i][start:start + n - 1] = lp.numpy(), ids.numpy()
            if continues:  # the end of a document, predicting what follows it
                lp, ids = _best(c["logprobs"]["top_logprobs"][0], k)
                lps[i][start + n - 1], idss[i][start + n - 1] = lp, ids
        return [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in zip(lps, idss)]

    def score_batch(self, b: Batch) -> Batch:
        """An instruction micro-batch (right-padded, or packed: data.padding_free) with the teacher's top-k of each
        example, scored as a prompt of its own; padding gets a uniform top-k of token 0 (finite, never a loss
        row)."""
        segments = []  # (row, start, token ids) of every example
        attn, docs = b.attention_mask.tolist(), None if b.documents is None else b.documents.tolist()
        for i, row in enumerate(b.tokens.tolist()):
            start = 0
            for t in range(1, len(row) + 1):
                if t == len(row) or not attn[i][t] or (docs is not None and docs[i][t] != docs[i][start]):
                    if attn[i][start]:
                        segments.append((i, start, row[start:t]))
                    start = t
        scored = self.score([s for _, _, s in segments])
        B, T, k = b.tokens.shape[0], b.tokens.shape[1], self.rc.top_k
        lp = torch.full((B, T - 1, k), -float(np.log(k)), dtype=torch.float32)
        ids = torch.zeros((B, T - 1, k), dtype=torch.long)
        for (i, start, seg), (l, d) in zip(segments, scored):
            lp[i, start:start + len(seg) - 1], ids[i, start:start + len(seg) - 1] = l, d
        return dataclasses.replace(b, teacher_logprobs=lp, teacher_ids=ids)

    def wrap(self, blocks) -> RemoteBlocks:
        return RemoteBlocks(blocks, self)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()


def _topk(positions: list, n: int, k: int) -> tuple[Tensor, Tensor]:
    """vLLM's prompt_logprobs of one row (None for position 0, then per position the top-k by id, plus the actual
    token when it ranks lower) -> the k most likely, most likely first."""
    if len(positions) != n:
        raise TeacherMismatch(f"the teacher server scored {len(positions)} positions of a {n}-token row")
    lp = np.empty((n - 1, k), dtype=np.float32)
    ids = np.empty((n - 1, k), dtype=np.int64)
    for t, entry in enumerate(positions[1:]):
        if len(entry) < k:
            raise TeacherMismatch(f"the teacher server returned {len(entry)} log-probs for a position, not "
                                  f"loss.remote.top_k = {k}")
        best = sorted(entry.items(), key=lambda kv: kv[1]["rank"])[:k]
        ids[t] = [int(tok) for tok, _ in best]
        lp[t] = [v["logprob"] for _, v in best]
    return torch.from_numpy(lp), torch.from_numpy(ids)


def _best(top: dict, k: int) -> tuple[list[float], list[int]]:
    """The completions API's top_logprobs of a generated token ({"token_id:ID": log-prob}, with
    return_tokens_as_token_ids) -> the k most likely (log-probs, ids), most likely first."""
    if len(top) < k:
        raise TeacherMismatch(f"the teacher server returned {len(top)} log-probs for a position, not "
                              f"loss.remote.top_k = {k}")
    best = sorted(top.items(), key=lambda kv: -kv[1])[:k]
    return [v for _, v in best], [int(tok.rsplit(":", 1)[-1]) for tok, _ in best]


class RemoteBlocks:
    """Packed blocks that come with the served teacher's top-k: indexable like a store's blocks, returning
    (tokens [B, T], log-probs [B, T-1, k], ids [B, T-1, k]) as an offline cache's OfflineBlocks does."""

    def __init__(self, blocks, client: TeacherClient):
        self.blocks, self.client, self.store = blocks, client, getattr(blocks, "store", None)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, rows: Tensor):
        tokens = self.blocks[rows]
        return (tokens, *self.client.score_block(tokens))


def connect(cfg, tokenizer, *, run_dir: str | None, is_main: bool, log=print) -> TeacherClient:
    """The checked client of loss.remote: waits for the server, then refuses one that serves another model, another
    tokenizer, rows shorter than the job's, or (on a later launch of the same run) another teacher than the first
    launch scored with."""
    rc = cfg.loss.remote
    url, key, model = resolve(rc, rc.wait_s, log)
    client = TeacherClient(rc, url=url, key=key, log=log)
    client.wait_until_up()
    want = rc.model or model or cfg.model.teacher_path
    if not _same_model(want, client.model, client._root):
        raise TeacherMismatch(f"the teacher server at {url} serves {client.model!r}, not {want!r}: point "
                              f"loss.remote.address at the server of this teacher (or set loss.remote.model to the "
                              f"name it serves)")
    ours = tokenizer(PROBE_TEXT)["input_ids"]
    theirs = client.request("POST", "/tokenize", {"model": client.model, "prompt": PROBE_TEXT})["tokens"]
    if list(theirs) != list(ours):
        raise TeacherMismatch(f"the teacher server at {url} tokenizes with another tokenizer than this run's "
                              f"(model.tokenizer_path / model.teacher_path): {theirs[:8]}... vs {ours[:8]}...")
    # a packed row (text) or the longest prompt + response (chat), plus the one token the API always generates
    need = cfg.data.seq_len + 1
    if client.max_model_len and client.max_model_len < need:
        raise TeacherMismatch(f"the teacher server at {url} takes at most {client.max_model_len} tokens, rows of "
                              f"data.seq_len = {need - 1} need {need}: start it with --max-model-len {need} or more")
    if run_dir is not None:
        check_probe(client, ours, os.path.join(run_dir, PROBE_FILE), write=is_main)
    client.document_end = document_end(cfg, tokenizer)
    return client


def _same_model(want: str, served: str, root: str | None) -> bool:
    if want in (served, root):
        return True
    real = lambda p: os.path.realpath(p) if p and os.path.exists(p) else p  # noqa: E731
    return real(want) in (real(served), real(root))


def check_probe(client: TeacherClient, ids: list[int], path: str, *, write: bool) -> None:
    """The teacher's top-k of the probe against the run's record of it (first launch: recorded, by rank 0): a
    server restarted with another teacher (or another revision of it) is refused before it scores a step."""
    lp, _ = client.score([ids])[0]
    if not os.path.exists(path):
        if write:
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"ids": ids, "logprobs": lp.tolist()}, f)
            os.replace(tmp, path)
        return
    with open(path) as f:
        rec = json.load(f)
    # the top-k values (sorted, so near-ties that another kernel orders differently do not matter)
    old = torch.tensor(rec["logprobs"])
    k = min(old.shape[-1], lp.shape[-1])
    diff = float((old[:, :k] - lp[:, :k]).abs().max()) if rec["ids"] == ids else float("inf")
    if diff > PROBE_TOLERANCE:
        raise TeacherMismatch(f"the teacher server at {client.url} scores the probe sequence differently from this "
                              f"run's first launch ({path}: max log-prob difference {diff:.3g} > {PROBE_TOLERANCE}): "
                              f"it serves another teacher; serve the run's teacher, or start a new run directory")
