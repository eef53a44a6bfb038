"""`ztune estimate --config` with DeepSpeed JSON: legacy keys honoured (cpu_offload), batch sizes derived by
DeepSpeed's rules, "auto" resolved from the model profile and --precision, ignored keys listed."""

import json
import subprocess
import sys

from tests.helpers.load import scaled_limit_s


def run(*args):
    return subprocess.run([sys.executable, "-m", "ztune", "estimate", *args], capture_output=True, text=True,
                          timeout=scaled_limit_s(120))


def _estimate(tmp_path, doc, *extra):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(doc))
    out = run("--model", "llama-2-13b", "--hardware", "dgx-h100", "--seq", "1024", "--config", str(path), *extra)
    return out


def test_legacy_cpu_offload_and_ignored_keys(tmp_path):
    doc = {"train_batch_size": 64, "zero_optimization": {"stage": 2, "cpu_offload": True, "overlap_comm": True}}
    out = _estimate(tmp_path, doc, "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    row = result["rows"][0]
    assert row["offload_optimizer"] == "cpu" and row["micro_batch"] == 8  # 64 / 8 GPUs, accumulation 1
    assert result["ignored_deepspeed_keys"] == ["zero_optimization.overlap_comm"]
    doc["zero_optimization"]["cpu_offload"] = False
    without = json.loads(_estimate(tmp_path, doc, "--json").stdout)["rows"][0]
    assert without["offload_optimizer"] == "none"
    assert row["memory_per_gpu"]["optimizer"] < without["memory_per_gpu"]["optimizer"]


def test_table_lists_ignored_keys_and_auto_needs_precision(tmp_path):
    doc = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": "auto"},
           "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_max_live_parameters": 1e9}}
    out = _estimate(tmp_path, doc, "--precision", "bf16")
    assert out.returncode == 0, out.stderr
    assert "ignored DeepSpeed keys: zero_optimization.stage3_max_live_parameters" in out.stdout
    bad = _estimate(tmp_path, doc)
    assert bad.returncode == 2 and "bf16.enabled: \"auto\"" in bad.stderr and "Traceback" not in bad.stderr
    doc["train_batch_size"] = 30  # 30 is not 2 x accumulation x 8 GPUs: DeepSpeed's keys in the message
    bad = _estimate(tmp_path, doc, "--precision", "bf16")
    assert bad.returncode == 2 and "train_batch_size 30 is not divisible by train_micro_batch_size_per_gpu 2" \
        in bad.stderr


