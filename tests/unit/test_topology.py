"""NodeLayout: torchrun's host-by-host rank numbering, and the override tests use."""

import pytest

from ztune.runtime.comm.topology import NodeLayout, layout_from_env


def test_two_hosts_of_two():
    lay = NodeLayout(world_size=4, ranks_per_node=2)
    assert lay.multi_node and lay.num_nodes == 2
    assert [lay.node_of(r) for r in range(4)] == [0, 0, 1, 1]
    assert lay.intra_node_ranks(1) == [2, 3]
    assert lay.inter_node_ranks(1) == [1, 3]


def test_single_host_is_not_multi_node():
    assert not NodeLayout(world_size=4, ranks_per_node=4).multi_node


def test_uneven_hosts_are_flat():
    lay = NodeLayout(world_size=6, ranks_per_node=4)
    assert not lay.uniform and not lay.multi_node and lay.num_nodes == 1


def test_env_override_wins_over_torchrun():
    lay = layout_from_env(world_size=4, environ={"LOCAL_WORLD_SIZE": "4", "ZTUNE_LOCAL_WORLD_SIZE": "2"})
    assert lay.ranks_per_node == 2


def test_torchrun_value_and_default():
    assert layout_from_env(world_size=8, environ={"LOCAL_WORLD_SIZE": "4"}).num_nodes == 2
    assert layout_from_env(world_size=8, environ={}).num_nodes == 1


@pytest.mark.parametrize("raw", ["x", "0", "3", "-2"])
def test_bad_override_names_the_variable(raw):
    with pytest.raises(ValueError, match="ZTUNE_LOCAL_WORLD_SIZE"):
        layout_from_env(world_size=4, environ={"ZTUNE_LOCAL_WORLD_SIZE": raw})
