"""The verification form of an eval-mode network: batch norm folded into the convolution or linear layer
before it.

An eval-mode batch norm is a fixed per-channel affine map, so ``BN(conv(x))`` is one convolution with
weights ``s * W`` and bias ``s * (b - mean) + beta`` (``s = gamma / sqrt(var + eps)``). Every bound
method gives the same bounds on both forms (IBP's radius ``|s| |W| r`` equals ``|s W| r``; CROWN is exact
on affine maps); the folded graph has fewer nodes to bound. Folded: a ``Conv2d`` or ``Linear`` followed
directly by a ``BatchNorm2d`` / ``BatchNorm1d`` inside an ``nn.Sequential`` (how DARTS operations, stems
and most CNNs are written). Anything else is left as it is.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

_PAIRS = ((nn.Conv2d, nn.BatchNorm2d), (nn.Linear, nn.BatchNorm1d))


def _fold(layer: nn.Module, norm: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    with torch.no_grad():
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps) if norm.affine else \
            1.0 / torch.sqrt(norm.running_var + norm.eps)
        shift = norm.bias if norm.affine else torch.zeros_like(norm.running_mean)
        bias = layer.bias if layer.bias is not None else torch.zeros_like(norm.running_mean)
        folded = copy.deepcopy(layer)
        if folded.bias is None:
            folded.bias = nn.Parameter(torch.zeros_like(norm.running_mean))
        view = (-1,) + (1,) * (layer.weight.dim() - 1)
        folded.weight.copy_(layer.weight * scale.view(view))
        folded.bias.copy_(scale * (bias - norm.running_mean) + shift)
    return folded


def _foldable(layer: nn.Module, norm: nn.Module) -> bool:
    return any(isinstance(layer, a) and type(norm) is b for a, b in _PAIRS) and norm.track_running_stats \
        and norm.running_var is not None and layer.weight.shape[0] == norm.num_features


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode, parameters not shared, no gradients) with every Conv2d / Linear +
    BatchNorm pair of an ``nn.Sequential`` folded into one layer; the batch norm becomes ``nn.Identity``."""
    folded = copy.deepcopy(model).eval()
    count = 0
    for module in folded.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            layer, norm = module._modules[first], module._modules[second]
            if _foldable(layer, norm):
                module._modules[first] = _fold(layer, norm)
                module._modules[second] = nn.Identity()
                count += 1
    for parameter in folded.parameters():
        parameter.requires_grad_(False)
    folded.folded_batch_norms = count
    return folded
