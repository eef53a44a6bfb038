"""Communication: the collective wrapper every byte goes through, and how it moves.

- collectives.py: `Comm`, the one wrapper that counts calls and bytes per op (ring accounting).
- shm.py: the shared-memory transport for CPU ranks on one host.
- compress.py: gradient codecs (bf16, int8, 1-bit, top-k) and error feedback.
- topology.py: which ranks share a host (`NodeLayout`), for collectives in two levels.
- hierarchical.py: `TwoLevel`, all-reduce / reduce-scatter / all-gather inside each host, then across hosts.
- groups.py: holding process groups so that `dist.destroy_process_group()` still ends them.
"""

from ztune.runtime.comm.collectives import Comm

__all__ = ["Comm"]
