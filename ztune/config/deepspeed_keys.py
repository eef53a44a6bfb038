"""What ztune does with each DeepSpeed config key: the one table that `from_deepspeed` reads and that
`docs/deepspeed-migration.md` is generated from (runtime/compat/migration_doc.py).

Keys are dotted paths as written in a DeepSpeed JSON config (deepspeed.ai/docs/config-json, and the
pydantic models of DeepSpeed 0.19.8: runtime/zero/config.py, zero/offload_config.py, precision_config.py,
activation_checkpointing/config.py). Status:
- supported: read with DeepSpeed's meaning (the note says how it maps onto ztune);
- ignored: accepted and listed at start-up ("ignored DeepSpeed keys: ..."), because it cannot change the
  trained parameters (a performance, memory-placement, logging or file-format knob);
- neutral: accepted when it has its no-effect value `neutral` (then listed as ignored); any other value would
  change training in a way ztune does not implement, so it is rejected with the note;
- rejected: any value is an error (the feature changes training and ztune does not implement it, or DeepSpeed
  0.19.8 removed it and refuses the key itself); a block with "enabled": false is listed as ignored.

Each leaf key that ztune does not read itself (ignored and neutral keys, and the fp16 / bf16 keys, which a
disabled block leaves unread) has `kind`: the type DeepSpeed gives its value (its pydantic field, or the type
its config documentation names where DeepSpeed reads the key without a model). A value of another type is
refused naming the key, as DeepSpeed refuses it, even where ztune would not read the value. The same holds
inside an ignored block (flops_profiler, comms_logger, comet, timers, checkpoint, aio,
zero_optimization.leaf_module): its keys are in the table too, so an unknown one is an error and each value is
type-checked, though the block as a whole is what is listed as ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED, IGNORED, NEUTRAL, REJECTED = "supported", "ignored", "neutral", "rejected"

# Value kinds, named as the error message names them ("expected ..."). DeepSpeed's pydantic fields are strict
# about these in the ways that matter here: "garbage" is no boolean, 1.5 no integer.
BOOL = "boolean"
INT = "integer"
COUNT = "integer >= 0"  # pydantic Field(ge=0)
NUMBER = "number"
FRACTION = "number in [0, 1]"  # pydantic Field(ge=0.0, le=1.0)
STRING = "string"
MAPPING = "mapping"
LIST = "list"  # pydantic `list`: any items
STRINGS = "list of strings"  # leaf_module_config.py: List[str]; it takes a lone string as a list of one
DTYPE = "dtype name"  # runtime/config.py get_communication_data_type: fp16, bf16 or fp32, any case
# The same, where DeepSpeed's field is Optional (null = DeepSpeed's default).
BOOL_OR_NULL, INT_OR_NULL, STRING_OR_NULL, DTYPE_OR_NULL, MAPPING_OR_NULL = (
    k + " or null" for k in (BOOL, INT, STRING, DTYPE, MAPPING))
KINDS = frozenset({BOOL, INT, COUNT, NUMBER, FRACTION, STRING, MAPPING, LIST, STRINGS, DTYPE,
                   BOOL_OR_NULL, INT_OR_NULL, STRING_OR_NULL, DTYPE_OR_NULL, MAPPING_OR_NULL})


@dataclass(frozen=True)
class KeyRule:
    status: str
    note: str
    neutral: Any = None  # the no-effect value, for status "neutral"
    kind: str | None = None  # DeepSpeed's type for the value (one of KINDS); None: a block read by its parser
    choices: tuple[str, ...] = ()  # for a string kind: the values DeepSpeed takes (it upper-cases the value first)
    # a rejected key DeepSpeed 0.19.8 refuses at any value (_gone): also as a disabled block ({"enabled": false}),
    # which other rejected blocks may be (listed as ignored: DeepSpeed builds nothing from them)
    removed: bool = False


def _s(note: str, kind: str | None = None) -> KeyRule:
    return KeyRule(SUPPORTED, note, kind=kind)


def _i(kind: str, note: str, choices: tuple[str, ...] = ()) -> KeyRule:
    return KeyRule(IGNORED, note, kind=kind, choices=choices)


def _n(kind: str, neutral: Any, note: str) -> KeyRule:
    return KeyRule(NEUTRAL, note, neutral, kind)


def _r(note: str) -> KeyRule:
    return KeyRule(REJECTED, note)


def _gone(feature: str, fix: str = "") -> KeyRule:
    """A key of a feature DeepSpeed 0.19.8 removed: it refuses the key whatever its value (_REMOVED)."""
    return KeyRule(REJECTED, feature + _REMOVED + fix, removed=True)


_PERF = "performance knob: ztune schedules its own communication and buffers"
_LOG = "logging/profiling only"
_MON = ("events Train/Samples/lr and (fp16) Train/Samples/loss_scale at x = global_samples, as DeepSpeed's "
        "engine writes them")
_CKPT = "checkpoint-file option (checkpoints are a separate issue); no effect on training"
_ACT = ("configures deepspeed.checkpointing.checkpoint(), which a model calls itself; recomputation never changes "
        "the math. ztune's own checkpointing: the \"ztune\": {\"activations\": ...} block")
_OFFLOAD_IO = "offload buffer/IO tuning: ztune offloads to host memory with its own buffers"
_LEAF = "; ztune gathers per unit (initialize(units=))"
# Keys DeepSpeed 0.19.8 refuses whatever their value or stage (runtime/config.py _reject_removed_config_keys: "MiCS
# ZeRO-3 sharding has been removed; ... no longer supported"), so a config holding one runs under neither.
_REMOVED = " was removed in DeepSpeed 0.19.8, which refuses the key at any value"
# The dynamic scaler's settings do nothing under a static scale (DeepSpeed builds no DynamicLossScaler then).
_DYN = ("; with a static loss_scale (> 0) it has no effect: range-checked as for dynamic scaling, then listed as "
        "ignored")

KEYS: dict[str, KeyRule] = {
    # -- batch ------------------------------------------------------------------------------------------------
    "train_batch_size": _s("global batch; missing sizes are derived with DeepSpeed's rules; \"auto\" = derive"),
    "train_micro_batch_size_per_gpu": _s("micro-batch per rank; also the returned dataloader's batch size; "
                                         "\"auto\" = derive"),
    "gradient_accumulation_steps": _s("micro-steps per optimizer step; \"auto\" = derive"),
    "managed_gradient_accumulation": _n(BOOL, True, "DeepSpeed 0.19.8's unmanaged mode (false: every step() is a "
                                                    "boundary and global_samples counts backward calls) is not "
                                                    "implemented; set_gradient_accumulation_boundary covers "
                                                    "caller-controlled boundaries"),
    "gradient_clipping": _s("global-norm clipping (0 disables); absent = 1.0, DeepSpeed 0.19.8's default"),
    # -- precision ----------------------------------------------------------------------------------------------
    "fp16": _s("block"),
    "fp16.enabled": _s("precision fp16; \"auto\" = on when the model's parameters are fp16"),
    "fp16.auto_cast": _i(BOOL, "ztune always casts floating-point inputs to the compute dtype"),
    "fp16.fp16_master_weights_and_grads": _n(BOOL, False, "ztune keeps fp32 master weights; fp16 masters are not "
                                                          "implemented"),
    # DeepSpeed's dynamic loss scaler (runtime/fp16/loss_scaler.py), implemented in runtime/precision.py.
    "fp16.loss_scale": _s("0 = dynamic scaling; > 0 = this static scale (overflowing steps are still skipped)",
                          NUMBER),
    "fp16.initial_scale_power": _s("the dynamic scale starts at 2**initial_scale_power (default 16)" + _DYN, INT),
    "fp16.loss_scale_window": _s("clean steps before the dynamic scale doubles (default 1000)" + _DYN, INT),
    "fp16.hysteresis": _s("overflows tolerated before the scale halves (default 2)" + _DYN, INT),
    "fp16.consecutive_hysteresis": _s("refill the hysteresis after every clean step (default false)" + _DYN,
                                      BOOL),
    "fp16.min_loss_scale": _s("the dynamic scale's floor; an overflow there with no hysteresis left stops "
                              "training with an error, as in DeepSpeed (default 1)" + _DYN, NUMBER),
    "fp16.immediate_grad_update": _i(BOOL, _PERF),
    "bf16": _s("block (\"bfloat16\" is DeepSpeed's older spelling, also read)"),
    "bf16.enabled": _s("precision bf16; \"auto\" = on when the model's parameters are bf16"),
    "bf16.immediate_grad_update": _i(BOOL, _PERF),
    "bf16.check_grad_overflow": _s("check_grad_overflow: skip an optimizer step whose gradient norm is not finite "
                                   "(default true, as in DeepSpeed; false skips only when gradient_clipping > 0, "
                                   "which computes the norm anyway)", BOOL),
    "bf16.bf16_master_weights_and_grads": _n(BOOL, False, "ztune keeps fp32 master weights; bf16 masters are not "
                                                          "implemented"),
    "bf16.bf16_optimizer_states": _n(BOOL, False, "ztune keeps fp32 optimizer states"),
    "bf16.loss_scale": _n(NUMBER, 0, "bf16 is never loss-scaled (0 = no static scale; older DeepSpeed accepted "
                                     "it, 0.19.8 rejects it)"),
    # -- ZeRO ---------------------------------------------------------------------------------------------------
    "zero_optimization": _s("block"),
    "zero_optimization.stage": _s("ZeRO stage 0-3"),
    "zero_optimization.offload_optimizer": _s("block; used at stages 1-3 (at stage 0 DeepSpeed ignores it, so "
                                              "does ztune)"),
    "zero_optimization.offload_optimizer.device": _s("cpu or none (nvme is rejected)"),
    "zero_optimization.offload_param": _s("block; used at stage 3 (at stages 0-2 DeepSpeed ignores it, so does "
                                          "ztune)"),
    "zero_optimization.offload_param.device": _s("cpu or none (nvme is rejected)"),
    "zero_optimization.cpu_offload": _s("legacy: true = offload_optimizer {device: cpu}"),
    "zero_optimization.cpu_offload_param": _s("legacy: true = offload_param {device: cpu}"),
    "zero_optimization.cpu_offload_use_pin_memory": _i(BOOL_OR_NULL, _OFFLOAD_IO),
    "zero_optimization.reduce_bucket_size": _s("elements per gradient-reduction bucket; \"auto\" = hidden_size^2 "
                                               "(as the Hugging Face integration fills it)"),
    "zero_optimization.allgather_bucket_size": _s("elements per parameter all-gather bucket"),
    "zero_optimization.overlap_comm": _i(BOOL_OR_NULL, _PERF),
    "zero_optimization.contiguous_gradients": _i(BOOL, _PERF),
    "zero_optimization.reduce_scatter": _i(BOOL, _PERF),
    "zero_optimization.allgather_partitions": _i(BOOL, _PERF),
    "zero_optimization.round_robin_gradients": _i(BOOL, _PERF),
    "zero_optimization.sub_group_size": _i(COUNT, _PERF),
    "zero_optimization.stage3_prefetch_bucket_size": _i(COUNT, "ztune prefetches whole units (its "
                                                               "zero.prefetch_units)"),
    "zero_optimization.stage3_param_persistence_threshold": _i(COUNT, _PERF),
    "zero_optimization.stage3_model_persistence_threshold": _i(COUNT, _PERF),
    "zero_optimization.stage3_max_live_parameters": _i(COUNT, _PERF),
    "zero_optimization.stage3_max_reuse_distance": _i(COUNT, _PERF),
    "zero_optimization.stage3_allgather_sequential": _i(BOOL, _PERF),
    "zero_optimization.stage3_module_granularity_threshold": _i(INT, _PERF),
    "zero_optimization.stage3_use_all_reduce_for_fetch_params": _i(BOOL, _PERF),
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": _i(BOOL, _CKPT),
    "zero_optimization.stage3_gather_fp16_weights_on_model_save": _i(BOOL, _CKPT),
    # The same knobs under their pydantic field names, which DeepSpeed accepts too (runtime/zero/config.py: each
    # stage3_* key is the alias of one of these fields, and config_utils.DeepSpeedConfigModel sets
    # populate_by_name=True).
    "zero_optimization.prefetch_bucket_size": _i(COUNT, "ztune prefetches whole units (its zero.prefetch_units)"),
    "zero_optimization.param_persistence_threshold": _i(COUNT, _PERF),
    "zero_optimization.model_persistence_threshold": _i(COUNT, _PERF),
    "zero_optimization.max_live_parameters": _i(COUNT, _PERF),
    "zero_optimization.max_reuse_distance": _i(COUNT, _PERF),
    "zero_optimization.allgather_sequential": _i(BOOL, _PERF),
    "zero_optimization.module_granularity_threshold": _i(INT, _PERF),
    "zero_optimization.use_all_reduce_for_fetch_params": _i(BOOL, _PERF),
    "zero_optimization.gather_16bit_weights_on_model_save": _i(BOOL, _CKPT),
    "zero_optimization.elastic_checkpoint": _i(BOOL, _CKPT),
    "zero_optimization.load_from_fp32_weights": _i(BOOL, _CKPT),
    "zero_optimization.pipeline_loading_checkpoint": _i(BOOL, _CKPT),
    "zero_optimization.ignore_unused_parameters": _i(BOOL, "ztune accepts parameters without gradients (zeros)"),
    "zero_optimization.legacy_stage1": _i(BOOL, _PERF),
    "zero_optimization.parameter_alignment": _i(BOOL, _PERF),
    "zero_optimization.use_multi_rank_bucket_allreduce": _i(BOOL, _PERF),
    "zero_optimization.memory_efficient_linear": _i(BOOL, _PERF),
    "zero_optimization.override_module_apply": _i(BOOL, _PERF),
    "zero_optimization.enable_sanity_checks": _i(BOOL, _LOG),
    "zero_optimization.log_trace_cache_warnings": _i(BOOL, _LOG),
    "zero_optimization.leaf_module": _i(MAPPING_OR_NULL, "stage-3 hook granularity" + _LEAF),
    # runtime/zero/leaf_module_config.py (DeepSpeedZeroLeafModuleConfig)
    "zero_optimization.leaf_module.classes": _i(STRINGS, "module classes without stage-3 hooks" + _LEAF),
    "zero_optimization.leaf_module.names": _i(STRINGS, "module names without stage-3 hooks" + _LEAF),
    "zero_optimization.leaf_module.name_suffixes": _i(STRINGS, "module name suffixes without stage-3 hooks" + _LEAF),
    "zero_optimization.compute_grad_norm": _i(BOOL, "ztune computes the global norm itself when it needs it"),
    "zero_optimization.save_muon_momentum_buffer_in_memory": _i(BOOL, _PERF),
    "zero_optimization.zero_hpz_partition_size": _s("ZeRO++ hpZ at stage 3 (k > 1): a secondary parameter partition "
                                                    "over k ranks of one host serves the backward all-gather; k "
                                                    "must divide the ranks per host; 0/1 = off; ignored at stages "
                                                    "0-2, as in DeepSpeed"),
    "zero_optimization.mics_shard_size": _gone("MiCS sharding"),
    "zero_optimization.mics_hierarchical_params_gather": _gone("MiCS sharding"),
    "zero_optimization.zeropp_loco_param": _gone("LoCo-ZeRO++ (error feedback for qgZ)"),
    "zero_optimization.zero_quantized_weights": _s("ZeRO++ qwZ at stage 3: the forward all-gather sends int8 "
                                                   "weights in blocks of 2048 with one fp32 scale each; master "
                                                   "weights stay full precision; ignored at stages 0-2, as in "
                                                   "DeepSpeed"),
    "zero_optimization.zero_quantized_nontrainable_weights": _n(BOOL, False, "quantized frozen weights are not "
                                                                             "implemented"),
    "zero_optimization.zero_quantized_gradients": _s("ZeRO++ qgZ at stage 3: the gradient reduce-scatter as int4 "
                                                     "all-to-alls (blocks of 2048, fp32 scales) inside each host, "
                                                     "then across hosts; not with ztune's compression; ignored at "
                                                     "stages 0-2, as in DeepSpeed"),
    "zero_optimization.zenflow": _r("ZenFlow's delayed CPU updates are not implemented"),
    "zero_optimization.offload_optimizer.pin_memory": _i(BOOL, _OFFLOAD_IO),
    "zero_optimization.offload_optimizer.buffer_count": _i(COUNT, _OFFLOAD_IO),
    "zero_optimization.offload_optimizer.fast_init": _i(BOOL, _OFFLOAD_IO),
    "zero_optimization.offload_optimizer.nvme_path": _i(STRING_OR_NULL, _OFFLOAD_IO),
    "zero_optimization.offload_optimizer.pipeline_read": _i(BOOL, _OFFLOAD_IO),
    "zero_optimization.offload_optimizer.pipeline_write": _i(BOOL, _OFFLOAD_IO),
    "zero_optimization.offload_optimizer.ratio": _i(FRACTION, "fraction of states offloaded: placement only (ztune "
                                                              "offloads all of them)"),
    "zero_optimization.offload_optimizer.super_offload": _i(BOOL, _PERF),
    "zero_optimization.offload_optimizer.cpuadam_cores_perc": _i(FRACTION, _PERF),
    "zero_optimization.offload_param.pin_memory": _i(BOOL, _OFFLOAD_IO),
    "zero_optimization.offload_param.buffer_count": _i(COUNT, _OFFLOAD_IO),
    "zero_optimization.offload_param.buffer_size": _i(COUNT, _OFFLOAD_IO),
    "zero_optimization.offload_param.max_in_cpu": _i(COUNT, _OFFLOAD_IO),
    "zero_optimization.offload_param.nvme_path": _i(STRING_OR_NULL, _OFFLOAD_IO),
    # -- activation checkpointing ----------------------------------------------------------------------------
    "activation_checkpointing": _s("block; every key is listed as ignored (see each)"),
    "activation_checkpointing.partition_activations": _i(BOOL, _ACT + "; partitions over model-parallel ranks, which "
                                                                      "ztune does not have"),
    "activation_checkpointing.cpu_checkpointing": _i(BOOL, _ACT + "; for host activation memory use "
                                                                  "ztune.activations.offload"),
    "activation_checkpointing.contiguous_memory_optimization": _i(BOOL, _ACT),
    "activation_checkpointing.number_checkpoints": _i(INT_OR_NULL, _ACT),
    "activation_checkpointing.synchronize_checkpoint_boundary": _i(BOOL, _ACT),
    "activation_checkpointing.profile": _i(BOOL, _ACT),
    # -- ztune's own keys inside a DeepSpeed config (DeepSpeed ignores unknown top-level keys) -----------------
    "ztune": _s("ztune extension block; DeepSpeed ignores it"),
    "ztune.activations": _s("ztune activation checkpointing: {checkpointing: none|selective|full, every: k, "
                            "offload: none|cpu}, as in ztune YAML"),
    # -- logging, monitoring, profiling, checkpoint files --------------------------------------------------------
    "steps_per_print": _i(INT_OR_NULL, _LOG),
    "wall_clock_breakdown": _i(BOOL, _LOG),
    "dump_state": _i(BOOL, _LOG),
    "memory_breakdown": _i(BOOL, _LOG),
    "flops_profiler": _i(MAPPING, _LOG),
    # profiling/config.py reads these with get_scalar_param (no model): the types of profiling/constants.py's
    # defaults and of the config documentation (deepspeed.ai/docs/config-json, "Flops Profiler").
    "flops_profiler.enabled": _i(BOOL, _LOG),
    "flops_profiler.recompute_fwd_factor": _i(NUMBER, _LOG),
    "flops_profiler.profile_step": _i(INT, _LOG),
    "flops_profiler.module_depth": _i(INT, _LOG),
    "flops_profiler.top_modules": _i(INT, _LOG),
    "flops_profiler.detailed": _i(BOOL, _LOG),
    "flops_profiler.output_file": _i(STRING_OR_NULL, _LOG),
    "comms_logger": _i(MAPPING, _LOG),
    # comm/config.py CommsLoggerConfig
    "comms_logger.enabled": _i(BOOL, _LOG),
    "comms_logger.prof_all": _i(BOOL, _LOG),
    "comms_logger.prof_ops": _i(LIST, _LOG),
    "comms_logger.verbose": _i(BOOL, _LOG),
    "comms_logger.debug": _i(BOOL, _LOG),
    # DeepSpeed's monitor blocks: runtime/compat/monitor.py writes DeepSpeed's events (lr, and the loss scale
    # with fp16) after each optimizer step on rank 0; a disabled block is listed as ignored.
    "tensorboard": _s(_MON + "; torch.utils.tensorboard.SummaryWriter under output_path/job_name (needs the "
                      "tensorboard package)"),
    "tensorboard.enabled": _s("write TensorBoard scalars"),
    "tensorboard.output_path": _s("directory; the job_name folder is made inside it"),
    "tensorboard.job_name": _s("folder name inside output_path"),
    "wandb": _s(_MON + "; wandb.log({name: value}, step=samples) (needs the wandb package)"),
    "wandb.enabled": _s("log to Weights & Biases"),
    "wandb.group": _s("wandb.init group"),
    "wandb.team": _s("wandb.init entity"),
    "wandb.project": _s("wandb.init project"),
    "csv_monitor": _s(_MON + "; DeepSpeed's files: output_path/job_name/Train_Samples_lr.csv with a "
                      "\"step,lr\" header, one \"samples,value\" row per optimizer step"),
    "csv_monitor.enabled": _s("write CSV files"),
    "csv_monitor.output_path": _s("directory; the job_name folder is made inside it"),
    "csv_monitor.job_name": _s("folder name inside output_path"),
    "comet": _i(MAPPING, _LOG),
    # monitor/config.py CometConfig
    "comet.enabled": _i(BOOL, _LOG),
    "comet.samples_log_interval": _i(INT, _LOG),
    **{f"comet.{k}": _i(STRING_OR_NULL, _LOG)
       for k in ("project", "workspace", "api_key", "experiment_name", "experiment_key", "mode")},
    "comet.online": _i(BOOL_OR_NULL, _LOG),
    # utils/config.py: DeepSpeed reads only timers.throughput (DeepSpeedThroughputTimerConfig)
    "timers": _i(MAPPING, _LOG),
    "timers.throughput": _i(MAPPING, _LOG),
    "timers.throughput.enabled": _i(BOOL, _LOG),
    "timers.throughput.synchronized": _i(BOOL, _LOG),
    # runtime/config.py and runtime/model_checkpointing/config.py read these without a model; the choices are
    # theirs (CHECKPOINT_TAG_VALIDATION_MODES, CHECKPOINT_WRITER_TYPES, CHECKPOINT_DATA_PARALLEL_UNITS), the types
    # those of model_checkpointing/constants.py's defaults.
    "checkpoint": _i(MAPPING, _CKPT),
    "checkpoint.tag_validation": _i(STRING, _CKPT, ("WARN", "IGNORE", "FAIL")),
    "checkpoint.load_universal": _i(BOOL, _CKPT),
    "checkpoint.use_node_local_storage": _i(BOOL, _CKPT),
    "checkpoint.parallel_write": _i(MAPPING, _CKPT),
    "checkpoint.parallel_write.pipeline_stage": _i(BOOL, _CKPT),
    "checkpoint.checkpoint_serialization": _i(BOOL, _CKPT),
    "checkpoint.writer": _i(MAPPING_OR_NULL, _CKPT),
    "checkpoint.writer.type": _i(STRING_OR_NULL, _CKPT, ("MOCK", "PYTHON", "FAST")),
    "checkpoint.writer.decoupled": _i(BOOL, _CKPT),
    "checkpoint.writer.io_buffer_size": _i(COUNT, _CKPT),
    "checkpoint.writer.io_buffer_double": _i(BOOL, _CKPT),
    "checkpoint.writer.show_statistics": _i(BOOL, _CKPT),
    "checkpoint.writer.data_parallel": _i(STRING_OR_NULL, _CKPT, ("REPLICA", "SOCKET", "MACHINE")),
    "checkpoint.writer.io_multiplier": _i(COUNT, _CKPT),
    # runtime/swap_tensor/aio_config.py reads these with get_scalar_param (no model; null = its defaults)
    "aio": _i(MAPPING_OR_NULL, _OFFLOAD_IO),
    **{f"aio.{k}": _i(COUNT, _OFFLOAD_IO) for k in ("block_size", "queue_depth", "intra_op_parallelism")},
    **{f"aio.{k}": _i(BOOL, _OFFLOAD_IO) for k in ("single_submit", "overlap_events", "use_gds")},
    "zero_allow_untested_optimizer": _i(BOOL, "permission flag; ztune shards the optimizers it supports"),
    "zero_force_ds_cpu_optimizer": _i(BOOL, "ztune picks its CPU Adam kernel itself"),
    "dataloader_drop_last": _i(BOOL, "ztune's dataloader follows DistributedSampler defaults"),
    "disable_allgather": _i(BOOL, _PERF),
    "vocabulary_size": _i(INT_OR_NULL, _LOG),
    "prescale_gradients": _i(BOOL, "divides before instead of after the reduction: the same mean"),
    "gradient_predivide_factor": _i(NUMBER, "splits the 1/world division around the reduction: the same mean"),
    "communication_data_type": _s("the gradients' reduction dtype: the compute dtype's own name as it stands; bf16 "
                                  "under fp32 training is compression.method bf16 (a bf16 copy reduced, cast "
                                  "back); any other value is refused (ztune reduces in the compute dtype)"),
    "seq_parallel_communication_data_type": _i(DTYPE_OR_NULL, _PERF),
    "sparse_gradients": _gone("sparse compression of embedding gradients"),
    "scheduler": _s("DeepSpeed's schedules (WarmupLR, WarmupDecayLR, WarmupCosineLR, OneCycle, LRRangeTest) with "
                    "their formulas and defaults (runtime/compat/lr_schedules.py), stepped after each applied "
                    "optimizer step; another type names a torch.optim.lr_scheduler class built with the params "
                    "as keyword arguments, as DeepSpeed does (at every stage here; DeepSpeed 0.19.8 manages it "
                    "only at stage 0 in fp32). LambdaLR, MultiplicativeLR, SequentialLR, ChainedScheduler and "
                    "ReduceLROnPlateau are rejected: they need functions, scheduler objects or a metric. "
                    "DeepSpeed's schedules are checked when the config loads (launcher, `ztune estimate`): "
                    "parameter names and types, what their constructors refuse, and learning-rate bounds below 0 "
                    "(ztune's own refusal: gradient ascent; DeepSpeed takes them); an integral float (1e3) counts "
                    "as an integer step count. torch's are checked against the class's annotations and stepped "
                    "over a stand-in optimizer when the scheduler is built, before training"),
    "optimizer": _s("block (type and params)"),
    # -- features that change training and that ztune does not implement -------------------------------------
    "amp": _gone("NVIDIA Apex AMP", "; use fp16 or bf16"),
    "data_types": _r("gradient accumulation in another dtype is not implemented (ztune accumulates in fp32 at "
                     "stages 1-3)"),
    "gradient_allreduce_op": _n(STRING, "mean", "only the mean reduction is implemented"),
    "torch_autocast": _r("torch.autocast mixed precision is not implemented; use fp16 or bf16"),
    "sequence_parallel_size": _n(INT, 1, "sequence parallelism is not implemented"),
    "pipeline": _r("pipeline parallelism is not implemented"),
    "tensor_parallel": _r("tensor parallelism is not implemented"),
    "compression_training": _gone("compression-aware training"),
    "curriculum_learning": _gone("top-level curriculum_learning"),
    "data_efficiency": _r("data-efficiency sampling is not implemented"),
    "progressive_layer_drop": _gone("progressive layer drop"),
    "eigenvalue": _gone("eigenvalue computation"),
    "elasticity": _gone("elastic training"),
    "hybrid_engine": _r("the RLHF hybrid engine is not implemented"),
    "compile": _r("DeepSpeed's compile integration is not implemented"),
    "nebula": _gone("Nebula checkpointing"),
    "quantize_training": _gone("MoQ quantized training"),
    "sparse_attention": _gone("sparse attention"),
    "graph_harvesting": _gone("graph harvesting"),
}

# DeepSpeed's older spellings, read as the key they stand for.
ALIASES = {"bfloat16": "bf16"}


def rule(key: str) -> KeyRule | None:
    """The rule for the dotted DeepSpeed key `key`, or None when ztune does not know it."""
    return KEYS.get(key)


# Ignored blocks DeepSpeed 0.19.8 reads key by key (dict lookups in runtime/config.py, profiling/config.py,
# runtime/swap_tensor/aio_config.py, not a pydantic model): a key it does not know there is skipped, not refused
# (aio.thread_count, the old name of intra_op_parallelism, is in widely copied ZeRO-Infinity configs), so ztune
# accepts it too: the block is listed as ignored as a whole. Known keys are still type-checked.
OPEN_BLOCKS = frozenset({"aio", "checkpoint", "checkpoint.writer", "checkpoint.parallel_write", "flops_profiler",
                         "timers"})


def children(prefix: str, *, status: str | None = None) -> list[str]:
    """The last components of the known keys directly under `prefix` (optionally with one status), sorted."""
    depth = prefix.count(".") + 1
    return sorted(k.split(".")[-1] for k, r in KEYS.items()
                  if k.startswith(prefix + ".") and k.count(".") == depth and (status is None or r.status == status))
