"""Building a model's sharded state without materialising the whole model on any rank.

- materialize.py: `zero_init` (construct on the meta device) and `MetaInit` (materialise one unit at a time,
  initialised by the module's own init with a generator seeded per module name);
- shards.py: the stage-3 flat groups built shard-local (trainable and frozen), without a full fp32 master;
- gathered.py: `Engine.gathered(...)`, full parameters outside forward, and the error when they are missing;
- pretrained.py: shard-wise loading of safetensors checkpoints (Hugging Face model directories).
"""
