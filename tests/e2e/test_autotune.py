"""End-to-end `ztune autotune`: real torchrun trial groups on 2 gloo ranks.

Fault tests use a small user script (the --script protocol, docs/autotune.md) whose step time and
failures follow from its config, so each trial costs a couple of seconds; one test runs the built-in
workload (a real model through ztune.initialize) on a model small enough for this 2-core machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.e2e.strays import describe, marked, wait_none_marked
from tests.helpers.load import explain_limit, scaled_limit_s

# pytest-timeout's net (pyproject: 300 s) is too tight for a whole search on a busy machine; each run
# here has its own load-scaled limit with a message that says what was slow.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]

# A user training script speaking the trial protocol: it reads its config from $ZTUNE_CONFIG and reports
# every step through TrialReporter. Step time grows with the ZeRO stage and the number of micro-steps;
# --crash-stage raises, --hang-stage blocks forever, and every micro-step of --alloc-stage holds micro x
# --alloc-mib MiB of real memory (a tensor), so a memory cap makes its large micro-batches run out of memory
# for real.
FAKE_SCRIPT = textwrap.dedent('''
    import argparse, os, time
    import torch, torch.distributed as dist
    from ztune.config import load
    from ztune.runtime.trial_report import TrialReporter

    p = argparse.ArgumentParser()
    p.add_argument("--crash-stage", type=int, default=-1)
    p.add_argument("--hang-stage", type=int, default=-1)
    p.add_argument("--alloc-mib", type=int, default=0)
    p.add_argument("--alloc-stage", type=int, default=-1)  # -1: every stage
    p.add_argument("--step-s", type=float, default=0.02)
    a = p.parse_args()
    dist.init_process_group("gloo")
    cfg = load(os.environ["ZTUNE_CONFIG"])
    world = dist.get_world_size()
    accum = cfg.grad_accum_for(world)
    rep = TrialReporter.from_env()
    step = 0
    while True:
        step += 1
        if cfg.zero.stage == a.crash_stage and step == 2:
            raise ValueError(f"injected crash at stage {cfg.zero.stage}")
        if cfg.zero.stage == a.hang_stage and step == 2:
            time.sleep(3600)
        for _ in range(accum):
            alloc = a.alloc_mib if a.alloc_stage in (-1, cfg.zero.stage) else 0
            held = torch.ones(cfg.batch.micro * alloc * 2**18) if alloc else None
            time.sleep(a.step_s * (1 + 0.5 * cfg.zero.stage) / accum + 0.01)
            del held
        t = torch.ones(1)
        dist.all_reduce(t)
        rep.record_step(None, loss=1.0 / step)
''')


# Safety net for one `ztune autotune` run of a test here (idle machine: 20-80 s), scaled by the load; the
# trials' own hang detection is what the tests check, this only stops a test that would never end.
AUTOTUNE_BASE_LIMIT_S = 300.0


def _ztune(args: list[str], *, cwd: Path, base_limit_s: float = AUTOTUNE_BASE_LIMIT_S) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="200")
    t0 = time.monotonic()
    try:
        return subprocess.run([sys.executable, "-m", "ztune", "autotune", *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=scaled_limit_s(base_limit_s))
    except subprocess.TimeoutExpired:
        out = Path(args[args.index("--out") + 1]) if "--out" in args else None
        raise AssertionError(explain_limit("ztune autotune", time.monotonic() - t0, base_limit_s) + "; "
                             + _progress(out)) from None


def _progress(out: Path | None) -> str:
    """What the tuner had done, from its journal: trials finished (status, wall time), trial running."""
    journal = out / "journal.jsonl" if out is not None else None
    if journal is None or not journal.exists():
        return "no journal written (slow before the first trial)"
    records = _journal(journal)
    done = [f"{r['key']}: {r['status']} in {r['wall_s']:.0f} s" for r in records if r["kind"] == "trial"]
    started = [r["key"] for r in records if r["kind"] == "start"]
    running = started[len(done):]
    return f"trials finished: {done or 'none'}; running: {running or 'none'}"


def _journal(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def fake_script(tmp_path: Path) -> Path:
    path = tmp_path / "train.py"
    path.write_text(FAKE_SCRIPT)
    return path


def test_failed_trials_are_recorded_and_never_stop_the_search(tmp_path: Path, fake_script: Path) -> None:
    out = tmp_path / "out"
    # Stage 1 crashes, stage 2 hangs with no step for 10 s, stage 0 at micro-batch 4 needs 4 x 128 MiB on top
    # of a ~200 MiB process under a 560 MiB cap (RLIMIT_DATA): a real allocation failure. Each failure is
    # planted in one family (stage), whatever order the estimate ranks them in: an OOM tells the tuner that
    # every candidate the model predicts to need more memory would run out too (tune/rank.py), and the model
    # predicts stage 0 needs the most, so an OOM planted at stage 1 or 2 would rightly rule stage 0 out.
    # The stall limit that marks the hang is given explicitly (given limits are not load-scaled by the
    # tuner): 10 s on an idle machine, stretched by the load here, or a slow crash or OOM trial on a busy
    # machine would end as a "timeout" before it could crash. No confirmation rounds: they re-measure the
    # leaders (4 more trials, ~35 s here) and are not what this test is about (tests/unit/test_tune_confirm.py).
    stall_s = round(scaled_limit_s(10.0))
    t0 = time.monotonic()
    proc = _ztune(["--model", "tiny-gpt", "--global-batch", "8", "--seq", "32", "--stages", "0,1,2",
                   "--vary", "stage,micro", "--warmup", "1", "--steps", "2", "--min-trials", "99", "--confirm", "0",
                   "--trial-timeout", "600", "--stall-timeout", str(stall_s), "--memory-cap", "560MiB",
                   "--out", str(out), "--json",
                   "--script", str(fake_script), "--", "--crash-stage", "1", "--hang-stage", "2",
                   "--alloc-mib", "128", "--alloc-stage", "0"], cwd=tmp_path)
    wall_s = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    trials = {t["key"]: t for t in result["trials"]}
    statuses = [t["status"] for t in result["trials"]]
    assert {"crash", "timeout", "oom", "ok"} <= set(statuses), {
        k: (t["status"], t["reason"][:100], f"{t['wall_s']:.0f} s") for k, t in trials.items()}
    crash = next(t for t in result["trials"] if t["status"] == "crash")
    assert crash["stage"] == 1 and "injected crash at stage 1" in crash["reason"]
    hang = next(t for t in result["trials"] if t["status"] == "timeout")
    assert hang["stage"] == 2 and f"no new step for {stall_s} s" in hang["reason"], hang["reason"]
    oom = next(t for t in result["trials"] if t["status"] == "oom")
    assert oom["stage"] == 0 and oom["micro"] == 4 and "memory" in oom["reason"]
    # Failures never ended the search: it ran until nothing was left, and after the OOM at micro-batch 4
    # the family's next trial bisected down to a smaller micro-batch.
    assert result["stop_reason"].startswith("every candidate"), result["stop_reason"]
    assert all(t["status"] == "oom" for t in result["trials"] if t["micro"] == 4 and t["stage"] == 0)
    after_oom = [t for t in result["trials"][result["trials"].index(oom) + 1:] if t["stage"] == oom["stage"]]
    assert after_oom and after_oom[0]["micro"] < 4
    best = result["best"]
    assert best is not None and best["stage"] == 0 and trials[best["key"]]["status"] == "ok"
    # The journal holds every trial exactly once, and no trial process outlived the tuner.
    records = [r for r in _journal(out / "journal.jsonl") if r["kind"] == "trial"]
    assert sorted(r["key"] for r in records) == sorted(trials)
    assert (out / "best.yaml").is_file() and (out / "autotune.png").stat().st_size > 1000
    print(f"faults: {len(trials)} trials in {wall_s:.1f} s: {statuses}")


def test_sigkill_then_resume_repeats_no_finished_trial(tmp_path: Path, fake_script: Path,
                                                       no_stray_processes: str) -> None:
    out = tmp_path / "out"
    args = ["--model", "tiny-gpt", "--global-batch", "8", "--seq", "32", "--stages", "0,1,2,3", "--vary",
            "stage,micro", "--micro", "2,4", "--warmup", "1", "--steps", "2", "--min-trials", "99",
            "--max-trials", "5", "--out", str(out), "--json", "--script", str(fake_script), "--",
            "--step-s", "0.3"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    tuner = subprocess.Popen([sys.executable, "-m", "ztune", "autotune", *args], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = out / "journal.jsonl"
    deadline = time.monotonic() + scaled_limit_s(AUTOTUNE_BASE_LIMIT_S)
    killed_in: dict | None = None
    while time.monotonic() < deadline and tuner.poll() is None:
        records = _journal(journal) if journal.exists() else []
        finished = [r for r in records if r["kind"] == "trial"]
        started = [r for r in records if r["kind"] == "start"]
        if len(finished) >= 2 and len(started) > len(finished):  # kill in the middle of trial 3
            tuner.send_signal(signal.SIGKILL)
            killed_in = started[-1]
            break
        time.sleep(0.2)
    if killed_in is None:
        tuner.kill()
    tuner.wait(timeout=10)
    assert killed_in is not None, ("the tuner finished or was too slow to reach its third trial; "
                                   + _progress(out))
    before = [r for r in _journal(journal) if r["kind"] == "trial"]
    # The trial the tuner died in must not keep running: every process of it ends with the tuner.
    wait_none_marked(no_stray_processes, what="the SIGKILLed tuner")
    pgid = killed_in["pgid"]
    proc = _ztune(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    after = [r for r in _journal(journal) if r["kind"] == "trial"]
    keys = [r["key"] for r in after]
    assert len(keys) == len(set(keys)), f"a finished trial ran twice: {keys}"
    assert [r["key"] for r in after[: len(before)]] == [r["key"] for r in before]
    # The trial the tuner died in had no result; the resumed run measured it (same ranking, same pick).
    assert after[len(before)]["key"] == killed_in["key"]
    assert result["num_trials"] == 5 and result["new_trials"] == 5 - len(before)
    assert sum(t["from_journal"] for t in result["trials"]) == len(before)
    assert not _group_alive(pgid), "the killed tuner's trial group is still running"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _trial_processes(marker: str, script: Path) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """(torchrun agents, ranks) of the running trial: ranks run `python -u SCRIPT`, the agent names it too."""
    agents, ranks = [], []
    for p in marked(marker):
        try:
            cmd = p.cmdline()
        except psutil.Error:
            continue
        if str(script) not in cmd:
            continue
        if "torch.distributed.run" in cmd:
            agents.append(p)
        elif cmd[1:3] == ["-u", str(script)]:
            ranks.append(p)
    return agents, ranks


@pytest.mark.parametrize("victims", ["tuner", "torchrun then tuner"])
def test_sigkill_during_a_hanging_trial_leaves_no_process(tmp_path: Path, fake_script: Path, victims: str,
                                                          no_stray_processes: str) -> None:
    """Issue 10.4: SIGKILL the tuner (and, second case, torchrun first: the ranks must not rely on torchrun's
    own teardown) while a trial hangs; every process of the trial must go, ranks in their own sessions too."""
    marker = no_stray_processes
    out = tmp_path / "out"
    args = ["--model", "tiny-gpt", "--global-batch", "8", "--seq", "32", "--stages", "0", "--vary", "stage",
            "--warmup", "1", "--steps", "2", "--trial-timeout", "3600", "--stall-timeout", "3600",
            "--out", str(out), "--script", str(fake_script), "--", "--hang-stage", "0"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    tuner = subprocess.Popen([sys.executable, "-m", "ztune", "autotune", *args], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base_limit_s = 120.0
    t0 = time.monotonic()
    report = out / "trials"
    try:
        while True:  # until both ranks have reported a step: the next one hangs (time.sleep(3600))
            agents, ranks = _trial_processes(marker, fake_script)
            steps = sum(1 for f in report.glob("*.report.jsonl") for line in f.read_text().splitlines()
                        if '"step"' in line) if report.is_dir() else 0
            if len(agents) == 1 and len(ranks) == 2 and steps >= 1:
                break
            assert tuner.poll() is None, f"the tuner ended early: {tuner.stderr.read()[-2000:]}"
            assert time.monotonic() - t0 < scaled_limit_s(base_limit_s), explain_limit(
                "reaching the hanging step of the first trial", time.monotonic() - t0, base_limit_s) + \
                f"; trial processes so far:\n  {describe(agents + ranks)}"
            time.sleep(0.2)
        # torchrun starts each rank in a session of its own: a kill of torchrun's group never reaches them.
        assert all(os.getsid(r.pid) != os.getsid(agents[0].pid) for r in ranks)
        time.sleep(1.0)  # well inside the hang
        if victims.startswith("torchrun"):
            agents[0].kill()
        tuner.kill()
        tuner.wait(timeout=30)
        t_kill = time.monotonic()
        gone_s = wait_none_marked(marker, what=f"the SIGKILLed {victims}")
        print(f"SIGKILL {victims} during a hang: every trial process gone {gone_s:.1f} s later "
              f"(ranks were {[r.pid for r in ranks]}, {time.monotonic() - t_kill:.1f} s)")
    finally:
        if tuner.poll() is None:
            tuner.kill()
            tuner.wait()


def test_journal_from_another_space_is_refused(tmp_path: Path, fake_script: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "journal.jsonl").write_text(json.dumps({"kind": "header", "version": 1, "fingerprint": "other",
                                                   "space": {"seq_len": 999}}) + "\n")
    proc = _ztune(["--model", "tiny-gpt", "--global-batch", "4", "--seq", "32", "--out", str(out),
                   "--script", str(fake_script)], cwd=tmp_path, base_limit_s=60)
    assert proc.returncode == 2
    assert "different tuning run" in proc.stderr and "seq_len" in proc.stderr and "--fresh" in proc.stderr


NANO_MODEL = """\
name: nano-gpt
architecture: gpt2
vocab_size: 512
hidden_size: 64
num_layers: 2
num_heads: 4
num_kv_heads: 4
intermediate_size: 256
max_seq_len: 64
tied_embeddings: true
attention_bias: true
attention_out_bias: true
"""


def test_builtin_workload_picks_and_exports_a_config(tmp_path: Path) -> None:
    model = tmp_path / "nano.yaml"
    model.write_text(NANO_MODEL)
    out = tmp_path / "out"
    proc = _ztune(["--model", str(model), "--global-batch", "4", "--seq", "32", "--stages", "0,3",
                   "--vary", "stage,micro", "--warmup", "1", "--steps", "2", "--min-trials", "2",
                   "--max-trials", "3", "--export", "deepspeed", "--out", str(out), "--json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["trained"] and result["best"] is not None
    ok = [t for t in result["trials"] if t["status"] == "ok"]
    assert len(ok) >= 2
    for t in ok:
        assert t["step_time_s"] > 0 and t["peak_memory_bytes"] > 0 and t["last_loss"] > 0
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["zero"]["stage"] == result["best"]["stage"] and best["batch"]["micro"] == result["best"]["micro"]
    ds = json.loads((out / "best.deepspeed.json").read_text())
    assert ds["zero_optimization"]["stage"] == result["best"]["stage"]
    assert ds["train_micro_batch_size_per_gpu"] == result["best"]["micro"]
    assert (out / "autotune.png").read_bytes()[:4] == b"\x89PNG"
