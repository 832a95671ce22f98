"""How well a sampled Jacobian term stands in for the exact one: the architecture gradient of R
from M classes drawn per batch (``--jacobian-projections M``) against the exact term's (all K
classes), on the default search supernet and one validation batch of the embedded digits.

    python -m benchmarks.jacobian_estimator [--draws 30] [--samples 8] [--device cpu]

Per estimator: mean and worst cosine of its architecture gradient with the exact one over the draws,
the cosine of the draws' mean, the value's relative bias and spread, and its time relative to the
exact term. ``per-sample`` (one class drawn for each sample) is the rejected alternative: with batch
norm in training mode the samples are coupled, so it estimates another quantity.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

from benchmarks.common import environment, print_table, write_json
from certnas.data import load_data
from certnas.metrics import input_gradient_norms
from certnas.search import SearchConfig, build_supernet


def _per_sample_norms(model: torch.nn.Module, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(B,) L1 norms of d f_{c_i}(x_i) / d x_i, one class c_i per sample, in one backward pass."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    grad, = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), x, create_graph=True)
    return grad.flatten(1).norm(p=1, dim=1)


def _arch_gradient(model, value: torch.Tensor) -> torch.Tensor:
    grads = torch.autograd.grad(value, model.arch_parameters(), allow_unused=True)
    return torch.cat([g.flatten() for g in grads if g is not None])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=30)
    parser.add_argument("--samples", type=int, default=SearchConfig.metric_samples)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "jacobian_estimator.json"))
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    config = SearchConfig()
    splits = load_data(config.data, seed=args.seed)
    x, y = zip(*(splits.val[i] for i in range(args.samples)))
    x = torch.stack(x).to(args.device)
    model = build_supernet(config, splits.info).to(args.device).train()
    num_classes = splits.info.num_classes

    def shared(m: int) -> Callable[[], torch.Tensor]:
        return lambda: input_gradient_norms(model, x, torch.randperm(num_classes)[:m], 1.0).mean()

    start = time.perf_counter()
    exact_value = input_gradient_norms(model, x, torch.arange(num_classes), 1.0).mean()
    exact = _arch_gradient(model, exact_value)
    exact_seconds = time.perf_counter() - start
    estimators: Dict[str, Callable[[], torch.Tensor]] = {
        "M=1 (default)": shared(1),
        "M=2": shared(2),
        "per-sample": lambda: _per_sample_norms(model, x, torch.randint(num_classes, (len(x),), device=x.device)).mean(),
    }
    rows: List[Dict] = []
    for name, estimate in estimators.items():
        cosines, values, total = [], [], torch.zeros_like(exact)
        start = time.perf_counter()
        for _ in range(args.draws):
            value = estimate()
            gradient = _arch_gradient(model, value)
            cosines.append(_cosine(gradient, exact))
            values.append(value.item())
            total += gradient
        seconds = (time.perf_counter() - start) / args.draws
        spread = torch.tensor(values)
        rows.append({"estimator": name, "cos_mean": sum(cosines) / len(cosines), "cos_min": min(cosines),
                     "cos_of_mean": _cosine(total, exact), "value_bias": float(spread.mean() / exact_value.item() - 1),
                     "value_rel_std": float(spread.std() / exact_value.item()), "time_ratio": seconds / exact_seconds})
    print(f"exact term: {exact_seconds:.3f} s, {args.samples} samples, {torch.get_num_threads()} threads")
    print_table(rows, [("estimator", "estimator", "s"), ("cos_mean", "cos mean", ".3f"), ("cos_min", "cos min", ".3f"),
                       ("cos_of_mean", f"cos of mean {args.draws}", ".3f"), ("value_bias", "value bias", "+.3f"),
                       ("value_rel_std", "value rel std", ".3f"), ("time_ratio", "x exact time", ".2f")])
    result = {"rows": rows, "exact_seconds": exact_seconds, "settings": vars(args), "environment": environment()}
    write_json(Path(args.out), result)
    return result


if __name__ == "__main__":
    main()
