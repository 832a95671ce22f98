"""The search space: operations, mixed operation, (later) cells, genotypes and networks."""
from certnas.space.ops import OPS, PRIMITIVES
from certnas.space.supernet import MixedOp

__all__ = ["OPS", "PRIMITIVES", "MixedOp"]
