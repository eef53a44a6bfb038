"""DeepSpeed's command-line convention: `add_config_arguments(parser)` and the config an `initialize(args=...)`
call takes from the parsed arguments (DeepSpeed 0.19.8: deepspeed/__init__.py, _add_core_arguments and
initialize)."""

from __future__ import annotations

import argparse
from typing import Any

from ztune.errors import ConfigError

# deepspeed.initialize's arguments -> what ztune.initialize does with them (for the migration guide).
INITIALIZE_ARGUMENTS: dict[str, str] = {
    "args": "parsed arguments; args.deepspeed_config or args.ztune_config names the config file",
    "model": "required; also ztune's short form initialize(model, config)",
    "optimizer": "a torch.optim Adam/AdamW/SGD (or a callable(params) returning one): its class, hyper-parameters "
                 "and param groups are applied to the shards, overriding the config's optimizer block; any other "
                 "optimizer is refused with one error",
    "model_parameters": "the parameters to train, or parameter groups (dicts with params and their own lr, "
                        "weight_decay, ...); default: all with requires_grad",
    "training_data": "a Dataset: the returned dataloader yields this rank's micro-batches (DistributedSampler)",
    "lr_scheduler": "a scheduler, or a callable(optimizer) returning one; stepped after each applied step; "
                    "default: the config's scheduler block",
    "distributed_port": "MASTER_PORT when the environment has none",
    "mpu": "refused: ztune is data-parallel only",
    "dist_init_required": "None: create the group if needed; False: never (error if several ranks and none); "
                          "True: create it",
    "collate_fn": "the returned dataloader's collate_fn",
    "config": "dict, JSON/YAML path or TrainConfig; None: $ZTUNE_CONFIG, else defaults",
    "mesh_param": "refused: no sequence parallelism",
    "config_params": "DeepSpeed's older name for config",
}


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `--deepspeed` (flag), `--deepspeed_config PATH` and `--ztune_config PATH` to `parser`, in an
    argument group, and return the parser (as DeepSpeed's function does)."""
    group = parser.add_argument_group("ztune", "ztune (DeepSpeed-compatible) configuration")
    group.add_argument("--deepspeed", default=False, action="store_true",
                       help="Accepted for DeepSpeed scripts; ztune always runs the engine.")
    group.add_argument("--deepspeed_config", default=None, type=str,
                       help="DeepSpeed JSON config file (read by ztune.initialize(args=...)).")
    group.add_argument("--ztune_config", default=None, type=str,
                       help="ztune YAML or DeepSpeed JSON config file (read by ztune.initialize(args=...)).")
    return parser


def config_from_args(args: Any, config: Any, config_params: Any) -> Any:
    """The config `initialize` uses: `config`, else `config_params` (DeepSpeed's older name), else the file in
    args.deepspeed_config or args.ztune_config. Giving it twice is an error, as in DeepSpeed."""
    if config is None and config_params is not None:
        config = config_params
    elif config is not None and config_params is not None:
        raise ConfigError("initialize: both config and config_params are given; pass one of them")
    from_args = {name: getattr(args, name, None) for name in ("deepspeed_config", "ztune_config")}
    given = {name: value for name, value in from_args.items() if value is not None}
    if len(given) > 1:
        raise ConfigError("initialize: args has both --deepspeed_config and --ztune_config; pass one of them")
    if given:
        name, value = next(iter(given.items()))
        if config is not None:
            raise ConfigError(f"initialize: the config is given twice, as config= and as args.{name} "
                              f"(--{name}); pass one of them")
        config = value
    return config
