"""Parsing of `ztune probe --inter-node-master` and the profile built from a measured inter-host link."""

from __future__ import annotations

import pytest

from ztune import probe
from ztune.errors import UserError
from ztune.probe_link import DEFAULT_PORT, TRANSPORT, parse_master


def test_parse_master():
    assert parse_master("10.0.0.1") == ("10.0.0.1", DEFAULT_PORT)
    assert parse_master("node0:1234") == ("node0", 1234)
    assert parse_master("[fd00::1]:29511") == ("fd00::1", 29511)
    # a space or a leading '-' (was: a rendezvous retried until the timeout, or an ssh-style option)
    # the port in other scripts' digits, or with '_' or spaces (int() took them: was port 29510)
    for bad in ("node0:", ":1234", "node0:x", "node0:70000", "a b", "-oProxyCommand=x",
                "h:\uff12\uff19\uff15\uff11\uff10", "h:29_510", "h: 29510"):
        with pytest.raises(UserError, match="--inter-node-master"):
            parse_master(bad)


def test_measured_link_replaces_the_assumption():
    host = probe.HostInfo("h", 2, 8 << 30)
    gpus = probe.GpuScan((), "no NVIDIA GPU/driver found")
    mem = probe.MemoryBandwidth(10e9, 12e9, 2)
    flops = probe.FlopRates(fp32_flops_per_s=1e11, bf16_flops_per_s=1e11, device="cpu", matrix_size=512)
    sizes, times = (1 << 20, 8 << 20), (0.01, 0.07)
    link = probe.CollectiveResult("gloo", 2, sizes, times, probe.fit_alpha_beta(sizes, times, world_size=2),
                                  transport=TRANSPORT)
    m = probe.Measurements(host, gpus, 2, mem, flops, None, None, inter_node=link)
    hw = probe.build_profile(m)
    notes = probe.field_notes(m)
    # 2-rank all_reduce busbw = bytes / time; 7 MiB more in 60 ms more; split over the host's 2 ranks.
    assert hw.inter_node_bw_bytes_per_s == pytest.approx((7 << 20) / 0.06 / 2)
    assert hw.inter_node_latency_s == pytest.approx(link.fit.latency_s)
    assert notes["inter_node_bw_bytes_per_s"].startswith("measured:")
    assert notes["inter_node_latency_s"].startswith("measured:")
    single = probe.field_notes(probe.Measurements(host, gpus, 2, mem, flops, None, None))
    assert single["inter_node_bw_bytes_per_s"].startswith("assumed: this single-host probe measured no")


def test_master_that_does_not_resolve_is_one_line_before_probing(capsys, tmp_path):
    # was: both probe processes retried the rendezvous with c10d warnings until the timeout
    from ztune.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["probe", "--quick", "--inter-node-master", "nohost.invalid", "--node-rank", "1",
              "-o", str(tmp_path / "hw.yaml")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "'nohost.invalid' does not resolve here" in err, err
