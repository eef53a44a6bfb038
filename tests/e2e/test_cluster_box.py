"""The cluster in a box (benchmarks/cluster_box.py): hosts that look separate, links that are really shaped,
a teardown that leaves nothing, and a 2 hosts x 2 ranks ztune run that trains as the same 4 ranks on one host.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import cluster_box
from tests.helpers.load import scaled_limit_s

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
WORKER = "benchmarks/cluster_worker.py"
SHAPED_MBIT = 100  # far below what an unshaped veth carries even on a loaded machine, so the check can fail
MAX_OVER_RATE = 1.5  # a wide margin: tbf's bucket lets one burst through unshaped


def test_box_hosts_are_separate_and_teardown_leaves_nothing():
    if (reason := cluster_box.why_unavailable()) is not None:
        pytest.skip(f"cluster-in-a-box tests skipped: {reason}")
    box = cluster_box.ClusterBox(num_hosts=2, rate_mbit=1000)
    with box:
        names = [box.run(i, ["hostname"]).stdout.strip() for i in range(2)]
        assert names[0] != names[1] and all(n.startswith(box.network.prefix) for n in names)
        # Each hostname resolves to its host's own address, as gloo expects of a real cluster.
        code = "import socket; print(socket.gethostbyname(socket.gethostname()))"
        assert [box.run(i, [sys.executable, "-c", code]).stdout.strip() for i in range(2)] == \
            [h.addr for h in box.hosts]
        # A file in host 0's /dev/shm is invisible on host 1 and in the root namespace, visible on host 0.
        marker = f"/dev/shm/{box.network.prefix}-marker"
        box.run(0, ["touch", marker])
        assert box.run(0, ["test", "-e", marker], check=False).returncode == 0
        assert box.run(1, ["test", "-e", marker], check=False).returncode == 1
        assert not Path(marker).exists()
        qdiscs = box.qdiscs()
        assert len(qdiscs) == 4 and all("tbf" in q and "rate 1Gbit" in q for q in qdiscs), qdiscs
        stray = box.popen(1, ["sleep", "300"])  # a process the test "forgot": close() must end it
    stray.wait(timeout=10)
    assert stray.returncode is not None
    assert box.leftovers() == []


_HOLDER = """
import sys
from benchmarks.cluster_box import ClusterBox
box = ClusterBox(num_hosts=2).start()
child = box.popen(1, ["sleep", "300"])
print(box.network.prefix, child.pid, flush=True)
box.run(0, ["sleep", "300"], timeout_s=600)  # SIGTERM arrives while the box is in use
"""


def test_sigterm_of_the_owner_tears_the_box_down():
    """A process that holds a box and gets SIGTERM (no `with`, no cleanup of its own) leaves nothing."""
    if (reason := cluster_box.why_unavailable()) is not None:
        pytest.skip(f"cluster-in-a-box tests skipped: {reason}")
    owner = subprocess.Popen([sys.executable, "-c", _HOLDER], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        prefix, child_pid = owner.stdout.readline().split()
        owner.terminate()
        owner.wait(timeout=scaled_limit_s(30))
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
    assert owner.returncode == -15, owner.stderr.read()[-2000:]  # re-raised with the default action
    assert not cluster_box.net.alive(int(child_pid))
    assert not [n for n in cluster_box.net.family_namespaces() if n.startswith(prefix)]
    assert not list(Path("/etc/netns").glob(f"{prefix}*"))


def test_shaping_limits_throughput(box):
    box.set_rate(None)
    unshaped = box.measure_transfer_mbit(0, 1)
    box.set_rate(SHAPED_MBIT)
    shaped = box.measure_transfer_mbit(0, 1)
    reverse = box.measure_transfer_mbit(1, 0)
    limit = MAX_OVER_RATE * SHAPED_MBIT
    assert unshaped > limit, f"unshaped veth carried only {unshaped:.0f} Mbit/s: this check cannot tell shaping"
    assert shaped < limit and reverse < limit, \
        f"shaped to {SHAPED_MBIT} Mbit/s, measured {shaped:.0f} (0->1) and {reverse:.0f} (1->0) Mbit/s"


def _train(box, *, hosts: list[int], nproc: int, out: Path, variants: tuple[str, ...]) -> dict:
    args = [WORKER, "--model", "box-test-llama", "--precision", "fp32", "--seq-len", "32", "--warmup", "1",
            "--steps", "2", *(a for v in variants for a in ("--variant", v)), "--out", str(out)]
    # ZTUNE_SHM_MIN_BYTES=0: this small model's buffers go through shared memory wherever the ranks share it.
    results = box.torchrun(args, nproc_per_node=nproc, hosts=hosts, env={"OMP_NUM_THREADS": "1",
                                                                         "ZTUNE_SHM_MIN_BYTES": "0"},
                           timeout_s=scaled_limit_s(120))
    for r in results:
        assert r.returncode == 0, f"host {r.host}: torchrun exited {r.returncode}\n{r.output[-4000:]}"
    return json.loads(out.read_text())


def test_two_hosts_train_like_one_host(box, tmp_path):
    """2 hosts x 2 ranks (gloo across hosts, torchrun's LOCAL_WORLD_SIZE=2) against 4 ranks on one host
    (shared memory among all): the same losses on every rank within fp32 parity (1e-5 relative), real bytes
    on the hosts' links, and shared memory only inside a host."""
    from ztune.specs import count_params

    sys.path.insert(0, str(REPO / "benchmarks"))
    from cluster_worker import model_spec

    flat, hier = "ztune flat, stage 3", "ztune hierarchical, stage 3"
    two = _train(box, hosts=[0, 1], nproc=2, out=tmp_path / "two.json", variants=(flat, hier))
    one = _train(box, hosts=[0], nproc=4, out=tmp_path / "one.json", variants=(flat,))
    assert (two["num_nodes"], two["ranks_per_node"], one["num_nodes"]) == (2, 2, 1)
    assert two["shared_memory"] == {"whole_job": False, "first_host": True}
    assert one["shared_memory"]["whole_job"] is True
    (run2, run2h), (run1,) = two["variants"], one["variants"]
    assert run2["error"] is None and run2h["error"] is None and run1["error"] is None, \
        (run2["error"], run2h["error"], run1["error"])
    assert (run2["engine_shared_memory"], run1["engine_shared_memory"]) == (False, True)
    # Flat gloo across hosts, and the two-level path (shared memory inside each host, gloo across), both
    # train as the one-host run does.
    for run in (run2, run2h):
        for rank, (a, b) in enumerate(zip(run["losses_by_rank"], run1["losses_by_rank"], strict=True)):
            assert len(a) == 3 and a == pytest.approx(b, rel=1e-5), f"{run['name']} rank {rank}: {a} vs {b}"
    # Each host's share crosses once: the hierarchical run sends less across hosts than the flat one.
    assert run2h["tx_bytes_per_step"] < run2["tx_bytes_per_step"], (run2h["tx_bytes_per_step"],
                                                                      run2["tx_bytes_per_step"])
    # Stage 3 gathers every parameter across hosts at least once per step: at least one fp32 copy of the
    # model must have crossed the links per step, by the kernel's counters; on one host, next to nothing.
    fp32_model_bytes = 4 * count_params(model_spec("box-test-llama")).total
    assert run2["tx_bytes_per_step"] > fp32_model_bytes, run2["tx_bytes_per_step"]
    assert run1["tx_bytes_per_step"] < 0.01 * fp32_model_bytes, run1["tx_bytes_per_step"]
    # every rank's CPU seconds per step are recorded (the cost bench's "where the time goes" table)
    for run in (run2, run2h, run1):
        cpus = run["cpu_s_per_step_by_rank"]
        assert len(cpus) == 4 and all(c is not None and c > 0 for c in cpus), cpus


def test_probe_measures_the_inter_host_link(box, tmp_path):
    """`ztune probe --inter-node-master` on both hosts measures the shaped link (not an assumed 10 Gbit/s):
    the profile's inter-node bandwidth is at most the shaped rate (with the same margin) and a fair share of
    it, and says it was measured. 1 Gbit/s: the quick probe's messages reach 64 MiB, ~5 s each at 200 Mbit/s."""
    rate_mbit = 1000
    box.set_rate(rate_mbit)
    procs = []
    for k in range(2):
        argv = [sys.executable, "-m", "ztune", "probe", "--quick", "--ranks", "1", "--json", "--force",
                "--output", str(tmp_path / f"host{k}.yaml"), "--inter-node-master", f"{box.hosts[0].addr}:29511",
                "--node-rank", str(k)]
        procs.append(box.popen(k, argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=scaled_limit_s(180)) for p in procs]
    rate_bytes = rate_mbit * 1e6 / 8
    for k, (p, (out, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"host {k}: {err[-3000:]}"
        data = json.loads(out)
        link = data["measured"]["inter_node"]
        assert link["transport"] == "gloo between hosts"
        assert data["provenance"]["inter_node_bw_bytes_per_s"].startswith("measured:")
        bw = data["profile"]["inter_node_bw_bytes_per_s"]  # per rank; one rank per host here
        assert 0.2 * rate_bytes < bw < MAX_OVER_RATE * rate_bytes, f"host {k}: {bw * 8 / 1e6:.0f} Mbit/s"
        assert data["profile"]["inter_node_latency_s"] > 0
        # the link's CPU per byte sent or received (gloo over TCP): measured, and far below a second per MB
        assert 0 < data["profile"]["inter_node_cpu_s_per_byte"] < 1e-6, data["profile"]["inter_node_cpu_s_per_byte"]
        assert data["provenance"]["inter_node_cpu_s_per_byte"].startswith("measured:")
        # gloo's reduce across the link, for the hierarchical reduce-scatter: more CPU per byte of its buffer
        # than the all_reduce per byte sent or received (measured 2.3x on this box; ring reduce-scatter + root)
        reduce_cpu = data["profile"]["inter_node_reduce_cpu_s_per_byte"]
        assert data["profile"]["inter_node_cpu_s_per_byte"] < reduce_cpu < 1e-6, reduce_cpu
        assert data["provenance"]["inter_node_reduce_cpu_s_per_byte"].startswith("measured:")
