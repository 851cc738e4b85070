"""Train (and evaluate) a semantic segmentor on ADE20K with mmsegmentation and this repo's backbones.

  # demo: UperNet on a small ViT, the embedded digits set (written on first use), CPU, a few minutes
  python seg/train.py
  # ... starting from the demo MAE of main_pretrain.py (128-d, 6 blocks, patch 4: the demo ViT with patch 4)
  python main_pretrain.py --output_dir /tmp/demo_mae
  python seg/train.py --pretrained /tmp/demo_mae/checkpoint-last.pth --cfg_options model.backbone.patch_size=4
  # ADE20K, ViT-Tiny UperNet (TinyMIM / UM-MAE recipe), 8 GPUs x 2 images = batch 16, 160k iterations
  torchrun --nproc_per_node 8 seg/train.py seg/configs/upernet_vit_tiny_ade20k_512_160k.py --launcher pytorch \
      --pretrained mae_tiny_400e.pth --data_root data/ade/ADEChallengeData2016 --output_dir out/seg_upernet_t
  # ADE20K, ViT-Tiny Semantic-FPN (MAE-Lite recipe, 48-channel pyramid); with RPE: add
  #   --cfg_options model.backbone.rel_pos_bias=True
  torchrun --nproc_per_node 8 seg/train.py seg/configs/fpn_vit_tiny_ade20k_512_160k.py --launcher pytorch \
      --pretrained d2mae_tiny_400e.pth --data_root data/ade/ADEChallengeData2016 --output_dir out/seg_fpn_t

The config is an mmengine python config (seg/configs/); any of its values can be overridden with --cfg_options
(e.g. `train_cfg.max_iters=1000 optim_wrapper.paramwise_cfg.layer_decay_rate=0.8`). Rerunning the same command
continues from the output folder's last checkpoint (saved every `default_hooks.checkpoint.interval` iterations;
--no-resume starts afresh). Evaluation (mIoU, mAcc, aAcc) runs every `val_interval`
iterations and at the end; seg/test.py evaluates a saved segmentor.

References: mmsegmentation 1.x tools/train.py (mmengine Runner usage); MAE-Lite / TinyMIM ADE20K recipes.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root, for `python seg/…`

import argparse  # noqa: E402
import logging  # noqa: E402

import torch  # noqa: E402

import seg  # noqa: E402,F401  (registers the mmcv.ops stand-in before mmseg is imported)
from seg import demo_data  # noqa: E402
from seg.mmengine_compat import checkpoint_globals  # noqa: E402

from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_CONFIG = os.path.join(HERE, 'configs', 'demo_upernet_vit_digits.py')
log = logging.getLogger(__name__)


def get_args_parser():
    p = argparse.ArgumentParser('seg/train.py: semantic segmentation with mmsegmentation', add_help=True)
    p.add_argument('config', nargs='?', default=DEMO_CONFIG,
                   help='mmengine config (seg/configs/...); default: the demo on the embedded digits')
    p.add_argument('--pretrained', default='',
                   help='pre-trained backbone weights (ours, MAE, MAE-Lite, TinyMIM, timm ...), read by the shared '
                        'loader util/pretrained.py: prefixes stripped, decoder/teacher keys dropped, pos-embed '
                        'interpolated to the crop grid, key report logged')
    p.add_argument('--data_root', default='',
                   help='ADE20K-layout folder (images/ and annotations/ with training/ and validation/); default: '
                        "the config's (the demo config's empty one means the digits set, written on first use)")
    p.add_argument('--output_dir', default='',
                   help='mmengine work_dir: logs, checkpoints, metrics (default: output_dir/seg/<config name>)')
    p.add_argument('--resume', action=argparse.BooleanOptionalAction, default=True,
                   help="continue from output_dir's last checkpoint if there is one (the default: rerunning the same "
                        'command after a kill resumes); --no-resume starts afresh')
    p.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision (the ADE20K configs' AmpOptimWrapper); default: on with CUDA, off on CPU, "
                        'where mmengine cannot autocast')
    p.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none',
                   help="'pytorch' under torchrun (one process per GPU), 'slurm' under srun, 'none' for one process")
    p.add_argument('--cfg_options', '--cfg-options', nargs='+', action=DictAction, default=None,
                   help='override config values, key=value with dotted keys, e.g. train_cfg.max_iters=2000')
    p.add_argument('--local_rank', '--local-rank', type=int, default=0, help=argparse.SUPPRESS)  # old launchers
    return p


def set_data_root(cfg, root):
    """Point the train/val/test datasets at `root`."""
    for name in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        if cfg.get(name) is not None:
            cfg[name].dataset.data_root = root


def build_config(args):
    """The config with the command line applied: output dir, data root (the demo set when empty), pre-trained
    weights, mixed precision, launcher; returns an mmengine Config."""
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = args.launcher
    name = os.path.splitext(os.path.basename(args.config))[0]
    cfg.work_dir = args.output_dir or os.path.join('output_dir', 'seg', name)
    if args.data_root:
        set_data_root(cfg, args.data_root)
    elif not cfg.train_dataloader.dataset.get('data_root'):
        set_data_root(cfg, demo_data.demo_root())
    if args.pretrained:
        cfg.model.backbone.pretrained = args.pretrained
    amp = torch.cuda.is_available() if args.amp is None else args.amp
    if amp and not torch.cuda.is_available():
        raise ValueError('--amp needs CUDA (mmengine\'s AmpOptimWrapper does not autocast on CPU)')
    cfg.optim_wrapper.type = 'AmpOptimWrapper' if amp else 'OptimWrapper'
    if not amp:
        cfg.optim_wrapper.pop('loss_scale', None)
    if args.launcher == 'none' or not torch.cuda.is_available():
        cfg.env_cfg.dist_cfg = dict(backend='gloo' if not torch.cuda.is_available() else 'nccl')
    cfg.resume = args.resume
    return cfg


def main(args):
    """Train, validating every `val_interval` iterations and at the end. Returns the last validation metrics
    ({'aAcc', 'mIoU', 'mAcc'} in %) and the Runner."""
    cfg = build_config(args)
    runner = Runner.from_cfg(cfg)
    with checkpoint_globals():  # --resume reads mmengine's own checkpoint (numpy metadata) with weights_only
        runner.train()
    metrics = {k[len('val/'):]: v.current() for k, v in runner.message_hub.log_scalars.items()
               if k.startswith('val/')}
    return metrics, runner


if __name__ == '__main__':
    main(get_args_parser().parse_args())
