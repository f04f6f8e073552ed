"""The method-study tools: the instruction task builder, the evaluation's ROUGE-L, and the grid runner (skips finished
runs, resumes an interrupted grid, refuses to mix specs) on the tiny pair through the real pipeline.train."""
import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from pipeline import evaluate, instruct_task as T
from pipeline.study import cli as study_cli, grid as study_grid, report as study_report, runner, stats
from pipeline.run import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_task_builder_is_deterministic_and_keeps_held_out_passages_out_of_training():
    train, held = T.build_prompts(1000, 200, seed=0)
    assert (train, held) == T.build_prompts(1000, 200, seed=0)
    assert len(train) == 1000 and len(held) == 200
    assert [r["prompt"] for r in T.build_prompts(1000, 200, seed=1)[0]] != [r["prompt"] for r in train]
    train_text = "\n".join(r["prompt"] for r in train)
    quoted = [r for r in held if r["kind"] != "hand_written"]
    assert len(quoted) == 188 and all(r["passage"] not in train_text for r in quoted)
    train_plays = {r["play"] for r in train if r["play"]}
    assert {r["play"] for r in quoted}.isdisjoint(train_plays) and len(train_plays) >= 10
    assert len({r["prompt"] for r in train + held}) == 1200                  # no prompt twice, across the split
    assert {r["kind"] for r in train} == set(T.TEMPLATES) | {"hand_written"}
    with pytest.raises(ValueError, match="--train must exceed"):
        T.build_prompts(10, 200)


def test_teacher_answers_are_generated_once_per_prompt_set(tmp_path, monkeypatch):
    calls = []

    def fake_teacher(teacher_dir, prompts, max_new_tokens, log=print):  # the teacher's generate() is not under test
        calls.append(len(prompts))
        return [f"answer {i}" for i in range(len(prompts))]
    monkeypatch.setattr(T, "answer", fake_teacher)
    tr, he = T.build(str(tmp_path), "teacher", 100, 40, seed=0, log=lambda m: None)
    rows = [json.loads(line) for line in open(tr)] + [json.loads(line) for line in open(he)]
    assert len(rows) == 140 and rows[0]["response"] == "answer 0" and rows[-1]["response"] == "answer 139"
    assert T.build(str(tmp_path), "teacher", 100, 40, seed=0, log=lambda m: None) == (tr, he)
    assert calls == [140]                                                     # reused
    T.build(str(tmp_path), "teacher", 100, 40, seed=1, log=lambda m: None)    # another prompt set: answered anew
    assert calls == [140, 140]
    # a packaged copy of the same (teacher, prompt set) is copied, not answered; of another teacher, ignored
    T.build(str(tmp_path / "pkg"), "t", 100, 40, seed=0, log=lambda m: None, teacher_id="gguf:1")
    new = T.build(str(tmp_path / "new"), "t", 100, 40, seed=0, log=lambda m: None, teacher_id="gguf:1",
                  packaged=str(tmp_path / "pkg"))
    assert calls == [140, 140, 140] and open(new[0]).read() == open(tmp_path / "pkg" / "train.jsonl").read()
    T.build(str(tmp_path / "other"), "t", 100, 40, seed=0, log=lambda m: None, teacher_id="gguf:2",
            packaged=str(tmp_path / "pkg"))
    assert calls == [140, 140, 140, 140]


def test_the_packaged_teacher_answers_are_the_default_task_of_the_embedded_teacher(tmp_path):
    """configs/assets/instruct/ holds the embedded teacher's answers to exactly the default prompt set (a change to
    the prompt builder must regenerate them: python -m pipeline.instruct_task, then copy runs/assets/instruct/)."""
    from pipeline import assets
    train, held = T.build_prompts(1000, 200, seed=0)
    shipped = [[json.loads(line) for line in open(os.path.join(T.PACKAGED, f))]
               for f in ("train.jsonl", "heldout.jsonl")]
    assert [r["prompt"] for r in shipped[0]] == [r["prompt"] for r in train]
    assert [r["prompt"] for r in shipped[1]] == [r["prompt"] for r in held]
    assert all(r["response"].strip() for r in shipped[0] + shipped[1])
    manifest = json.load(open(os.path.join(T.PACKAGED, "manifest.json")))
    assert manifest["teacher"] == assets.teacher_source()
    calls = []
    built = T.build(str(tmp_path), "unused", log=calls.append,
                    teacher_id=assets.teacher_source())                        # copied: no teacher runs
    assert calls == [f"instruction task: the packaged teacher answers ({T.PACKAGED})"]
    assert open(built[1]).read() == open(os.path.join(T.PACKAGED, "heldout.jsonl")).read()


