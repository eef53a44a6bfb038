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

from tests.helpers.load import scaled_limit_s
from tests.helpers.spawn import free_port

pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "deepspeed"
RUNNER = ROOT / "tests" / "helpers" / "run_script.py"
LOSS_RTOL = 1e-5
README_OUT_ENV = "ZTUNE_TEST_README_OUT"
README_IMPORT = "import ztune as deepspeed            # was: import deepspeed"
# Appended to both versions of the README snippet: rank 0's last loss and its parameters' sum, as JSON.
README_EPILOGUE = f"""
import json, os
if engine.global_rank == 0:
    with open(os.environ["{README_OUT_ENV}"], "w") as f:
        json.dump([loss.item(), sum(p.double().sum().item() for p in engine.module.parameters())], f)
"""
# No gradient_clipping: DeepSpeed 0.19.8's default (1.0) applies, under both.
README_CONFIG = {"train_batch_size": 32, "gradient_accumulation_steps": 2, "zero_optimization": {"stage": 2},
                 "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}}}


def _torchrun_both(runs: dict[str, tuple[Path, list[str], Path]]) -> dict:
    """{name: (script, args, out)} -> {name: the JSON the run wrote to out}: each a 2-rank torchrun job, all at
    once (their process starts and rendezvous waits overlap: most of an example's wall time on 2 cores)."""
    procs = {}
    for name, (script, args, out) in runs.items():
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", README_OUT_ENV: str(out),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        if script.name != "readme_snippet.py":  # the README's snippet has no --losses_out (see README_EPILOGUE)
            args = [*args, "--losses_out", str(out)]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(RUNNER), str(script), *args]
        procs[name] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results, limit = {}, scaled_limit_s(420)
    try:
        for name, proc in procs.items():
            output, _ = proc.communicate(timeout=limit)
            assert proc.returncode == 0, f"{name}: {output[-4000:]}"
            results[name] = json.loads(runs[name][2].read_text())
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


def _convert(original: str) -> str:
    """The ztune version of a DeepSpeed script: its import line changed, and nothing else (asserted)."""
    converted = original.replace("\nimport deepspeed\n", "\nimport ztune as deepspeed\n")
    changed = [line for line in difflib.unified_diff(original.splitlines(), converted.splitlines(), lineterm="", n=0)
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert changed == ["-import deepspeed", "+import ztune as deepspeed"]
    return converted


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
    ztune_script = tmp_path / script
    ztune_script.write_text(_convert((EXAMPLES / script).read_text()))
    jobs = {}
    for name, path in (("deepspeed", EXAMPLES / script), ("ztune", ztune_script)):
        (tmp_path / name).mkdir()
        jobs[name] = (path, SCRIPTS[script](tmp_path / name), tmp_path / name / "losses.json")
    runs = _torchrun_both(jobs)
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


def test_readme_snippet_is_a_deepspeed_script_converted_by_its_import_line(tmp_path):
    """The README's runtime section: its snippet, with the import line put back to `import deepspeed`, runs
    under DeepSpeed, and as written under ztune, to the same last loss and parameters."""
    pytest.importorskip("deepspeed")
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("A DeepSpeed script runs by changing its import line"):]
    body = section[section.index("```python\n") + len("```python\n"):]
    snippet = body[:body.index("\n```")] + "\n"
    assert snippet.count(README_IMPORT) == 1 and "deepspeed.initialize(args=args" in snippet
    original = snippet.replace(README_IMPORT, "import deepspeed") + README_EPILOGUE
    assert _convert(original) == snippet.replace(README_IMPORT, "import ztune as deepspeed") + README_EPILOGUE
    config = tmp_path / "ds_config.json"
    config.write_text(json.dumps(README_CONFIG))
    jobs = {}
    for name, text in (("deepspeed", original), ("ztune", _convert(original))):
        (tmp_path / name).mkdir()
        script = tmp_path / name / "readme_snippet.py"
        script.write_text(text)
        jobs[name] = (script, ["--deepspeed", "--deepspeed_config", str(config)], tmp_path / name / "losses.json")
    runs = _torchrun_both(jobs)
    assert runs["ztune"] == pytest.approx(runs["deepspeed"], rel=LOSS_RTOL)
