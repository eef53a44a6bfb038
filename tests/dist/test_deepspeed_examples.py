"""The DeepSpeed-style scripts in examples/deepspeed run under DeepSpeed 0.19.8 and under ztune on 2 CPU ranks
(torchrun, gloo) with the import line as the only difference, and give the same losses (fp32, within LOSS_RTOL
relative). Each script runs once per framework: the test rewrites `import deepspeed` into
`import ztune as deepspeed` in a copy and checks that this is the whole diff."""

from __future__ import annotations

import difflib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.spawn import free_port

pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "deepspeed"
RUNNER = ROOT / "tests" / "helpers" / "run_script.py"
LOSS_RTOL = 1e-5


def _torchrun(script: Path, args: list[str], out: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(RUNNER), str(script), *args, "--losses_out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def _config_args(config: str):
    return lambda run_dir: ["--deepspeed", "--deepspeed_config", str(EXAMPLES / config)]


# script -> its arguments for a run whose scratch folder is run_dir
SCRIPTS = {
    "image_classifier.py": _config_args("ds_config_classifier.json"),
    "gpt2_finetune.py": _config_args("ds_config_gpt2.json"),
    "bert_mlm.py": lambda run_dir: ["--checkpoint_dir", str(run_dir / "checkpoints"), "--save_at", "3",
                                    *_config_args("ds_config_bert.json")(run_dir)],
    "hf_causal_lm.py": lambda run_dir: ["--ds_config", str(EXAMPLES / "ds_config_zero3_hf.json")],
}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_example_runs_under_both_with_the_same_losses(script, tmp_path):
    pytest.importorskip("deepspeed")
    original = (EXAMPLES / script).read_text()
    converted = original.replace("\nimport deepspeed\n", "\nimport ztune as deepspeed\n")
    changed = [line for line in difflib.unified_diff(original.splitlines(), converted.splitlines(), lineterm="", n=0)
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert changed == ["-import deepspeed", "+import ztune as deepspeed"]
    ztune_script = tmp_path / script
    ztune_script.write_text(converted)
    runs = {}
    for name, path in (("deepspeed", EXAMPLES / script), ("ztune", ztune_script)):
        (tmp_path / name).mkdir()
        runs[name] = _torchrun(path, SCRIPTS[script](tmp_path / name), tmp_path / name / "losses.json")
    theirs, ours = runs["deepspeed"], runs["ztune"]
    if script == "bert_mlm.py":
        # After load_checkpoint the script replays the optimizer steps after the save: the same losses again.
        for run in (theirs, ours):
            assert run["resumed"] == pytest.approx(run["losses"][3:], rel=LOSS_RTOL)
        assert ours["resumed"] == pytest.approx(theirs["resumed"], rel=LOSS_RTOL)
        theirs, ours = theirs["losses"], ours["losses"]
    assert len(ours) == len(theirs) >= 6
    assert ours == pytest.approx(theirs, rel=LOSS_RTOL)
    assert ours[-1] < ours[0]  # it learns
