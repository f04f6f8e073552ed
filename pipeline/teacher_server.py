"""Serve the teacher with vLLM (its OpenAI-compatible server) for training runs with `loss.teacher: remote`: one
engine built for inference scores for one or many student jobs, on its own GPUs or nodes.

    python -m pipeline.teacher_server --config CFG [--address-file F] [--host H] [--port P] [-- VLLM_ARGS ...]
    sbatch slurm/teacher_server.sbatch        # the same on its own node(s); VLLM_ARGS e.g. --tensor-parallel-size 8

It starts `python -m vllm.entrypoints.openai.api_server` (what `vllm serve` runs) with the config's teacher
(model.teacher_path), data.seq_len as the longest row, loss.remote.top_k log-probs and an API key, waits until it
answers, then writes the address file (default loss.remote.address) that training jobs read: {"url", "model",
"key_file"}, with user-only permissions. The key is generated once into ADDRESS_FILE.key (mode 600) and kept across
restarts of the server; it reaches vLLM through its environment (VLLM_API_KEY), never a command line. The address
file is removed when the server stops, so a job never waits on a server that is gone."""
from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from pipeline import cli, config as C
from pipeline.data.remote_teacher import read_secret
from pipeline.parallel.distributed import free_port


def ensure_key(path: str) -> str:
    """The server's API key: read from `path`, or generated into it (created with mode 600: never readable by
    others, not even for an instant)."""
    if os.path.exists(path):
        return read_secret(path)
    key = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def write_private_json(path: str, obj: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def vllm_command(cfg: C.Config, *, host: str, port: int, extra: list[str]) -> list[str]:
    """The server's command line: rows of data.seq_len tokens plus the one token the completions API always
    generates (scoring needs none, the API needs at least one)."""
    m = cfg.model
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", m.teacher_path,
            "--host", host, "--port", str(port), "--max-model-len", str(cfg.data.seq_len + 1),
            "--dtype", m.dtype, "--max-logprobs", str(max(cfg.loss.remote.top_k + 1, 20)), *extra]


def wait_up(url: str, key: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    req = urllib.request.Request(url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the vLLM server exited with {proc.returncode} while starting (its log says why)")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2.0)
    raise RuntimeError(f"the vLLM server did not answer within {timeout_s:.0f} s")


def serve(cfg: C.Config, address_file: str, *, host: str, port: int, extra: list[str], advertise: str | None = None,
          log=print) -> int:
    """Runs the server until it exits or this process is asked to stop; its exit code."""
    if not cfg.model.teacher_path:
        raise ValueError("model.teacher_path: the server serves a checkpoint directory")
    os.makedirs(os.path.dirname(os.path.abspath(address_file)), exist_ok=True)
    key_file = address_file + ".key"
    key = ensure_key(key_file)
    port = port or free_port()
    reach = advertise or (socket.getfqdn() if host in ("0.0.0.0", "::") else host)
    url = f"http://{reach}:{port}"
    env = {**os.environ, "VLLM_API_KEY": key}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # CPU builds: a bounded KV cache (GiB); GPU builds ignore it
    proc = subprocess.Popen(vllm_command(cfg, host=host, port=port, extra=extra), env=env)
    stop = lambda signum, frame: proc.send_signal(signal.SIGTERM)  # noqa: E731  (Slurm's scancel, Ctrl-C)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        wait_up(f"http://127.0.0.1:{port}" if host in ("0.0.0.0", "::", "127.0.0.1") else url, key, proc,
                cfg.loss.remote.wait_s)
        write_private_json(address_file, {"url": url, "model": cfg.model.teacher_path, "key_file":
                                          os.path.abspath(key_file), "pid": proc.pid, "host": socket.gethostname()})
        log(f"teacher server up at {url}; address in {address_file}")
        return proc.wait()
    finally:
        if os.path.exists(address_file):
            os.remove(address_file)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.teacher_server", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="the training config (model.teacher_path, data.seq_len, "
                                                    "loss.remote); --section.key=value overrides as in training")
    ap.add_argument("--address-file", help="where to write the address (default: loss.remote.address)")
    ap.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every node may connect; "
                                                        "the API key is what admits a job)")
    ap.add_argument("--port", type=cli.count, default=0, help="0: a free port")
    ap.add_argument("--advertise", help="the host name or address jobs connect to (default: --host, or this node's "
                                        "name when listening on 0.0.0.0)")
    args, rest = ap.parse_known_args(argv)
    extra = rest[rest.index("--") + 1:] if "--" in rest else []
    overrides = rest[:rest.index("--")] if "--" in rest else rest
    try:
        cfg = C.load_config(args.config, overrides)
        address = args.address_file or cfg.loss.remote.address
        if not address or address.startswith(("http://", "https://")):
            raise ValueError("give --address-file (or set loss.remote.address to a file path): the training jobs "
                             "read the server's URL and key file from it")
        return serve(cfg, address, host=args.host, port=args.port, extra=extra, advertise=args.advertise,
                     log=lambda m: print(m, file=sys.stderr, flush=True))
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1


if __name__ == "__main__":
    sys.exit(main())
