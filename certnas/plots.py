"""PNG figures (matplotlib, Agg backend): cells as graphs, architecture weights over epochs."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from certnas.space.genotype import Genotype  # noqa: E402


def _save(fig, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(handle)
    fig.savefig(temp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(temp, path)


def plot_genotype(genotype: Genotype, path: Path) -> None:
    """Both cells: inputs c_{k-2}, c_{k-1}, the intermediate nodes, the output, labelled edges."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, (title, edges, concat) in zip(axes, (("normal cell", genotype.normal, genotype.normal_concat),
                                                 ("reduction cell", genotype.reduce, genotype.reduce_concat))):
        if edges is None:
            ax.text(0.5, 0.5, "not searched", ha="center", va="center", fontsize=11)
            ax.set_title(title)
            ax.axis("off")
            continue
        steps = len(edges) // 2
        position = {0: (-1.0, 1.0), 1: (-1.0, -1.0)}
        for node in range(steps):
            position[node + 2] = (1.0 + 1.2 * node, 1.5 - 3.0 * node / max(steps - 1, 1))
        position["out"] = (1.2 * steps + 1.0, 0.0)
        labels = {0: "c_{k-2}", 1: "c_{k-1}", "out": "c_{k}"}
        for index, (op, source) in enumerate(edges):
            target = index // 2 + 2
            (x0, y0), (x1, y1) = position[source], position[target]
            ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                        arrowprops=dict(arrowstyle="->", color="tab:blue", lw=1.2, shrinkA=14, shrinkB=14))
            offset = 0.12 if index % 2 else -0.12
            ax.text((x0 + x1) / 2, (y0 + y1) / 2 + offset, op, fontsize=7, ha="center",
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.8))
        for node in concat:
            (x0, y0), (x1, y1) = position[node], position["out"]
            ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                        arrowprops=dict(arrowstyle="->", color="gray", lw=0.8, ls="--", shrinkA=14, shrinkB=14))
        for node, (x, y) in position.items():
            ax.text(x, y, labels.get(node, str(node)), ha="center", va="center", fontsize=9,
                    bbox=dict(boxstyle="circle", fc="lightyellow" if node in (0, 1, "out") else "lightblue"))
        ax.set_title(title)
        ax.set_xlim(-1.6, 1.2 * steps + 1.6)
        ax.set_ylim(-2.0, 2.0)
        ax.axis("off")
    _save(fig, path)


def plot_arch_history(history: List[Dict], primitives: Sequence[str], path: Path) -> None:
    """Mean softmax weight of each operation over the edges, per epoch, for both cell types."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    epochs = [row["epoch"] for row in history]
    for ax, cell in zip(axes, ("normal", "reduce")):
        for name in primitives:
            key = f"w_{cell}_{name}"
            if history and key in history[0]:
                ax.plot(epochs, [row[key] for row in history], marker="o", ms=3, label=name)
        ax.set_title(f"{cell} cell")
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean operation weight")
    axes[1].legend(fontsize=7, loc="best")
    _save(fig, path)
