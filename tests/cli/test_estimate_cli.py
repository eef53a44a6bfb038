"""`ztune estimate`: the table, the --json schema, --config/--check exit codes, --plot, bad input, and no
torch import on the estimate path."""

import json
import subprocess
import sys

from typer.testing import CliRunner

from tests.helpers.load import scaled_limit_s
from ztune.cli import app

ROW_KEYS = {"stage", "offload_optimizer", "offload_params", "checkpointing", "compression", "zeropp", "micro_batch",
            "grad_accum", "memory_per_gpu", "cpu_memory_per_host", "comm_bytes_per_step", "step_time_s", "tokens_per_s",
            "mfu", "fits", "init_peak", "trainable_params", "step", "codec_unknown"}
MEMORY_KEYS = {"params", "grads", "optimizer", "activations", "buffers", "total"}
LLAMA_ARGS = ["--model", "llama-2-70b", "--hardware", "dgx-h100", "--nodes", "4", "--seq", "4096",
              "--global-batch", "1024"]


def run(*args):
    return subprocess.run([sys.executable, "-m", "ztune", "estimate", *args], capture_output=True, text=True,
                          timeout=scaled_limit_s(60))


def test_table_and_recommendation():
    result = CliRunner().invoke(app, ["estimate", *LLAMA_ARGS])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "llama-2-70b on 4 x dgx-h100 (32 GPUs" in out
    assert "recommended: #1 stage 3" in out and "runner-up" in out
    assert "assumptions:" in out and "1.5 GiB" in out
    assert "…" not in out  # never squeezed into ellipses


