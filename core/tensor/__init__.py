"""Tensor parallelism: modes (strategies) and the layers that use them."""

from core.tensor.layers import (Dropout, Embedding, LayerNorm, Linear, PositionEmbedding, RMSNorm, TPLayer,
                                cross_entropy, load_serial_state_dict, serial_state_dict)
from core.tensor.modes import COLUMN, ROW, ParamKind, TPMode, batch_parts, make_mode, tp_grid
from core.tensor.one_d import OneD

__all__ = ["COLUMN", "ROW", "Dropout", "Embedding", "LayerNorm", "Linear", "OneD", "ParamKind", "PositionEmbedding",
           "RMSNorm", "TPLayer", "TPMode", "batch_parts", "cross_entropy", "load_serial_state_dict", "make_mode",
           "tp_grid", "serial_state_dict"]
