"""The loss head's memory (cost/activations.py loss_head_bytes) against measurement on CPU.

Cross-entropy over bf16 logits written the common way, F.cross_entropy(logits.float(), targets):
- what autograd saves for backward, read with torch.autograd.graph.saved_tensors_hooks (each storage once);
- the peak on top of the logits, read as the growth of the process's peak resident memory (VmHWM, reset
  first) while one forward + backward runs, in a fresh process whose large allocations all go to mmap
  (freed at once), so its resident memory follows the live tensors.
"""

import json
import subprocess
import sys

import pytest

from ztune.config.schema import Checkpointing
from ztune.cost.activations import (
    INDEX_BYTES,
    LOSS_PEAK_BYTES_PER_CLASS,
    LOSS_SAVED_BYTES_PER_CLASS,
    activation_memory,
    loss_head_bytes,
)
from ztune.profiles import load_model

TOKENS, VOCAB = 2048, 8192  # peak ~200 MB: well above allocator noise, small for a shared CI box

_MEASURE = r"""
import json, sys
import psutil, torch
import torch.nn.functional as F

tokens, vocab = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
# Warm up every kernel on a small problem so that lazy initialisation does not count.
small = torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)
F.cross_entropy(small.float(), torch.randint(0, 16, (8,))).backward()

logits = torch.randn(tokens, vocab, dtype=torch.bfloat16, requires_grad=True)
targets = torch.randint(0, vocab, (tokens,))
saved = {}
def pack(t):
    saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return t

def peak_rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

# Reset the kernel's peak-RSS mark (Linux >= 4.0): a child starts with its parent's peak after fork.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
rss_before = psutil.Process().memory_info().rss
peak_before = peak_rss()
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    loss = F.cross_entropy(logits.float(), targets)
loss.backward()
peak_after = peak_rss()
print(json.dumps({"saved": sum(saved.values()), "rss_before": rss_before, "peak_before": peak_before,
                  "peak_after": peak_after, "grad": logits.grad.untyped_storage().nbytes()}))
"""


@pytest.fixture(scope="module")
def measured():
    env = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(TOKENS), str(VOCAB)], capture_output=True,
                         text=True, timeout=300, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_saved_bytes_are_fp32_log_probs(measured):
    saved, _ = loss_head_bytes(tokens=TOKENS, vocab_size=VOCAB)
    assert saved == TOKENS * VOCAB * LOSS_SAVED_BYTES_PER_CLASS
    # log_softmax's fp32 output plus nll_loss's int64 targets (and a scalar or two).
    assert measured["saved"] == pytest.approx(saved + TOKENS * INDEX_BYTES, rel=1e-3)


def test_peak_is_three_fp32_vocabulary_tensors(measured):
    saved, transient = loss_head_bytes(tokens=TOKENS, vocab_size=VOCAB)
    predicted_peak = saved + transient
    assert predicted_peak == TOKENS * VOCAB * LOSS_PEAK_BYTES_PER_CLASS
    # The measurement is only valid if nothing earlier pushed the process's peak above where it now starts.
    assert measured["peak_before"] <= measured["rss_before"] + 0.05 * predicted_peak
    growth = measured["peak_after"] - measured["rss_before"]
    assert growth == pytest.approx(predicted_peak, rel=0.10), (growth, predicted_peak)


def test_loss_head_enters_the_activation_peak():
    spec = load_model("llama-3-8b")
    kw = dict(micro_batch=2, seq_len=8192, checkpointing=Checkpointing.FULL)
    plain = activation_memory(spec, **kw)
    tokens = 2 * 8192
    assert plain.loss_peak_bytes == tokens * spec.vocab_size * (LOSS_PEAK_BYTES_PER_CLASS - LOSS_SAVED_BYTES_PER_CLASS)
    # 16k tokens x 128k classes: the loss alone peaks at 12 bytes/class = 23.5 GiB.
    assert (plain.loss_peak_bytes + tokens * spec.vocab_size * 4) / 2**30 == pytest.approx(23.49, abs=0.01)
    chunked = activation_memory(spec, loss_chunk_tokens=1024, **kw)
    fused = activation_memory(spec, loss_mode="fused", **kw)
    assert chunked.device_bytes < fused.device_bytes < plain.device_bytes
    assert chunked.loss_peak_bytes == 1024 * spec.vocab_size * 8