def test_json_schema():
    result = CliRunner().invoke(app, ["estimate", *LLAMA_ARGS, "--json", "--no-zeropp"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert set(doc) == {"model", "hardware", "rows", "recommendation", "ignored_deepspeed_keys"}
    assert doc["model"] == {"name": "llama-2-70b", "params": 68_976_648_192, "trainable_params": 68_976_648_192}
    assert doc["hardware"] == "dgx-h100"
    assert len(doc["rows"]) == 27
    for row in doc["rows"]:
        assert set(row) == ROW_KEYS
        assert set(row["memory_per_gpu"]) == MEMORY_KEYS
        mem = row["memory_per_gpu"]
        assert mem["total"] == sum(mem[k] for k in MEMORY_KEYS - {"total"})
        assert row["step"]["codec_s"] == 0 and row["codec_unknown"] == []  # no compression swept here
    best = doc["rows"][doc["recommendation"]["index"]]
    assert best["fits"] and best["tokens_per_s"] == max(r["tokens_per_s"] for r in doc["rows"] if r["fits"])


def _rows(*args: str) -> list[dict]:
    result = CliRunner().invoke(app, ["estimate", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)["rows"]


def test_several_nodes_sweep_zeropp_by_default():
    """Issue 15: estimate includes ZeRO++ where the network makes it pay: across nodes by default, not on one
    node; --no-zeropp takes it out. Gradient compression stays opt-in (--compression)."""
    rows = _rows(*LLAMA_ARGS)
    assert any(r["zeropp"]["quantized_weights"] for r in rows) and {r["compression"] for r in rows} == {"none"}
    assert not any(r["zeropp"]["quantized_weights"] for r in _rows(*LLAMA_ARGS, "--no-zeropp"))
    one_node = _rows("--model", "llama-2-7b", "--hardware", "dgx-h100", "--seq", "4096", "--global-batch", "64")
    assert not any(r["zeropp"]["quantized_weights"] for r in one_node)


def test_recommendation_says_why_zeropp_pays_or_not():
    import dataclasses

    from ztune.cost.codec import RATE_FIELDS
    from ztune.cost.estimate import recommend, sweep
    from ztune.profiles import load_hardware, load_model

    # The shipped GPU profiles have no codec rates: ZeRO++'s quantisation cannot be priced, so it is not
    # recommended, and the reason says how much codec time per step it could afford.
    roce = load_hardware("a100-40g-roce")
    slow = sweep(load_model("llama-2-7b"), roce, num_nodes=4, seq_len=4096, global_batch=64, zeropp=(False, True))
    best, reason = recommend(slow)
    assert best is not None and "ZeRO++" not in best.label, best.label
    assert "not considered: a100-40g-roce has no measured codec rate" in reason
    assert "ZeRO++" in reason and "pays only if its codec costs under" in reason
    # With codec rates (here 1e12 elements/s per rank, a codec nearly free) the slow network makes it pay.
    fast_codec = dataclasses.replace(roce, **dict.fromkeys(RATE_FIELDS, 1e12))
    best, reason = recommend(sweep(load_model("llama-2-7b"), fast_codec, num_nodes=4, seq_len=4096,
                                   global_batch=64, zeropp=(False, True)))
    assert "ZeRO++" in best.label, best.label
    assert "the network makes it pay" in reason and "MiB per GPU per step" in reason and "of codec" in reason
    # GPT-2 (124M) trains fastest at stage 0; ZeRO++ (stage 3 only) has nothing to win there, and the reason says so
    h100 = dataclasses.replace(load_hardware("dgx-h100"), **dict.fromkeys(RATE_FIELDS, 1e12))
    small = sweep(load_model("gpt2"), h100, num_nodes=2, seq_len=1024, global_batch=64, zeropp=(False, True))
    best, reason = recommend(small)
    assert "ZeRO++" not in best.label and "do not pay here" in reason and "its codec costs" in reason, reason


def test_params_stage_and_compression_flags():
    result = CliRunner().invoke(app, ["estimate", "--params", "7B", "--hardware", "dgx-h100", "--stage", "2",
                                      "--compression", "--global-batch", "64"])
    assert result.exit_code == 0, result.output
    assert "model shape:" in result.output and "compress" in result.output and "int8" in result.output
    doc = json.loads(CliRunner().invoke(app, ["estimate", "--params", "7B", "--hardware", "dgx-h100",
                                              "--stage", "2", "--compression", "--json"]).output)
    assert {r["stage"] for r in doc["rows"]} == {2}
    assert {r["compression"] for r in doc["rows"]} == {"none", "int8", "onebit", "topk"}  # bf16 grads: no bf16


def test_config_and_check_exit_codes(tmp_path):
    small = tmp_path / "small.yaml"
    small.write_text("zero: {stage: 2}\nbatch: {micro: 2, global: 64}\nseq_len: 1024\n")
    ok = run("--model", "llama-2-7b", "--hardware", "dgx-h100", "--config", str(small), "--check", "--json")
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(ok.stdout)["rows"]) == 1
    too_big = run("--model", "llama-2-70b", "--hardware", "dgx-h100", "--config", str(small), "--check")
    assert too_big.returncode == 1 and "does not fit" in too_big.stderr
    deepspeed = tmp_path / "ds.json"
    deepspeed.write_text(json.dumps({"train_batch_size": 64, "train_micro_batch_size_per_gpu": 1,
                                     "zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}))
    ds = run("--model", "llama-2-70b", "--hardware", "dgx-h100", "--nodes", "4", "--config", str(deepspeed),
             "--seq", "1024", "--check", "--json")
    assert ds.returncode == 0, ds.stderr
    assert json.loads(ds.stdout)["rows"][0]["stage"] == 3


def test_bad_input_is_one_line_exit_2(tmp_path):
    bad_cases = [
        ["--model", "no-such-model", "--hardware", "dgx-h100"],
        ["--hardware", "dgx-h100"],  # neither --model nor --params
        ["--model", "gpt2", "--hardware", "dgx-h100", "--check"],  # --check without --config
        ["--model", "gpt2", "--hardware", "dgx-h100", "--global-batch", "3"],  # not a multiple of 8 GPUs
        ["--model", "gpt2", "--hardware", "dgx-h100", "--stage", "4"],
        ["--model", "gpt2", "--hardware", "dgx-h100", "--nodes", "0"],
        ["--model", "gpt2", "--hardware", "dgx-h100", "--precision", "fp8"],
        ["--model", "gpt2", "--hardware", "dgx-h100", "--config", str(tmp_path / "missing.yaml")],
        ["--model", "gpt2", "--hardware", "dgx-h100", "--plot", str(tmp_path / "no" / "dir.png")],
        ["--model", "gpt2", "--hardware", "dgx-h100", "--plot", str(tmp_path / "mem.txt")],  # matplotlib: no txt
        ["--model", "gpt2", "--hardware", "dgx-h100", "--plot", str(tmp_path)],  # a directory
        ["--model", "gpt2"],  # --hardware missing
        *(["--model", "gpt2", "--hardware", "dgx-h100", "--trainable", v] for v in ("0", "0%", "150%", "1.5", "-2%",
                                                                                  "nan", "abc", "%")),
        ["--model", "gpt2", "--hardware", "dgx-h100", "--lora-rank", "0"],
        ["--model", "gpt2", "--hardware", "dgx-h100", "--lora-rank", "8", "--trainable", "2%"],
        ["--model", "gpt2", "--hardware", "dgx-h100", "--init", "lazy"],
    ]
    for args in bad_cases:
        out = run(*args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert "Traceback" not in out.stdout + out.stderr, args
        assert out.stderr.strip().startswith("error:"), (args, out.stderr)


def test_plot_writes_a_png(tmp_path):
    png = tmp_path / "mem.png"
    result = CliRunner().invoke(app, ["estimate", "--model", "tiny-gpt", "--hardware", "cpu-local",
                                      "--global-batch", "32", "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_estimate_path_does_not_import_torch_or_matplotlib():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from ztune.cli import app\n"
        f"r = CliRunner().invoke(app, ['estimate', *{LLAMA_ARGS!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "print(sorted(m for m in ('torch', 'matplotlib') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=scaled_limit_s(60))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_running_estimate_imports_no_other_command():
    code = (
        "import sys\n"
        "from ztune.cli import main\n"
        "try:\n"
        f"    main(['estimate', *{LLAMA_ARGS!r}, '--json'])\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "others = ('ztune.cli.autotune', 'ztune.cli.launch', 'ztune.cli.probe', 'torch', 'ztune.config.deepspeed')\n"
        "print(sorted(m for m in others if m in sys.modules), file=sys.stderr)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=scaled_limit_s(60))
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().splitlines()[-1] == "[]"


def test_framework_flags_reach_the_cost_model():
    args = ["estimate", "--model", "llama-3-8b", "--hardware", "h100-96g-500w", "--seq", "8192", "--stage", "3",
            "--micro-batch", "2", "--global-batch", "16", "--json"]

    def selective_row(*extra):
        result = CliRunner().invoke(app, [*args, *extra])
        assert result.exit_code == 0, result.output
        rows = json.loads(result.output)["rows"]
        return next(r for r in rows if r["checkpointing"] == "selective" and r["offload_params"] == "none")

    attention = selective_row()
    op = selective_row("--selective-policy", "op")
    fused = selective_row("--selective-policy", "op", "--loss", "fused")
    assert op["memory_per_gpu"]["activations"] < attention["memory_per_gpu"]["activations"]
    assert fused["memory_per_gpu"]["activations"] < op["memory_per_gpu"]["activations"]
    fp32 = selective_row("--selective-policy", "op", "--reduce-fp32")
    assert fp32["comm_bytes_per_step"] > op["comm_bytes_per_step"]


def test_bad_framework_flags_are_one_line_errors():
    for extra in (["--selective-policy", "layer"], ["--loss", "liger"], ["--loss", "chunked"],
                  ["--loss-chunk", "512"]):
        out = subprocess.run([sys.executable, "-m", "ztune", "estimate", "--model", "gpt2", "--hardware",
                              "cpu-local", *extra], capture_output=True, text=True, timeout=scaled_limit_s(60))
        assert out.returncode == 2, (extra, out.stderr)
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_trainable_lora_and_init_flags():
    def doc(*extra):
        result = CliRunner().invoke(app, ["estimate", "--model", "llama-2-7b", "--hardware", "dgx-h100",
                                          "--stage", "3", "--micro-batch", "1", "--json", *extra])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    full, pct, frac = doc(), doc("--trainable", "2%"), doc("--trainable", "0.02")
    assert pct == frac
    assert full["model"]["trainable_params"] == full["model"]["params"]
    assert pct["model"]["trainable_params"] == round(0.02 * full["model"]["params"])
    def by_config(d):  # rows are sorted by speed, which the fine-tune changes
        return {(r["offload_optimizer"], r["offload_params"], r["checkpointing"]): r for r in d["rows"]}

    fulls, pcts = by_config(full), by_config(pct)
    assert set(fulls) == set(pcts)
    def states(r):  # GPU model states + the host's share (offload moves them there)
        m = r["memory_per_gpu"]
        return m["params"] + m["grads"] + m["optimizer"] + r["cpu_memory_per_host"]

    assert all(states(pcts[k]) < states(fulls[k]) for k in fulls)
    assert all(pcts[k]["comm_bytes_per_step"] < fulls[k]["comm_bytes_per_step"] for k in fulls)
    lora = doc("--lora-rank", "8")
    # PEFT's default targets for Llama: q_proj (4096 -> 4096) and v_proj (4096 -> 4096), 32 layers.
    assert lora["model"]["trainable_params"] == 32 * (8 * (4096 + 4096) * 2)
    assert lora["model"]["params"] == full["model"]["params"] + lora["model"]["trainable_params"]
    eager = doc("--init", "eager")
    assert all(r["init_peak"] is not None and r["init_peak"] > r["memory_per_gpu"]["total"] for r in eager["rows"])
    table = CliRunner().invoke(app, ["estimate", "--model", "llama-2-7b", "--hardware", "dgx-h100", "--stage", "3",
                                     "--micro-batch", "1", "--init", "eager"]).output
    assert " init " in table and "initialisation peaks higher" in table
    plain = CliRunner().invoke(app, ["estimate", "--model", "llama-2-7b", "--hardware", "dgx-h100", "--stage", "3",
                                     "--micro-batch", "1"]).output
    assert " init " not in plain and "initialisation" not in plain
