"""Drop-in replacements for torch.optim.SGD, Adam and AdamW with fused multi-tensor steps."""
from .adam import Adam, AdamW
from .base import FusedOptimizer
from .sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "FusedOptimizer"]