def test_rouge_l_on_fixed_strings():
    # LCS of "the cat lay on the mat" / "the cat sat on the mat" is 5 tokens of 6 each: F1 = 5/6
    assert evaluate.rouge_l(["the cat lay on the mat"], ["the cat sat on the mat"]) == pytest.approx(100 * 5 / 6)
    # stemming (rouge_score's Porter stemmer): "cats running" matches "cat runs"; case and punctuation ignored
    assert evaluate.rouge_l(["Cats, running!"], ["cat runs"]) == pytest.approx(100.0)
    # P = 2/4, R = 2/2: F1 = 2/3; an empty answer scores 0; the value is the mean over pairs
    assert evaluate.rouge_l(["a b x y", ""], ["a b", "a b"]) == pytest.approx(100 * (2 / 3 + 0) / 2)
    from rouge_score import rouge_scorer
    ref = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pairs = [("The quick brown fox jumps", "a quick fox jumped over"), ("Hamlet speaks of death", "death, says he")]
    want = sum(ref.score(r, p)["rougeL"].fmeasure for p, r in pairs) / 2 * 100
    assert evaluate.rouge_l([p for p, _ in pairs], [r for _, r in pairs]) == pytest.approx(want)


def test_the_sampling_seeds_are_the_papers():
    # the ledger's results were sampled with these seeds: changing them silently changes what a run measures
    from pipeline import evaluate
    assert evaluate.sampling_seeds(5) == [10, 20, 30, 40, 50] and evaluate.sampling_seeds(1) == [10]


def test_entropy_vs_rouge_pools_every_run_and_seed():
    res = {"flat": [{"student_entropy": 5.0, "rouge_l": 9.0}, {"student_entropy": 4.5, "rouge_l": 10.0}],
           "sharp": [{"student_entropy": 2.0, "rouge_l": 14.0}, {"rouge_l": 15.0}],  # recorded before the entropy
           "mid": [{"student_entropy": 3.0, "rouge_l": 12.0}]}
    assert study_report.entropy_vs_rouge(res) == {"spearman": pytest.approx(-1.0), "results": 4}
    res["mid"][0]["rouge_l"] = 8.0                                    # now the second-flattest is the lowest
    assert study_report.entropy_vs_rouge(res)["spearman"] == pytest.approx(stats.spearman([5, 4.5, 2, 3], [9, 10, 14, 8]))
    assert study_report.entropy_vs_rouge({"a": res["flat"]}) is None         # two results: no correlation to speak of


def test_spearman():
    assert stats.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert stats.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert stats.spearman([1, 1, 2, 2], [1, 2, 3, 4]) == pytest.approx(0.8944271909999159)  # scipy's value, ties


def test_t_quantile_matches_the_closed_forms_and_tends_to_the_normal():
    import math
    assert stats.t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-9)   # Cauchy
    p = 0.975
    assert stats.t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
    qs = [stats.t_quantile(0.975, df) for df in (1, 2, 3, 5, 10, 30, 10000)]
    assert all(a > b for a, b in zip(qs, qs[1:])) and qs[-1] == pytest.approx(1.95996, abs=1e-3)
    assert qs[4] == pytest.approx(2.228, abs=1e-3) and qs[5] == pytest.approx(2.042, abs=1e-3)  # printed tables


