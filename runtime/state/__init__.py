"""Checkpoints: saved training state (not activation checkpointing, which is runtime/checkpointing.py).

engine.save_checkpoint / load_checkpoint / save_16bit_model call `save_checkpoint`, `load_checkpoint` and
`save_16bit_model` here; `ztune checkpoint` uses the offline reader (runtime/state/offline.py) without a
process group. Format and guarantees: docs/checkpoints.md.
"""

from ztune.runtime.state.files import CheckpointError
from ztune.runtime.state.load import load_checkpoint
from ztune.runtime.state.save import save_16bit_model, save_checkpoint

__all__ = ["CheckpointError", "load_checkpoint", "save_16bit_model", "save_checkpoint"]