def test_flags_that_change_the_config_are_checked_like_the_config(tmp_path):
    """--stage (and --seq, --precision) rewrite the loaded config: the config's cross-key checks run again on the
    result, naming the file and the flag, instead of a traceback or a row for a configuration the loader refuses.
    Sweep-only flags with --config are refused: they would do nothing."""
    cases = [
        ({"train_batch_size": 64, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
         ["--stage", "0"], "with --stage 0, --seq 1024: zero_optimization.offload_optimizer: cpu needs "
                           "zero_optimization.stage 1, 2 or 3"),
        ({"train_batch_size": 64, "zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2}},
         ["--stage", "1"], "with --stage 1, --seq 1024: zero_optimization.zero_hpz_partition_size: ZeRO++ needs "
                           "zero_optimization.stage 3"),
        ({"train_batch_size": 64, "zero_optimization": {"stage": 2}}, ["--compression"],
         "--compression only widen the sweep"),
        ({"train_batch_size": 64, "zero_optimization": {"stage": 2}}, ["--no-zeropp"],
         "--zeropp/--no-zeropp only widen the sweep"),
    ]
    for doc, extra, message in cases:
        out = _estimate(tmp_path, doc, *extra)
        assert out.returncode == 2, (extra, out.stdout, out.stderr)
        assert message in out.stderr and "Traceback" not in out.stderr, out.stderr
    # the job's shape: hpZ's partition must divide the ranks per host (dgx-h100: 8), named as the user wrote it
    out = _estimate(tmp_path, {"train_batch_size": 64, "zero_optimization": {"stage": 3, "zero_hpz_partition_size": 3}})
    assert out.returncode == 2 and "zero_optimization.zero_hpz_partition_size=3 must divide the ranks per host (8)" \
        in out.stderr, out.stderr
    yaml_cfg = tmp_path / "z.yaml"
    yaml_cfg.write_text("zero: {stage: 3, hpz_partition_size: 3}\nbatch: {micro: 1}\n")
    out = run("--model", "llama-2-13b", "--hardware", "dgx-h100", "--seq", "1024", "--config", str(yaml_cfg))
    assert out.returncode == 2 and "zero.hpz_partition_size=3 must divide" in out.stderr, out.stderr
    yaml_cfg.write_text("zero: {stage: 2, offload_optimizer: cpu}\nbatch: {micro: 1}\n")  # ztune's own names stay
    out = run("--model", "llama-2-13b", "--hardware", "dgx-h100", "--seq", "1024", "--config", str(yaml_cfg),
              "--stage", "0")
    assert out.returncode == 2 and "zero.offload_optimizer: cpu needs zero.stage 1, 2 or 3" in out.stderr, out.stderr
    ok = _estimate(tmp_path, {"train_batch_size": 64, "zero_optimization": {"stage": 2}}, "--stage", "3", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["rows"][0]["stage"] == 3


def test_a_deepspeed_config_is_estimated_at_the_models_sequence_length(tmp_path):
    """DeepSpeed JSON has no sequence length: without --seq the estimate uses the model's (as without --config),
    not ztune's 2048 default (which exceeds tiny-gpt's 256 and gpt2's 1024)."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 16}))
    out = run("--model", "tiny-gpt", "--hardware", "cpu-local", "--config", str(path))
    assert out.returncode == 0, out.stderr
    assert "seq 256)" in out.stdout.splitlines()[0]


def test_batch_flags_fill_the_batch_keys_a_trainer_config_leaves_auto_or_out(tmp_path):
    """A Trainer-style config ("auto" batch keys) or one without batch keys, with --micro-batch / --global-batch:
    the flags give the batch, as the Trainer's arguments would (they were refused: 'set a value')."""
    autos = dict.fromkeys(("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"), "auto")
    for doc in ({**autos, "zero_optimization": {"stage": 2}}, {"zero_optimization": {"stage": 2}}):
        out = _estimate(tmp_path, doc, "--micro-batch", "2", "--global-batch", "64", "--json")
        assert out.returncode == 0, out.stderr
        row = json.loads(out.stdout)["rows"][0]
        assert (row["micro_batch"], row["grad_accum"]) == (2, 4)  # 64 = 2 x 4 x 8 GPUs
        out = _estimate(tmp_path, doc)  # no flags: DeepSpeed's rule, and the flags named as the way out
        assert out.returncode == 2 and "--micro-batch or --global-batch" in out.stderr, out.stderr


def test_every_auto_that_cannot_be_derived_is_named_in_one_line(tmp_path):
    """A Trainer-written config took one run per "auto" key to fix (lr, then betas, ...): all are named at once,
    and a key the Trainer never fills is not said to be filled by it."""
    doc = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": "auto",
           "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto"}},
           "zero_optimization": {"stage": "auto"}}
    out = _estimate(tmp_path, doc)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert 'gradient_clipping: "auto" is filled in by the Hugging Face Trainer' in out.stderr
    assert "(also \"auto\" and not derivable here: optimizer.params.lr, optimizer.params.betas, " \
           "zero_optimization.stage)" in out.stderr
    out = _estimate(tmp_path, {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": "auto"}})
    assert 'zero_optimization.stage: "auto" is not a value of this key' in out.stderr and "Trainer does not fill" \
        in out.stderr, out.stderr