def test_paired_differences_pair_by_seed_not_by_order():
    res = {"ref": [{"seed": 0, "rouge_l": 10.0}, {"seed": 1, "rouge_l": 12.0}, {"seed": 2, "rouge_l": 11.0}],
           # listed in another order and missing seed 1: paired on seeds 2 and 0 only
           "a": [{"seed": 2, "rouge_l": 14.0}, {"seed": 0, "rouge_l": 11.0}],
           "b": [{"seed": 1, "rouge_l": 9.0}],
           "same": [{"seed": s, "rouge_l": v} for s, v in ((0, 10.0), (1, 12.0), (2, 11.0))]}
    p = stats.paired(res)
    assert p["reference"] == "ref" and set(p["runs"]) == {"a", "b", "same"}
    a = p["runs"]["a"]
    assert a["seeds"] == 2 and a["mean"] == pytest.approx(2.0) and a["std"] == pytest.approx(2 ** 0.5)
    half = stats.t_quantile(0.975, 1) * 2 ** 0.5 / 2 ** 0.5
    assert a["ci95"] == pytest.approx((2.0 - half, 2.0 + half)) and a["better"] == 2
    assert p["runs"]["b"] == {"seeds": 1, "mean": -3.0, "std": 0.0, "ci95": None, "better": 0}
    assert p["runs"]["same"]["mean"] == 0.0 and p["runs"]["same"]["ci95"] == (0.0, 0.0)
    md = study_report.paired_table(p)
    assert "| a | 2 | +2.00 ± 1.41 |" in md and "| b | 1 | -3.00 | — | 0 of 1 |" in md
    assert stats.paired({"ref": res["ref"]}) == {}


def _grid(tmp_path, steps=8):
    path = tmp_path / "grid.yaml"
    path.write_text(f"""
job: pipeline/configs/debug_onpolicy.yaml
steps: {steps}
seeds: 1
embedded_pair: false
eval: {{sample_seeds: 2, kl_prompts: 4, max_new_tokens: 6}}
overrides: [--parallel.backend=none, --checkpoint.every=2, --train.eval_every=4, --rollout.max_new_tokens=6]
runs:
  fkl: {{method: fkl}}
  amid_kl: {{method: amid, options: {{alpha: -3.0, divergence: kl}}, tags: {{alpha: -3, family: kl}}}}
""")
    return str(path)


def _study(capsys, *args):
    """pipeline.study's command line in this process (its runs are still pipeline.train subprocesses): (exit code,
    stdout, stderr)."""
    capsys.readouterr()
    rc = study_cli.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_a_runs_cpu_time_is_its_own_not_the_wall_clock(tmp_path):
    """The runner's cost figures: a subprocess's exit code, wall and CPU seconds. CPU time leaves out waiting (a
    paused or contended run) and counts only that process: here a sleep costs wall time and no CPU, a busy loop both."""
    with open(tmp_path / "log", "w") as logf:
        rc, wall, cpu = runner._timed([sys.executable, "-c", "import sys, time; time.sleep(1.5); sys.exit(3)"],
                                     logf, dict(os.environ))
        assert rc == 3 and wall >= 1.5 and cpu < 0.8
        busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 1.0: pass"
        rc, wall, cpu = runner._timed([sys.executable, "-c", busy], logf, dict(os.environ))
        assert rc == 0 and 1.0 <= cpu <= wall + 0.1


