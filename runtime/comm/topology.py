"""Which ranks share a host: the layout two-level (hierarchical) collectives, hpZ and qgZ are built on.

torchrun numbers ranks host by host: the ranks of node k are k*L .. k*L + L - 1, where L is the number of
ranks per node (`LOCAL_WORLD_SIZE`, set by torchrun for every worker; torch.distributed.run docs,
"Environment Variables"). Every host must run the same L; a job whose hosts differ (`slots` unequal) is
flat only (`NodeLayout.uniform` is False).

`ZTUNE_LOCAL_WORLD_SIZE` overrides L, so tests and benchmarks can treat one machine's ranks as several
"hosts" (the cluster in a box runs real namespaces instead).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ztune import envvars
from ztune.errors import EnvVarError

ENV_OVERRIDE = "ZTUNE_LOCAL_WORLD_SIZE"


@dataclass(frozen=True)
class NodeLayout:
    """Ranks grouped by host. `ranks_per_node` (L) divides `world_size` when `uniform`."""

    world_size: int
    ranks_per_node: int

    @property
    def uniform(self) -> bool:
        return self.ranks_per_node >= 1 and self.world_size % self.ranks_per_node == 0

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.ranks_per_node if self.uniform else 1

    @property
    def multi_node(self) -> bool:
        """True when there is more than one host and each holds the same number of ranks."""
        return self.uniform and self.num_nodes > 1

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def local_rank_of(self, rank: int) -> int:
        return rank % self.ranks_per_node

    def intra_node_ranks(self, node: int) -> list[int]:
        """Global ranks on host `node`, in local-rank order."""
        first = node * self.ranks_per_node
        return list(range(first, first + self.ranks_per_node))

    def inter_node_ranks(self, local_rank: int) -> list[int]:
        """Global ranks with local rank `local_rank`, one per host, in node order."""
        return [node * self.ranks_per_node + local_rank for node in range(self.num_nodes)]


def layout_from_env(*, world_size: int, environ: dict | None = None) -> NodeLayout:
    """The layout for this job: `ZTUNE_LOCAL_WORLD_SIZE`, else torchrun's `LOCAL_WORLD_SIZE`, else one host.

    Raises EnvVarError (a ValueError) when the override is not a positive integer dividing `world_size`.
    """
    env = os.environ if environ is None else environ
    per_node = envvars.read(ENV_OVERRIDE, environ=env)  # EnvVarError (a ValueError) unless an integer >= 1
    if per_node is not None:
        if world_size % per_node:
            raise EnvVarError(f"{ENV_OVERRIDE}={per_node} must be a positive divisor of the world size "
                             f"{world_size}; set it to the ranks per host")
        return NodeLayout(world_size=world_size, ranks_per_node=per_node)
    try:
        per_node = int(env.get("LOCAL_WORLD_SIZE", world_size))
    except ValueError:
        per_node = world_size
    if per_node < 1 or per_node > world_size:
        per_node = world_size
    return NodeLayout(world_size=world_size, ranks_per_node=per_node)
