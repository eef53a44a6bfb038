"""torch's CPU allocator switch that ztune gives its ranks (ztune.envvars.CPU_ALLOCATOR_DEFAULTS): a fresh
64 MiB tensor is backed by transparent huge pages with it, and (where the kernel uses them only on request)
not without it. Checked through /proc/self/smaps_rollup, not by timing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from ztune.envvars import CPU_ALLOCATOR_DEFAULTS

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
CHILD = """
import re, torch
t = torch.ones(64 << 18)  # 64 MiB of fp32, written once
text = open("/proc/self/smaps_rollup").read()
print(int(re.search(r"AnonHugePages:\\s+(\\d+) kB", text).group(1)))
"""


def _huge_kib(value: str) -> int:
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": value, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120,
                         check=True)
    return int(out.stdout.strip())


def test_the_default_is_torchs_switch_on() -> None:
    assert CPU_ALLOCATOR_DEFAULTS == {"THP_MEM_ALLOC_ENABLE": "1"}


def test_torch_backs_a_fresh_large_tensor_with_huge_pages_when_switched_on() -> None:
    mode = re.search(r"\[(\w+)\]", THP_MODE.read_text()).group(1) if THP_MODE.exists() else "never"
    on, off = _huge_kib("1"), _huge_kib("0")
    if mode == "never":  # the kernel gives no process huge pages: the switch can do nothing
        assert on == off == 0
    elif mode == "madvise":  # only on request: the switch is the difference
        assert on >= 32 << 10 and off == 0, (on, off)
    else:  # "always": every large anonymous mapping, switch or not
        assert on >= 32 << 10, on