def test_grid_resumes_an_interrupted_run_skips_finished_ones_and_refuses_a_changed_spec(tmp_path, capsys):
    grid, out = _grid(tmp_path), str(tmp_path / "out")
    # interrupt the grid while its first run trains: killed after the first checkpoint is complete (its directory is
    # renamed into place before COMPLETE is written; a kill between the two leaves nothing to resume from)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.study", "run", grid, "--out", out, "--threads", "1"],
                            cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    done = os.path.join(out, "fkl", "seed0", "checkpoints", "step_*[0-9]", checkpoint.MARKER)
    while not glob.glob(done) and time.time() < deadline:
        assert proc.poll() is None, "the grid ended before its first checkpoint"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(out, "fkl", "seed0", study_grid.RESULT))

    ledger = str(tmp_path / "ledger")
    rc, _, err = _study(capsys, "run", grid, "--out", out, "--threads", "1", "--record", ledger)
    assert rc == 0, err[-3000:]
    assert "0 of 2 runs done; 2 to run" in err
    assert "resumed from" in open(os.path.join(out, "fkl", "seed0", "study.log")).read()
    for name in ("fkl", "amid_kl"):
        res = json.load(open(os.path.join(out, name, "seed0", study_grid.RESULT)))
        assert len(res["rouge_l_seeds"]) == 2 and 0.0 <= res["rouge_l"] <= 100.0
        assert res["heldout_fkl"] > 0 and res["heldout_rkl"] > 0 and res["own_answers_fkl"] > 0
        assert set(res["curves"]) == {"0", "4", "8"}                          # step 0: the starting point
        # what it cost, in the result and the ledger: fkl was resumed, so its time here is only the last leg
        assert res["seconds"]["resumed"] == (name == "fkl") and res["seconds"]["threads"] == 1
        assert res["seconds"]["train"] > 0 and res["seconds"]["evaluate"] > 0
        for leg in ("train", "evaluate"):  # the subprocess's own CPU time: one compute thread, so at most its wall time
            assert 0 < res["seconds"][f"{leg}_cpu"] <= 1.5 * res["seconds"][leg] + 1
        assert json.load(open(os.path.join(ledger, name, "seed0.json")))["result"]["seconds"] == res["seconds"]
    md = open(os.path.join(out, "results.md")).read()
    assert "| amid_kl | 1 |" in md
    for col in ("ROUGE-L (sampled, mean of seeds)", "ROUGE-L (greedy)"):               # amid_kl against fkl
        assert f"against fkl: {col} of the run minus fkl's" in md and md.count("| amid_kl | 1 | ") == 3
    assert os.path.exists(os.path.join(out, "curves.png")) and os.path.exists(os.path.join(out, "alpha_trend.png"))
    assert "Run time over the 1 run that recorded it in one go (1 thread(s) a run)" in md  # amid_kl alone
    assert "; CPU minutes (user + system): training " in md

    # the temperature diagnostic: at temperature 1 it repeats the evaluation's first sampling seed
    rc, stdout, err = _study(capsys, "temperatures", grid, "--out", out, "--runs", "fkl", "--temperatures", "1.0,0.5")
    assert rc == 0, err[-3000:]
    fkl = json.load(open(os.path.join(out, "fkl", "seed0", study_grid.RESULT)))
    assert fkl["rouge_l_seeds"][0] != fkl["rouge_l_seeds"][1]  # the seeds' answers differ: the check below can fail
    assert json.loads(stdout.strip().splitlines()[-1])["fkl"]["1.0"] == pytest.approx(fkl["rouge_l_seeds"][0])
    rc, _, err = _study(capsys, "temperatures", grid, "--out", out, "--runs", "fkl,nope")
    assert rc == 2 and "no finished student of ['nope']" in err
    rc, _, err = _study(capsys, "temperatures", grid, "--out", out, "--runs", "fkl", "--temperatures", "1.0,abc")
    assert rc == 2 and "--temperatures '1.0,abc': give comma-separated numbers" in err

    # a warm start: a run of another grid continues fkl's final student; its step-0 evaluation is that student's last
    warm = tmp_path / "warm.yaml"
    warm.write_text(open(grid).read().replace("steps: 8", "steps: 2").split("runs:")[0]
                    + f"runs:\n  amid_kl: {{method: amid, options: {{alpha: -3.0, divergence: kl}}, "
                      f"init: {{grid: {grid}, run: fkl, out: {out}}}}}\n")
    rc, _, err = _study(capsys, "run", str(warm), "--out", str(tmp_path / "warm_out"), "--threads", "1")
    assert rc == 0, err[-3000:]
    warm_res = json.load(open(tmp_path / "warm_out" / "amid_kl" / "seed0" / study_grid.RESULT))
    base_curves = json.load(open(os.path.join(out, "fkl", "seed0", study_grid.RESULT)))["curves"]
    assert warm_res["curves"]["0"] == pytest.approx(base_curves["8"], rel=1e-4)
    assert warm_res["curves"]["0"]["kl"] < 0.9 * base_curves["0"]["kl"]    # not the job's own initial student
    warm.write_text(warm.read_text().replace(f"out: {out}", f"out: {tmp_path / 'nowhere'}"))
    rc, _, err = _study(capsys, "run", str(warm), "--out", str(tmp_path / "warm_out2"), "--threads", "1")
    assert rc == 2 and "starts from fkl seed 0's student, which is not finished" in err, err[-3000:]
    assert not os.path.exists(tmp_path / "warm_out2" / "amid_kl")              # refused before anything ran

    rc, stdout, err = _study(capsys, "run", grid, "--out", out, "--threads", "1")  # all done: nothing runs
    assert rc == 0 and "2 of 2 runs done; 0 to run" in err
    assert json.loads(stdout.strip().splitlines()[-1]) == {"done": 2, "ran": 0, "failed": 0}

    rc, _, err = _study(capsys, "run", _grid(tmp_path, steps=10), "--out", out)  # same names, another spec
    assert rc == 2 and "different spec" in err

    # another machine: no run directories, only the committed ledger; nothing reruns and the tables come back whole
    fresh = str(tmp_path / "fresh")
    rc, _, err = _study(capsys, "run", _grid(tmp_path), "--out", fresh, "--record", ledger)  # the grid as it was
    assert rc == 0 and "2 of 2 runs done; 0 to run" in err, err[-3000:]
    assert not os.path.exists(os.path.join(fresh, "fkl"))
    assert open(os.path.join(fresh, "results.md")).read() == open(os.path.join(out, "results.md")).read()
    entry = json.load(open(os.path.join(ledger, "amid_kl", "seed0.json")))
    assert entry["result"] == json.load(open(os.path.join(out, "amid_kl", "seed0", study_grid.RESULT)))
    rc, _, err = _study(capsys, "run", _grid(tmp_path, steps=10), "--out", fresh, "--record", ledger)
    assert rc == 2 and "records a run of a different spec" in err

    # results recorded before the evaluation measured the student's entropy: backfill recomputes it from the students
    grid = _grid(tmp_path)  # the grid as it was (the file was rewritten with steps=10 above)
    paths = {n: (os.path.join(ledger, n, "seed0.json"), os.path.join(out, n, "seed0", study_grid.RESULT))
             for n in ("fkl", "amid_kl")}
    want = {n: json.load(open(lp))["result"]["student_entropy"] for n, (lp, _) in paths.items()}
    assert want["fkl"] != want["amid_kl"]
    for lp, rp in paths.values():
        e, r = json.load(open(lp)), json.load(open(rp))
        del e["result"]["student_entropy"], r["student_entropy"]
        json.dump(e, open(lp, "w")), json.dump(r, open(rp, "w"))
    rc, stdout, err = _study(capsys, "backfill", grid, "--out", fresh, "--record", ledger)  # no students there
    assert rc == 0 and json.loads(stdout)["completed"] == [] and "no student under" in err, err[-3000:]
    rc, stdout, err = _study(capsys, "backfill", grid, "--out", out, "--record", ledger)
    assert rc == 0 and json.loads(stdout)["completed"] == ["fkl seed0", "amid_kl seed0"], err[-3000:]
    for n, (lp, rp) in paths.items():
        assert json.load(open(lp))["result"]["student_entropy"] == pytest.approx(want[n], rel=1e-5)
        assert json.load(open(rp))["student_entropy"] == pytest.approx(want[n], rel=1e-5)
    # a recorded KL that does not come back (another student): refused, nothing written
    lp = paths["amid_kl"][0]
    e = json.load(open(lp))
    del e["result"]["student_entropy"]
    e["result"]["heldout_fkl"] *= 1.01
    json.dump(e, open(lp, "w"))
    rc, _, err = _study(capsys, "backfill", grid, "--out", out, "--record", ledger)
    assert rc == 2 and "amid_kl seed 0: heldout_fkl recomputed" in err and "not the recorded run's student" in err
    assert "student_entropy" not in json.load(open(lp))["result"]


