"""Let mmengine 0.10 read back its own checkpoints on torch >= 2.6.

torch 2.6 made `torch.load(weights_only=True)` the default. mmengine 0.10's loader calls `torch.load` without the
argument, and the checkpoints its Runner writes (`iter_*.pth`) pickle numpy arrays, numpy dtypes/scalars and
mmengine's `HistoryBuffer` in their `meta` / `message_hub` entries, which the weights-only unpickler refuses —
so `--resume` and evaluating a saved segmentor fail. `checkpoint_globals()` allows exactly those globals for the
duration of a `with` block (still weights-only: nothing else can be constructed, and allowed names can be
looked up but not called unless allowed too — `getattr` is how numpy >= 2 pickles its dtype classes).
Pre-trained backbone weights never go through mmengine: the backbone reads them with util/pretrained.py.

References: torch.serialization.safe_globals (PyTorch >= 2.5 docs, "weights_only").
"""
import numpy as np
import torch
from mmengine.logging import HistoryBuffer


def allowed_globals():
    """numpy array/dtype/scalar reconstruction, the dtype classes, getattr, and mmengine's HistoryBuffer."""
    core = getattr(np, '_core', None) or np.core  # numpy >= 2 renamed np.core to np._core
    names = [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype, getattr, HistoryBuffer]
    names += [type(np.dtype(t)) for t in ('float64', 'float32', 'float16', 'int64', 'int32', 'int16', 'int8',
                                          'uint8', 'bool')]
    return names


def checkpoint_globals():
    """Context manager: torch.load(weights_only=True) accepts mmengine Runner checkpoints inside it."""
    return torch.serialization.safe_globals(allowed_globals())
