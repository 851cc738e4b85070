"""ADE20K semantic segmentation on mmsegmentation with this repo's backbones (see seg/README.md).

Importing the package registers the stand-in `mmcv.ops` of seg/mmcv_compat.py first (a no-op when the full mmcv is
installed), so that mmseg imports with mmcv-lite whichever seg module (or a config's `custom_imports`) comes
first.
"""
from seg import mmcv_compat

mmcv_compat.install()