def test_grid_errors_name_the_field(tmp_path):
    bad = tmp_path / "g.yaml"
    job = "pipeline/configs/debug_onpolicy.yaml"
    for job_, seeds, run, match in [
            (job, 1, "{method: amid, options: {lam: 2}}", "run 'x': amid: lam"),
            ("nowhere.yaml", 1, "{method: fkl}", "does not exist"),
            (job, 1, "{method: fkl, init: {grid: bench/study/headline.yaml}}", "run 'x': init takes"),
            (job, 1, f"{{method: fkl, init: {{grid: {bad}, run: x}}}}", "a cycle"),
            (job, 5, "{method: fkl, init: {grid: bench/study/headline.yaml, run: fkl}}",
             "with 3 seed\\(s\\), this grid needs 5")]:
        bad.write_text(f"job: {job_}\nsteps: 2\nseeds: {seeds}\nruns: {{x: {run}}}\n")
        with pytest.raises(ValueError, match=match):
            study_grid.load_grid(str(bad))
    for g in ("headline", "alpha", "onpolicy", "curve", "warm", "lr"):          # the shipped grids load
        assert study_grid.load_grid(os.path.join(REPO, "bench", "study", g + ".yaml")).runs


def test_a_changed_data_file_is_a_different_spec(tmp_path):
    """Runs on the embedded pair depend on the prepared data: its digest is part of a run's identity."""
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train.write_text('{"prompt": "a", "response": "b"}\n')
    held.write_text('{"prompt": "c", "response": "d"}\n')
    inputs = runner.Inputs(("--model.teacher_path=t", f"--data.files=[{train}]", f"--data.eval_files=[{held}]"),
                          (str(train), str(held)))
    spec = study_grid.load_grid(os.path.join(REPO, "bench", "study", "curve.yaml")).runs[0]
    out = str(tmp_path / "out")
    os.makedirs(study_grid.run_dir(out, spec))
    with open(os.path.join(study_grid.run_dir(out, spec), study_grid.SPEC), "w") as f:
        json.dump(spec.key(inputs.identity()), f)
    assert study_grid.status(out, spec, inputs.identity()) == "partial"
    train.write_text('{"prompt": "a", "response": "another answer"}\n')           # the teacher answered anew
    with pytest.raises(ValueError, match="different spec"):
        study_grid.status(out, spec, inputs.identity())


