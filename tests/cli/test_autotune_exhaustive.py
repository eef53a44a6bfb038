"""`ztune autotune --exhaustive`: the search may not stop on convergence before every candidate has run (the
ground truth bench_autotune_cluster.py checks the tuner's pick against). No trial runs here: the tuner is
replaced by one that records its settings."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from ztune.cli import build_app
from ztune.errors import UserError
from ztune.tune import tuner


class _Stop(Exception):
    pass


@pytest.mark.parametrize("exhaustive", [False, True])
def test_exhaustive_sets_min_trials_to_the_grid(tmp_path, monkeypatch, exhaustive):
    seen = {}

    class Recorder:
        def __init__(self, *, candidates, settings, **_):
            seen.update(grid=len(candidates), settings=settings)
            raise _Stop

    monkeypatch.setattr(tuner, "Tuner", Recorder)
    # A GPU profile: the CLI times no CPU step for it, so only the space and the settings are built.
    args = ["autotune", "--model", "tiny-gpt", "--hardware", "dgx-h100", "--nproc", "2", "--global-batch", "8",
            "--stages", "0,1,2,3", "--vary", "stage,micro", "--out", str(tmp_path / "out"), "--no-plot"]
    result = CliRunner().invoke(build_app(("autotune",)), args + (["--exhaustive"] if exhaustive else []))
    assert isinstance(result.exception, _Stop), result.output
    assert seen["grid"] == 4 * 3  # stages x micro-batches 1, 2, 4
    assert seen["settings"].min_trials == (12 if exhaustive else 3)


def test_confirmation_flags_reach_the_tuner_and_bad_ones_are_one_line(tmp_path, monkeypatch):
    seen = {}

    class Recorder:
        def __init__(self, *, settings, **_):
            seen["settings"] = settings
            raise _Stop

    monkeypatch.setattr(tuner, "Tuner", Recorder)
    args = ["autotune", "--model", "tiny-gpt", "--hardware", "dgx-h100", "--nproc", "2", "--global-batch", "8",
            "--out", str(tmp_path / "out"), "--no-plot"]
    app = build_app(("autotune",))
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, _Stop), result.output
    s = seen["settings"]
    assert (s.confirm_repeats, s.confirm_top, s.confirm_margin) == (2, 3, 0.15)  # on by default
    result = CliRunner().invoke(app, args + ["--confirm", "0", "--confirm-top", "2", "--confirm-margin", "0.3"])
    assert isinstance(result.exception, _Stop), result.output
    s = seen["settings"]
    assert (s.confirm_repeats, s.confirm_top, s.confirm_margin) == (0, 2, 0.3)
    for bad in (["--confirm-top", "1"], ["--confirm-margin", "1.5"], ["--confirm", "-1"]):
        result = CliRunner().invoke(app, args + bad)
        # A UserError: ztune's main() prints it as one line and exits 2.
        assert isinstance(result.exception, UserError) and bad[0] in str(result.exception), (bad, result.output)
