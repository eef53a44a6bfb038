"""DeepSpeed's command-line convention: `add_config_arguments(parser)` and the config an `initialize(args=...)`
call takes from the parsed arguments (DeepSpeed 0.19.8: deepspeed/__init__.py, _add_core_arguments and
initialize)."""

from __future__ import annotations

import argparse
from typing import Any

from ztune.errors import ConfigError


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