def test_a_grid_computes_one_teacher_cache_per_instruction_job(tmp_path):
    """The runner's teacher caches: one per distinct (job, overrides) of instruction data, none for text jobs; the
    train command points the run at it."""
    grid = study_grid.load_grid(_grid(tmp_path))
    text = study_grid.RunSpec("text", 0, "fkl", {}, (), 2, os.path.join(REPO, "pipeline", "configs", "debug_cpu.yaml"))
    caches = runner.teacher_caches(grid.runs + [text], runner.Inputs(), str(tmp_path / "assets"), 1, lambda m: None)
    assert list(caches) == [(grid.runs[0].job, grid.runs[0].overrides)]      # both runs share the job's cache
    cache = caches[(grid.runs[0].job, grid.runs[0].overrides)]
    assert os.path.exists(os.path.join(cache, "index.json"))
    cmd = runner.train_command(grid.runs[0], str(tmp_path / "out"), (), cache)
    assert f"--loss.teacher_cache={cache}" in cmd


def test_grids_run_in_one_pool_seed_major_so_an_odd_last_run_never_idles_a_core(tmp_path, monkeypatch):
    """run_grids over two grids: a grid's odd last run of seed 0 runs beside the other grid's first run (not beside
    an idle slot), seeds stay in order across the grids, at most `jobs` runs at once, and on_done follows each. The
    runs themselves are replaced by a recorder: this is the scheduler's contract; test_grid_resumes... trains."""
    def spec(name, seed):
        return study_grid.RunSpec(name, seed, "fkl", {}, (), 2, "pipeline/configs/debug_onpolicy.yaml")
    a = study_grid.Grid([spec(n, s) for s in (0, 1) for n in ("a1", "a2", "a3")], embedded_pair=False)
    b = study_grid.Grid([spec(n, s) for s in (0, 1) for n in ("b1",)], embedded_pair=False)
    lock, running, events = threading.Lock(), [], []
    b1_started, overlapped = threading.Event(), []

    def execute(s, out, inputs, threads, log, record=None, cache=None):
        with lock:
            running.append(s.name)
            events.append(("start", s.name, s.seed, tuple(running), out))
        if (s.name, s.seed) == ("b1", 0):
            b1_started.set()
        if (s.name, s.seed) == ("a3", 0):  # the first grid's odd run: the second grid's first starts beside it
            overlapped.append(b1_started.wait(timeout=10))
        time.sleep(0.05)
        with lock:
            running.remove(s.name)
        return s.name != "b1" or s.seed == 0  # b1 seed 1 fails

    monkeypatch.setattr(runner, "execute", execute)
    finished = []
    counts = runner.run_grids([(a, str(tmp_path / "a"), None), (b, str(tmp_path / "b"), None)], jobs=2,
                             log=lambda m: None, on_done=lambda s: finished.append((s.name, s.seed)))
    assert counts == {"done": 7, "ran": 8, "failed": 1}
    starts = [(name, seed) for _, name, seed, _, _ in events]
    assert starts == [("a1", 0), ("a2", 0), ("a3", 0), ("b1", 0), ("a1", 1), ("a2", 1), ("a3", 1), ("b1", 1)]
    assert max(len(r) for *_, r, _ in events) == 2
    assert overlapped == [True]
    assert all(out.endswith("/a") == name.startswith("a") for _, name, _, _, out in events)
    assert sorted(finished) == sorted(set(starts) - {("b1", 1)})


