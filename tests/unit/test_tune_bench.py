"""Trial outcome classification and the trial reporter (runtime/trial_report.py), without processes."""

from __future__ import annotations

import pytest

from ztune.runtime.trial_report import TrialReporter, read_report
from ztune.tune.bench import classify, torchrun_command

TORCHRUN_FAILURE = """\
[rank1]: Traceback (most recent call last):
[rank1]:   File "/tmp/train.py", line 22, in <module>
[rank1]:     raise ValueError("bad shape")
[rank1]: ValueError: bad shape
E1124 11:29:13.842000 24597 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1)
Traceback (most recent call last):
  File "/usr/lib/python3.11/runpy.py", line 198, in _run_module_as_main
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
/tmp/train.py FAILED
"""


def test_classify_each_outcome() -> None:
    done = {"steps": [{}] * 3, "done": {"step_time_s": 0.1}}
    assert classify(exit_code=0, output="", report=done, timed_out="", memory_capped=False) == ("ok", "")
    status, reason = classify(exit_code=1, output=TORCHRUN_FAILURE, report={"steps": []}, timed_out="",
                              memory_capped=False)
    assert status == "crash" and reason.endswith("ValueError: bad shape")
    status, reason = classify(exit_code=None, output="", report={"steps": [{}]}, timed_out="no new step for 9 s",
                              memory_capped=False)
    assert status == "timeout" and "no new step for 9 s" in reason and "1 steps" in reason
    oom_text = "[rank0]: RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 bytes"
    assert classify(exit_code=1, output=oom_text, report={}, timed_out="", memory_capped=True)[0] == "oom"
    assert classify(exit_code=1, output="torch.OutOfMemoryError: CUDA out of memory.", report={}, timed_out="",
                    memory_capped=False)[0] == "oom"
    # SIGKILL under a cap is the OOM killer; without a cap it is a crash.
    assert classify(exit_code=-9, output="", report={}, timed_out="", memory_capped=True)[0] == "oom"
    assert classify(exit_code=-9, output="", report={}, timed_out="", memory_capped=False)[0] == "crash"
    status, reason = classify(exit_code=0, output="", report={"steps": [{}]}, timed_out="", memory_capped=False)
    assert status == "crash" and "without a finished trial report" in reason


def test_reporter_measures_steps_after_warmup_and_exits(tmp_path) -> None:
    path = tmp_path / "r.jsonl"
    rep = TrialReporter(path=str(path), warmup_steps=2, measured_steps=3)
    assert [rep.record_step(loss=4.0 - i) for i in range(4)] == [False] * 4
    with pytest.raises(SystemExit) as exc:
        rep.record_step(loss=0.5)
    assert exc.value.code == 0 and rep.should_stop
    report = read_report(path)
    assert [s["warmup"] for s in report["steps"]] == [True, True, False, False, False]
    done = report["done"]
    assert done["measured_steps"] == 3 and len(done["step_times_s"]) == 3
    assert done["peak_memory_bytes"] > 10 << 20 and done["first_loss"] == 4.0 and done["last_loss"] == 0.5
    assert min(done["step_times_s"]) <= done["step_time_s"] <= max(done["step_times_s"])


def test_reporter_without_exit_sets_should_stop_and_only_rank0_writes(tmp_path) -> None:
    path = tmp_path / "r.jsonl"
    rep = TrialReporter(path=str(path), warmup_steps=0, measured_steps=1, exit_when_done=False)
    assert rep.record_step() is True and rep.should_stop
    other = TrialReporter(path=str(tmp_path / "r1.jsonl"), warmup_steps=0, measured_steps=1, rank=1,
                          world_size=2, exit_when_done=False)
    other._write({"event": "x"})
    assert not (tmp_path / "r1.jsonl").exists()


def test_torchrun_command_is_an_argv_list() -> None:
    argv = torchrun_command(nproc=2, script="train.py", script_args=["--lr", "1e-3"])
    # torchrun through the lifeline (SIGTERM when the tuner dies), every worker through it too (SIGKILL
    # when torchrun dies).
    assert argv[1:4] == ["-m", "ztune.launch.lifeline_run", "TERM"]
    run = argv.index("torch.distributed.run")
    assert argv[run + 1:run + 3] == ["--standalone", "--nproc-per-node=2"]
    assert argv[run + 3:] == ["-m", "ztune.launch.lifeline_run", "KILL", "__python__", "-u", "train.py", "--lr",
                              "1e-3"]


def test_noted_loss_is_reported_by_the_next_step_without_one(tmp_path) -> None:
    path = tmp_path / "r.jsonl"
    rep = TrialReporter(path=str(path), warmup_steps=0, measured_steps=2, exit_when_done=False)
    rep.note_loss(3.5)
    rep.record_step()  # e.g. the engine's call, which has no loss
    rep.record_step()
    steps = read_report(path)["steps"]
    assert [s["loss"] for s in steps] == [3.5, None]


def test_tuner_side_never_imports_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, ztune.cli, ztune.tune.tuner, ztune.tune.bench, ztune.tune.rank, ztune.tune.calibrate, "
            "ztune.tune.journal, ztune.tune.space, ztune.runtime.trial_report; "
            "from ztune.tune.bench import _protocol; _protocol(); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_derived_trial_limits_widen_with_load_and_given_ones_do_not() -> None:
    from ztune.tune.tuner import STALL_FLOOR_S, TIMEOUT_FACTOR, TIMEOUT_FLOOR_S, trial_limits_s

    idle = trial_limits_s(predicted_wall_s=10.0, predicted_step_s=0.1, trial_timeout_s=None, stall_timeout_s=None,
                          budget_left_s=None, load=1.0)
    assert idle == (TIMEOUT_FLOOR_S + TIMEOUT_FACTOR * 10.0, STALL_FLOOR_S)
    busy = trial_limits_s(predicted_wall_s=10.0, predicted_step_s=0.1, trial_timeout_s=None, stall_timeout_s=None,
                          budget_left_s=None, load=4.0)
    assert busy == (4.0 * idle[0], 4.0 * idle[1])
    given = trial_limits_s(predicted_wall_s=10.0, predicted_step_s=0.1, trial_timeout_s=90.0, stall_timeout_s=10.0,
                           budget_left_s=None, load=4.0)
    assert given == (90.0, 10.0)
    capped = trial_limits_s(predicted_wall_s=10.0, predicted_step_s=0.1, trial_timeout_s=None, stall_timeout_s=None,
                            budget_left_s=5.0, load=4.0)
    assert capped[0] == TIMEOUT_FLOOR_S
