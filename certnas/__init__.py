"""certnas: differentiable search for certifiably robust neural architectures."""
__version__ = "0.1.0"
