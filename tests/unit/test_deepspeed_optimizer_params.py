"""An optimizer param the DeepSpeed optimizer type does not take is refused by its presence, whatever its value,
as DeepSpeed's optimizer constructor refuses it (torch.optim.SGD(eps=...) raises TypeError); a value equal to
ztune's default used to pass unnoticed."""

import pytest

from ztune.config import from_deepspeed
from ztune.config.deepspeed import _PARAMS_OF_TYPE
from ztune.config.schema import OptimizerConfig
from ztune.errors import ConfigError

TYPES = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "onebitadam": "OneBitAdam"}
_DEFAULT = OptimizerConfig()
# A value each param could sensibly hold: ztune's default where it has one, else the no-effect value.
VALUES = {"lr": 1e-3, "betas": list(_DEFAULT.betas), "eps": _DEFAULT.eps, "weight_decay": 0.0,
          "momentum": _DEFAULT.momentum, "bias_correction": True, "freeze_step": _DEFAULT.freeze_step,
          "adam_w_mode": True, "torch_adam": False, "fused": False, "amsgrad": False, "dampening": 0,
          "nesterov": False, "eps_inside_sqrt": False, "cuda_aware": False, "comm_backend_name": "nccl"}
FOREIGN = sorted((t, k) for t, params in _PARAMS_OF_TYPE.items() for k in set(VALUES) - params)


def _load(type_name, params):
    return from_deepspeed({"train_batch_size": 8, "gradient_clipping": 0.0, "optimizer": {"type": type_name,
                                                                                         "params": params}})


def test_every_param_is_some_types():
    assert set(VALUES) == set().union(*_PARAMS_OF_TYPE.values())


@pytest.mark.parametrize("type_key, param", FOREIGN)
def test_a_param_of_another_type_is_refused_at_any_value(type_key, param):
    name = TYPES[type_key]
    with pytest.raises(ConfigError, match=f"^optimizer.params.{param}: {name} has no {param}; remove it$"):
        _load(name, {"lr": 0.1, param: VALUES[param]})


def test_the_reported_case():
    with pytest.raises(ConfigError, match="^optimizer.params.eps: SGD has no eps"):
        _load("SGD", {"lr": 0.1, "eps": 1e-8})


@pytest.mark.parametrize("type_key", sorted(_PARAMS_OF_TYPE))
def test_each_type_takes_its_own_params(type_key):
    params = {k: VALUES[k] for k in _PARAMS_OF_TYPE[type_key]}
    cfg, _ = from_deepspeed({"train_batch_size": 8, "gradient_clipping": 0.0,
                             "optimizer": {"type": TYPES[type_key], "params": params}})
    assert cfg.optimizer.lr == 1e-3


def test_an_unknown_param_lists_the_types_own():
    with pytest.raises(ConfigError, match="^unknown key 'optimizer.params.epsilon'; allowed for SGD: dampening, "
                                          "fused, lr, momentum, nesterov, weight_decay$"):
        _load("SGD", {"epsilon": 1e-8})
