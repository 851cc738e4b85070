"""Let mmsegmentation 1.2.2 import on modern torch with mmcv-lite 2.1.0 (no compiled ops).

mmcv-lite is mmcv without its compiled extension `mmcv._ext`, but it still ships the Python files of `mmcv.ops`,
whose `__init__` loads that extension and fails. A few mmseg modules import from `mmcv.ops` at module level
(`mmseg.utils.mask_classification`, `models.utils.point_sample`, `decode_heads.san_head`: `point_sample`;
`losses.focal_loss`: `sigmoid_focal_loss`; `decode_heads.cc_head` / `psa_head`: `CrissCrossAttention` / `PSAMask`),
so `import mmseg.models` fails before any of our code runs. `install()` puts a small stand-in module at
`sys.modules['mmcv.ops']` before mmseg is imported:
  - `point_sample` is real: bilinear `F.grid_sample` at points given in [0, 1] image coordinates (what mmcv's
    version computes; used by mask-classification heads and PointRend);
  - every other name mmseg imports is a stand-in that raises a clear error when it is called or instantiated
    (focal loss, criss-cross attention, PSA mask, deformable conv, SyncBN, ...). UperNet, FCN and Semantic-FPN,
    the heads this folder uses, never call them.
When the full mmcv (with `mmcv._ext`) is installed, `install()` does nothing and the real ops are used.

References: mmcv 2.x `mmcv.ops.point_sample` (PointRend, Kirillov et al., CVPR 2020) for the coordinate convention.
"""
import importlib.util
import sys
import types

import torch.nn.functional as F

HINT = ('needs the compiled mmcv ops, which mmcv-lite does not have. Build the full mmcv 2.1.0 from source '
        '(`MMCV_WITH_OPS=1 pip install --no-build-isolation mmcv==2.1.0`, see seg/README.md) or pick a head/loss '
        'that does not use it (UperNet, FCN, Semantic-FPN with cross-entropy do not).')
# names mmseg 1.2.2 / mmengine 0.10 import from mmcv.ops (at module level or in optional code paths)
MISSING = ('sigmoid_focal_loss', 'SigmoidFocalLoss', 'softmax_focal_loss', 'CrissCrossAttention', 'PSAMask',
           'DeformConv2d', 'ModulatedDeformConv2d', 'DeformConv2dPack', 'ModulatedDeformConv2dPack',
           'SyncBatchNorm', 'MultiScaleDeformableAttention', 'RoIAlign', 'roi_align', 'nms', 'batched_nms',
           'CARAFEPack', 'Correlation')


def point_sample(input, points, align_corners=False, **kwargs):
    """Bilinearly sample `input` at `points` given in [0, 1] x [0, 1] (x, y) image coordinates (mmcv's convention).

    Args:
        input: [N, C, H, W] feature map.
        points: [N, P, 2] or [N, Hg, Wg, 2] (x, y) in [0, 1].
        align_corners: as in `F.grid_sample`; kwargs go to `F.grid_sample` too (e.g. padding_mode).
    Returns: [N, C, P] for [N, P, 2] points, else [N, C, Hg, Wg].
    """
    add_dim = points.dim() == 3
    if add_dim:
        points = points.unsqueeze(2)  # [N, P, 1, 2]
    out = F.grid_sample(input, 2.0 * points - 1.0, align_corners=align_corners, **kwargs)  # [-1, 1] grid
    return out.squeeze(3) if add_dim else out  # [N, C, P] or [N, C, Hg, Wg]


def _missing(name):
    """A class whose construction (or call, for function names) raises a clear error naming `name`."""
    def fail(*args, **kwargs):
        raise RuntimeError(f'mmcv.ops.{name} {HINT}')
    # a class, not a function, so `isinstance(m, (DeformConv2d, ...))` checks in mmengine keep working (always False)
    return type(name, (), {'__new__': fail, '__call__': fail, '__doc__': f'Stand-in for mmcv.ops.{name}: raises.'})


def has_compiled_ops():
    """True when the full mmcv with its compiled extension is installed."""
    try:
        return importlib.util.find_spec('mmcv._ext') is not None
    except (ImportError, ValueError):
        return False


def install():
    """Register the stand-in `mmcv.ops` (idempotent; a no-op with the full mmcv). Call before importing mmseg.
    Returns True when the stand-in is in place, False when the real compiled ops are used."""
    import mmcv
    if has_compiled_ops():
        return False
    current = sys.modules.get('mmcv.ops')
    if current is not None and getattr(current, 'IS_STAND_IN', False):
        return True
    ops = types.ModuleType('mmcv.ops', __doc__)
    ops.IS_STAND_IN = True
    ops.point_sample = point_sample
    for name in MISSING:
        setattr(ops, name, _missing(name))
    # version queries of mmcv.utils.collect_env: informative, not compute, so they answer instead of raising
    ops.get_compiler_version = lambda: 'n/a (mmcv-lite, seg/mmcv_compat stand-in)'
    ops.get_compiling_cuda_version = lambda: 'n/a (mmcv-lite, seg/mmcv_compat stand-in)'
    sys.modules['mmcv.ops'] = ops
    mmcv.ops = ops
    return True

