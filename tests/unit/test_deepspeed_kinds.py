"""The lax reading of ignored DeepSpeed values (ztune/config/deepspeed_kinds.py) accepts what DeepSpeed's pydantic
models accept and refuses what they refuse, checked against pydantic itself where it is installed."""

import pytest

from ztune.config.deepspeed_keys import BOOL, INT, NUMBER
from ztune.config.deepspeed_kinds import check_kind
from ztune.errors import ConfigError

SAMPLES = [True, False, 0, 1, 2, -3, 0.0, 1.0, 1.5, 8.0, 1e9, "true", "False", "YES", "off", "t", "n", "1", "0",
           " true", "garbage", "8", " 8 ", "8.0", "-8", "1e3", "1.5", "", None, [1], {}]


def _accepts(kind, value) -> bool:
    try:
        check_kind(kind, value, "k", lax=True)
    except ConfigError:
        return False
    return True


@pytest.mark.parametrize("kind, tp", [(BOOL, bool), (INT, int), (NUMBER, float)])
def test_lax_reading_matches_pydantic(kind, tp):
    pydantic = pytest.importorskip("pydantic")
    adapter = pydantic.TypeAdapter(tp)
    for value in SAMPLES:
        try:
            adapter.validate_python(value)
            theirs = True
        except pydantic.ValidationError:
            theirs = False
        assert _accepts(kind, value) == theirs, (kind, value)


def test_strict_reading_takes_only_the_json_type():
    for kind, good, bad in ((BOOL, [True, False], [1, "true", None]), (INT, [3, 3.0], ["3", True, 3.5]),
                            (NUMBER, [3, 0.5], ["0.5", True])):
        for value in good:
            check_kind(kind, value, "k")
        for value in bad:
            with pytest.raises(ConfigError, match="^k: expected "):
                check_kind(kind, value, "k")
