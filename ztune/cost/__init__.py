"""The cost model: pure functions of counts, bytes and hardware numbers (no torch, no I/O, no printing).

- memory.py: model states per ZeRO stage / precision / optimizer / offload, buffers, reserve, host memory
- activations.py: activation bytes per architecture and checkpointing mode
- comm.py: collectives per stage, bytes per rank, alpha-beta time
- compute.py: FLOPs, recomputation, offload and CPU optimizer time, step time, the `Efficiency` knobs
- estimate.py: the orchestrator (`estimate`, `sweep`, `max_micro_batch`, `recommend`)

Submodules are imported explicitly (`from ztune.cost.estimate import estimate`) so that importing one leaf
does not pull in the others.
"""