def test_run_selects_runs_and_seeds_and_refuses_ones_the_grid_lacks(tmp_path, monkeypatch):
    """`run --only a,b --seeds 1,2`: exactly those runs of those seeds start (a warm start whose starting students
    are on this machine for one seed only, or a grid split across machines); a name or seed the grid lacks is an
    error that says what the grid has, before anything runs."""
    def spec(name, seed):
        return study_grid.RunSpec(name, seed, "fkl", {}, (), 2, "pipeline/configs/debug_onpolicy.yaml")
    grid = study_grid.Grid([spec(n, s) for s in (0, 1, 2) for n in ("a", "b", "c")], embedded_pair=False)
    started = []
    monkeypatch.setattr(runner, "execute", lambda s, *a, **k: started.append((s.name, s.seed)) or True)
    counts = runner.run_grid(grid, str(tmp_path), only={"a", "c"}, seeds={2, 1}, log=lambda m: None)
    assert started == [("a", 1), ("c", 1), ("a", 2), ("c", 2)] and counts == {"done": 4, "ran": 4, "failed": 0}
    started.clear()
    runner.run_grid(grid, str(tmp_path), seeds={0}, log=lambda m: None)
    assert started == [("a", 0), ("b", 0), ("c", 0)]
    started.clear()
    with pytest.raises(ValueError, match=r"\['d'\], which the grid does not run \(it runs a, b, c\)"):
        runner.run_grid(grid, str(tmp_path), only={"a", "d"}, log=lambda m: None)
    with pytest.raises(ValueError, match=r"--seeds \[3\]: the grid's training seeds are \[0, 1, 2\]"):
        runner.run_grid(grid, str(tmp_path), seeds={3}, log=lambda m: None)
    assert started == []
    grid_file = tmp_path / "g.yaml"
    grid_file.write_text("job: pipeline/configs/debug_onpolicy.yaml\nsteps: 2\nseeds: 1\nembedded_pair: false\n"
                         "runs: {x: {method: fkl}}\n")
    for bad in ("1,x", "-1"):
        assert study_cli.main(["run", str(grid_file), "--out", str(tmp_path / "o"), "--seeds", bad]) == 2
    assert started == []


def test_run_takes_several_grids_into_one_pool_each_with_its_own_out_and_ledger(tmp_path, monkeypatch, capsys):
    """`run A.yaml B.yaml --out 'DIR/{grid}' --record 'DIR/{grid}/ledger'`: both grids' runs in one pool, seed-major,
    each run in its grid's directory and ledger, then each grid's table; several grids with a path that has no
    {grid} would mix them, and are refused before anything runs."""
    paths = []
    for name, runs in (("first", "{a: {method: fkl}, b: {method: rkl}}"), ("second", "{c: {method: skl}}")):
        paths.append(tmp_path / f"{name}.yaml")
        paths[-1].write_text(f"job: pipeline/configs/debug_onpolicy.yaml\nsteps: 2\nseeds: 2\nembedded_pair: false\n"
                             f"runs: {runs}\n")
    started = []
    monkeypatch.setattr(runner, "execute", lambda s, out, inputs, threads, log, record=None, cache=None:
                        started.append((s.name, s.seed, os.path.relpath(out, tmp_path),
                                        record and os.path.relpath(record, tmp_path))) or True)
    monkeypatch.setattr(study_cli, "report", lambda grid, out, record=None: {"table": f"table of {grid.runs[0].name}"})
    args = ["run", *map(str, paths), "--out", str(tmp_path / "{grid}"), "--record", str(tmp_path / "{grid}" / "led")]
    assert study_cli.main(args + ["--jobs", "1"]) == 0
    assert started == [("a", 0, "first", "first/led"), ("b", 0, "first", "first/led"), ("c", 0, "second", "second/led"),
                       ("a", 1, "first", "first/led"), ("b", 1, "first", "first/led"), ("c", 1, "second", "second/led")]
    printed = capsys.readouterr().out
    assert "table of a" in printed and "table of c" in printed and '"ran": 6' in printed
    started.clear()
    assert study_cli.main(args + ["--seeds", "1", "--only", "c"]) == 0
    assert started == [("c", 1, "second", "second/led")]
    started.clear()
    for bad in (["--record", str(tmp_path / "ledger")], ["--out", str(tmp_path / "o")], ["--only", "d"]):
        assert study_cli.main(["run", *map(str, paths), *bad]) == 2
    assert "with several grids, give a path with {grid}" in capsys.readouterr().err
    assert started == []
