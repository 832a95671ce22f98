"""The tables (pandas frames, CSV and Markdown) built from the pipeline's records."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List

from benchmarks.paper.scales import REPORTED, ROWS, Scale
from certnas.files import atomic_write_text

def _mean_and_std(values: List[float]):
    """(mean, sample std or None for one value), or None for no values."""
    if not values:
        return None
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, None
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5


def _mean_std(values: List[float], scale: float = 1.0, digits: int = 2) -> str:
    stats = _mean_and_std([v * scale for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))])
    if stats is None:
        return "n/a"
    mean, std = stats
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _mean_std_sci(values: List[float]) -> str:
    stats = _mean_and_std([v for v in values if v is not None])
    if stats is None:
        return "n/a"
    mean, std = stats
    return f"{mean:.3g}" if std is None else f"{mean:.3g} ± {std:.2g}"


def _add_reported(line: Dict[str, Any], key: tuple, header: str) -> None:
    """Put the published value for ``key`` (table, dataset, row, column) under ``header``, if one is known."""
    value = REPORTED.get(key)
    if value is not None:
        line[header] = f"{value:g}"


def by_row(records: List[Dict], dataset: str):
    """``(row, its records)`` for each row of ``ROWS`` (in order) that has records for ``dataset``."""
    for row in ROWS:
        mine = [r for r in records if r["row"] == row and r["dataset"] == dataset]
        if mine:
            yield row, mine


def game_table(records: List[Dict], dataset: str):
    import pandas as pd
    columns = [("clean", "attack_clean_inf"), ("FGSM", "attack_fgsm_inf"), ("PGD-100", "attack_pgd_inf"),
               ("C&W", "attack_cw_inf"), ("AutoAttack (L2)", "attack_autoattack_2")]
    out = []
    for row, mine in by_row(records, dataset):
        line = {"row": row, "seeds": len(mine)}
        for name, key in columns:
            line[f"{name} (%)"] = _mean_std([r.get(key) for r in mine], 100)
            _add_reported(line, ("game", dataset, row, name), f"{name}, reported by others")
        out.append(line)
    return pd.DataFrame(out)


def certified_table(records: List[Dict], dataset: str, out_folder: Path):
    import pandas as pd
    out = []
    for row, mine in by_row(records, dataset):
        line = {"row": row, "seeds": len(mine)}
        for norm, label in (("inf", "L-inf"), ("2", "L2")):
            for method in ("ibp", "crown-ibp", "crown"):
                stats = [r[f"radius_{norm}"].get(method) for r in mine]
                if all(s is None for s in stats):
                    line[f"{label} {method} mean / median"] = "n/a"
                    continue
                line[f"{label} {method} mean / median"] = (
                    f"{_mean_std_sci([s['mean'] for s in stats if s])} / {_mean_std_sci([s['median'] for s in stats if s])}")
            upper = [r[f"radius_{norm}"].get(next(k for k in r[f"radius_{norm}"] if k.endswith("(upper)")))
                     for r in mine]
            line[f"{label} PGD radius (upper) mean"] = _mean_std_sci([u["mean"] for u in upper])
            line[f"{label} verified acc. % at eps {mine[0][f'verify_eps_{norm}']:g} (best method)"] = _mean_std(
                [_verified_at(r, norm, out_folder) for r in mine], 100)
            crown_eps = [r.get(f"crown_eps_{norm}") for r in mine if r.get(f"crown_csv_{norm}")]
            if crown_eps:
                line[f"{label} CROWN verified acc. % at eps {crown_eps[0]:g}"] = _mean_std(
                    [_crown_verified_at(r, norm, out_folder) for r in mine if r.get(f"crown_csv_{norm}")], 100)
        _add_reported(line, ("certified", dataset, row, "L2 mean"), "L2 mean, reported by others")
        out.append(line)
    return pd.DataFrame(out)


def _verified_at(record: Dict, norm: str, out: Path) -> float:
    """Fraction of samples whose certified radius (best of the methods) reaches the table's eps."""
    import pandas as pd
    rows = pd.concat([pd.read_csv(out / record[key]) for key in (f"radius_csv_{norm}", f"crown_csv_{norm}")
                      if record.get(key)])  # CROWN's samples are a subset: the best sound radius per sample
    rows = rows[(rows["mode"] == "radius") & (rows["method"].isin(["ibp", "crown-ibp", "crown"]))]
    best = rows.groupby("index")["radius"].max()
    return float((best >= record[f"verify_eps_{norm}"]).mean())


def _crown_verified_at(record: Dict, norm: str, out: Path) -> float:
    """Fraction of the CROWN samples whose CROWN radius reaches the CROWN column's eps."""
    import pandas as pd
    rows = pd.read_csv(out / record[f"crown_csv_{norm}"])
    rows = rows[(rows["mode"] == "radius") & (rows["method"] == "crown")]
    return float((rows["radius"] >= record[f"crown_eps_{norm}"]).mean())


def cost_table(records: List[Dict], dataset: str):
    import pandas as pd
    seconds = {row: [r["search_seconds"] for r in mine]
               for row, mine in by_row([r for r in records if r["search_seconds"]], dataset)}
    base = sum(seconds["DARTS"]) / len(seconds["DARTS"]) if "DARTS" in seconds else None
    out = []
    for row, mine in seconds.items():
        line = {"row": row, "seeds": len(mine), "search seconds": _mean_std(mine, digits=1),
                "ratio to DARTS": f"{(sum(mine) / len(mine)) / base:.2f}" if base else "n/a"}
        _add_reported(line, ("cost", dataset, row, "GPU-days"), "GPU-days (1080Ti), reported by others")
        out.append(line)
    return pd.DataFrame(out)


def clean_table(records: List[Dict], dataset: str):
    import pandas as pd
    out = []
    for row, mine in by_row(records, dataset):
        line = {"row": row, "seeds": len(mine), "clean acc. (%), full test split": _mean_std([r["train_test_acc"] for r in mine], 100)}
        _add_reported(line, ("game", dataset, row, "clean"), "clean, reported by others")
        out.append(line)
    return pd.DataFrame(out)


def imagenet_table(records: List[Dict], scale: Scale):
    import pandas as pd
    out = []
    eps = f"{scale.imagenet['eps']:.4g}"
    for row, mine in by_row(records, "imagenet"):
        out.append({"row": row, "seeds": len(mine),
                    "top-1 (%)": _mean_std([r["train_test_acc"] for r in mine], 100),
                    "top-5 (%)": _mean_std([r["train_test_top5_acc"] for r in mine], 100),
                    f"FGSM (%) at {eps}": _mean_std([r.get("attack_fgsm_inf") for r in mine], 100),
                    f"PGD-{scale.attack_steps} (%) at {eps}": _mean_std([r.get("attack_pgd_inf") for r in mine], 100)})
    return pd.DataFrame(out)


def markdown(frame) -> str:
    """A pipe table (pandas' to_markdown needs the optional tabulate package)."""
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def write_table(frame, out: Path, name: str, title: str, note: str) -> None:
    frame = frame.fillna("")  # rows without a reported value
    atomic_write_text(out / f"{name}.csv", frame.to_csv(index=False))
    atomic_write_text(out / f"{name}.md", f"# {title}\n\n{note}\n\n{markdown(frame)}\n")


def write_skipped(out: Path, name: str, title: str, reason: str) -> None:
    atomic_write_text(out / f"{name}.md", f"# {title}\n\nSkipped: {reason}\n")
    atomic_write_text(out / f"{name}.csv", f"skipped\n\"{reason}\"\n")
