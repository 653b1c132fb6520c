"""Drop-in replacements for torch.optim.SGD, Adam and AdamW with fused multi-tensor steps."""
from .. import lr_scheduler  # also here, as torch.optim.lr_scheduler is in torch.optim
from .adam import Adam, AdamW
from .base import FusedOptimizer
from .sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "FusedOptimizer", "lr_scheduler"]
