"""Evaluate a trained segmentor (mIoU, mAcc, aAcc through mmseg's IoUMetric) on ADE20K or the demo set.

  # the demo segmentor that `python seg/train.py` trained
  python seg/test.py seg/configs/demo_upernet_vit_digits.py output_dir/seg/demo_upernet_vit_digits/iter_400.pth
  # ADE20K validation, 8 GPUs, slide inference (crop 512, stride 341) as configured
  torchrun --nproc_per_node 8 seg/test.py seg/configs/upernet_vit_tiny_ade20k_512_160k.py \
      out/seg_upernet_t/iter_160000.pth --launcher pytorch --data_root data/ade/ADEChallengeData2016

The checkpoint is one mmengine saved (seg/train.py's `iter_*.pth`) or any file with the segmentor's state dict
under `state_dict`. It is read with weights_only=True; seg/mmengine_compat.py allows the numpy/mmengine objects
that mmengine writes into its checkpoints' metadata.

References: mmsegmentation 1.x tools/test.py (mmengine Runner usage).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root, for `python seg/…`

import argparse  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402

import seg  # noqa: E402,F401  (registers the mmcv.ops stand-in before mmseg is imported)
from seg import demo_data  # noqa: E402
from seg.mmengine_compat import checkpoint_globals  # noqa: E402
from seg.train import set_data_root  # noqa: E402

from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.runner import Runner  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser('seg/test.py: evaluate a segmentor', add_help=True)
    p.add_argument('config', help='the mmengine config the segmentor was trained with')
    p.add_argument('checkpoint', help="segmentor weights: seg/train.py's iter_*.pth or a state dict file")
    p.add_argument('--data_root', default='',
                   help="ADE20K-layout folder; default: the config's (empty = the demo set, written on first use)")
    p.add_argument('--output_dir', default='', help='mmengine work_dir for the logs (default: a temporary folder)')
    p.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none',
                   help="'pytorch' under torchrun, 'slurm' under srun, 'none' for one process")
    p.add_argument('--cfg_options', '--cfg-options', nargs='+', action=DictAction, default=None,
                   help='override config values, key=value with dotted keys (e.g. model.test_cfg.mode=whole)')
    p.add_argument('--local_rank', '--local-rank', type=int, default=0, help=argparse.SUPPRESS)
    return p


def main(args):
    """Evaluate; returns ({'aAcc', 'mIoU', 'mAcc'} in %, the Runner)."""
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = args.launcher
    cfg.work_dir = args.output_dir or tempfile.mkdtemp(prefix='seg_test_')
    if args.data_root:
        set_data_root(cfg, args.data_root)
    elif not cfg.test_dataloader.dataset.get('data_root'):
        set_data_root(cfg, demo_data.demo_root())
    cfg.model.backbone.pretrained = None  # the segmentor's own weights follow
    if not torch.cuda.is_available():
        cfg.env_cfg.dist_cfg = dict(backend='gloo')
    cfg.load_from = args.checkpoint
    runner = Runner.from_cfg(cfg)
    with checkpoint_globals():
        metrics = runner.test()
    return metrics, runner


if __name__ == '__main__':
    main(get_args_parser().parse_args())
