"""Small networks of certnas' own operations built for the tests (random weights, eval-mode batch norm with
random statistics): the networks of tests/verifiers/nets.py with certnas' OPS and MixedOp inside."""
from __future__ import annotations

import torch.nn as nn

from certnas.space.ops import OPS, PRIMITIVES
from certnas.space.supernet import MixedOp
from tests.verifiers import nets as library_nets
from tests.verifiers.nets import randomise_batch_norm  # noqa: F401 (one definition, shared)


class OpNet(library_nets.OpNet):
    """stem conv + BN, one certnas operation (or certnas' mixed operation), ReLU, global pooling, linear."""

    @staticmethod
    def operation(op: str, channels: int, stride: int) -> nn.Module:
        return OPS[op](channels, stride, True)

    @staticmethod
    def mixed_operation(channels: int, stride: int):
        return MixedOp(channels, stride, PRIMITIVES, affine=True), len(PRIMITIVES)


def op_net(op: str, stride: int, seed: int = 0, **kwargs) -> OpNet:
    return library_nets.op_net(op, stride, seed, network=OpNet, **kwargs)
