"""Figures: certified radius per row, verified and PGD accuracy against eps."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from benchmarks.paper.tables import by_row

def figures(records: List[Dict], out: Path, dataset: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd
    from certnas.plots import _save
    for norm, label in (("inf", "L-inf"), ("2", "L2")):
        radii: Dict[str, pd.DataFrame] = {}
        for row, mine in by_row(records, dataset):
            frame = pd.concat([pd.read_csv(out / r[f"radius_csv_{norm}"]).assign(seed=r["seed"]) for r in mine])
            radii[row] = frame[frame["mode"] == "radius"]
        if not radii:
            continue
        fig, ax = plt.subplots(figsize=(10, 4))
        data = [frame[frame["method"] == "crown-ibp"]["radius"].to_numpy() for frame in radii.values()]
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(radii) + 1), list(radii), rotation=20)
        ax.set_ylabel(f"certified {label} radius (CROWN-IBP)")
        ax.set_title(f"{dataset}: certified radius per sample, all seeds")
        _save(fig, out / f"radius_{dataset}_{norm}.png")
        fig, ax = plt.subplots(figsize=(7, 4.5))
        grid = np.linspace(0, max(float(f["radius"].max()) for f in radii.values()) * 1.05 + 1e-9, 60)
        for (row, frame), color in zip(radii.items(), plt.cm.tab10.colors):
            certified = frame[frame["method"].isin(["ibp", "crown-ibp", "crown"])].groupby(["seed", "index"])["radius"].max()
            attack = frame[frame["method"].str.startswith("pgd")]["radius"].to_numpy()
            ax.plot(grid, [(certified.to_numpy() >= g).mean() for g in grid], color=color, label=f"{row} verified")
            ax.plot(grid, [(attack > g).mean() for g in grid], color=color, ls="--", label=f"{row} PGD")
        ax.set_xlabel(f"{label} eps")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{dataset}: verified (solid) and PGD (dashed) accuracy against eps")
        ax.legend(fontsize=6, ncol=2)
        _save(fig, out / f"accuracy_vs_eps_{dataset}_{norm}.png")
