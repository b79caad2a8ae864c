"""Tensor parallelism: modes (strategies) and the layers that use them."""

from core.tensor.layers import (Embedding, Linear, cross_entropy, grad_norm_sq, load_serial_state_dict,
                                serial_state_dict)
from core.tensor.modes import COLUMN, ROW, OneD, TPMode, make_mode

__all__ = ["COLUMN", "ROW", "Embedding", "Linear", "OneD", "TPMode", "cross_entropy", "grad_norm_sq",
           "load_serial_state_dict", "make_mode", "serial_state_dict"]
