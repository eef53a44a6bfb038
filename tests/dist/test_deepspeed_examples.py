"""The DeepSpeed-style scripts in examples/deepspeed run under DeepSpeed 0.19.8 and under ztune on 2 CPU ranks
(torchrun, gloo) with the import line as the only difference, and give the same losses (fp32)."""

from __future__ import annotations

import difflib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.spawn import free_port
from tests.helpers.load import scaled_limit_s

pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "deepspeed"
RUNNER = ROOT / "tests" / "helpers" / "run_script.py"
LOSS_RTOL = 1e-5


def _torchrun(script: Path, config: Path, out: Path) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(RUNNER), str(script), "--deepspeed", "--deepspeed_config", str(config), "--losses_out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=scaled_limit_s(420))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize(("script", "config"), [("image_classifier.py", "ds_config_classifier.json"),
                                                ("gpt2_finetune.py", "ds_config_gpt2.json")])
def test_example_runs_under_both_with_the_same_losses(script, config, tmp_path):
    pytest.importorskip("deepspeed")
    original = (EXAMPLES / script).read_text()
    converted = original.replace("\nimport deepspeed\n", "\nimport ztune as deepspeed\n")
    changed = [line for line in difflib.unified_diff(original.splitlines(), converted.splitlines(), lineterm="", n=0)
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert changed == ["-import deepspeed", "+import ztune as deepspeed"]
    ztune_script = tmp_path / script
    ztune_script.write_text(converted)
    theirs = _torchrun(EXAMPLES / script, EXAMPLES / config, tmp_path / "deepspeed.json")
    ours = _torchrun(ztune_script, EXAMPLES / config, tmp_path / "ztune.json")
    assert len(ours) == len(theirs) >= 8
    assert ours == pytest.approx(theirs, rel=LOSS_RTOL)
    assert ours[-1] < ours[0]  # it learns
