"""PNG plots of cost-model results. matplotlib is optional (`pip install 'ztune[plot]'`) and imported only
inside the plotting function, so nothing else in ztune pays for it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ztune.errors import UserError

GIB = 1 << 30
CATEGORIES = ("params", "grads", "optimizer", "activations", "buffers")


def _best_per_stage(estimates: Sequence[Any]) -> list[Any]:
    """One estimate per ZeRO stage: the first (fastest fitting, by sweep order) of each."""
    chosen: dict[int, Any] = {}
    for e in estimates:
        chosen.setdefault(e.config.zero.stage, e)
    return [chosen[s] for s in sorted(chosen)]


def plot_memory(estimates: Sequence[Any], path: str | Path) -> Path:
    """Stacked bars of memory per GPU by category (GiB), one bar per ZeRO stage (its top-ranked
    configuration), with the GPU's capacity as a dashed line. Writes a PNG at `path`."""
    path = Path(path)
    if not estimates:
        raise UserError("nothing to plot: no estimates")
    if not path.parent.exists():
        raise UserError(f"--plot: directory {str(path.parent)!r} does not exist")
    if path.is_dir():
        raise UserError(f"--plot {str(path)!r} is a directory; give a file name such as {str(path / 'mem.png')!r}")
    if path.suffix.lower() != ".png":
        raise UserError(f"--plot {str(path)!r}: the plot is a PNG; give a file name ending in .png")
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'ztune[plot]'") from None

    rows = _best_per_stage(estimates)
    labels = [f"stage {e.config.zero.stage}\n{e.label.split(', ', 1)[1]}".replace(", ", "\n") for e in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * len(rows)), 5.0))
    bottoms = [0.0] * len(rows)
    for cat in CATEGORIES:
        values = [e.memory_per_gpu.as_dict()[cat] / GIB for e in rows]
        ax.bar(range(len(rows)), values, bottom=bottoms, label=cat)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    capacity = rows[0].hardware.gpu_memory_bytes / GIB
    ax.axhline(capacity, color="black", linestyle="--", linewidth=1, label=f"{rows[0].hardware.name} memory")
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("GiB per GPU")
    ax.set_title(f"{rows[0].model.name} on {rows[0].world_size} GPUs: memory per GPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100, format="png")
    except OSError as exc:
        raise UserError(f"--plot {str(path)!r} cannot be written ({exc.strerror or exc.__class__.__name__})") from None
    finally:
        plt.close(fig)
    return path
