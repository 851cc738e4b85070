"""COCO detection transfer: Mask R-CNN (torchvision) with a ViTDet backbone, evaluated with pycocotools.

  # demo: the COCO-format digits demo set, the demo ViT, a couple of minutes on a laptop CPU
  python det/train.py
  # MAE-Lite's ViT-T recipe (100 epochs, batch 64 = 8 GPUs x 8, LSJ at 640, lr 1e-4, layer decay 1.0)
  torchrun --nproc_per_node 8 det/train.py --data_path /data/coco --finetune mae_tiny_400e.pth.tar \
      --output_dir output_dir/det_vit_t
  # evaluate a trained detector
  python det/train.py --data_path /data/coco --eval --resume output_dir/det_vit_t/checkpoint-last.pth
  # Swin-T + FPN (det/backbone_swin.py) from a Swin / UM-MAE / SimMIM checkpoint; the demo Swin: --backbone swin_demo
  torchrun --nproc_per_node 8 det/train.py --data_path /data/coco --backbone swin_tiny --drop_path 0.2 \
      --finetune swin_tiny_patch4_window7_224.pth --output_dir output_dir/det_swin_t

--data_path is a COCO root (annotations/instances_{train2017,val2017}.json, train2017/, val2017/); any other
COCO-format set works through --train_ann/--train_images/--val_ann/--val_images.

References:
  ViTDet   - Li, Mao, Girshick, He, "Exploring Plain Vision Transformer Backbones for Object Detection", ECCV 2022
             (LSJ, AdamW, step decay at 24/27 and 26/27, 250 warmup iterations, wd 0 on pos-embed).
  MAE-Lite - Wang et al., ICML 2023 (ViT-T: 640 px, 100 epochs, batch 64, layer decay 1.0, drop path 0).
  Mask R-CNN - He et al., ICCV 2017; torchvision.models.detection is the implementation used.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root: `python det/train.py`

import argparse  # noqa: E402
import functools  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

import models_swin  # noqa: E402
from det.coco_eval import coco_evaluate  # noqa: E402
from det.data import CocoDetection, LargeScaleJitter, build_loader, demo_coco_root  # noqa: E402
from det.model import count_parameters, layer_id_det, mask_rcnn_vitdet  # noqa: E402
from util import dist  # noqa: E402
from util.args import common_parser, fill_defaults, resolve_lr  # noqa: E402
from util.checkpoint import load_file, resume, resume_path, unwrap_model  # noqa: E402
from util.engine import autocast, end_epoch, end_training, make_scaler, train_one_epoch  # noqa: E402
from util.logger import make_tb_writer, setup_logging, write_epoch_log  # noqa: E402
from util.lr_decay import param_groups_lrd  # noqa: E402
from util.pretrained import load_pretrained, unwrap_state_dict  # noqa: E402
from util.rng import seed_everything  # noqa: E402

log = logging.getLogger('mim')

# lr = blr * effective batch / 256: blr 4e-4 is ViTDet's 1e-4 at batch 64
DEFAULTS = dict(model='vit_tiny_patch16', input_size=640, pretrain_img_size=224, window_size=14, batch_size=8,
                epochs=100, blr=4e-4, weight_decay=0.05, warmup_iters=250, layer_decay=1.0, drop_path=0.0,
                fpn_dim=256, box_fc_dim=1024, anchor_sizes=[32, 64, 128, 256, 512], rois_per_image=512,
                rpn_post_nms_train=1000, rpn_post_nms_test=1000, min_scale=0.1, max_scale=2.0, eval_freq=10)
# the demo: 64 px canvases with 12-32 px digits, so smaller anchors, a narrower pyramid/heads and fewer RoIs (the
# heads' convolutions over every sampled RoI, not the ViT, dominate a CPU step at ViTDet's sizes)
DEMO_DEFAULTS = dict(model='vit_demo_patch4', input_size=64, pretrain_img_size=32, window_size=8, batch_size=8,
                     epochs=4, blr=4e-3, warmup_iters=20, fpn_dim=32, box_fc_dim=256,
                     anchor_sizes=[16, 32, 64, 128, 256], rois_per_image=32, rpn_post_nms_train=200,
                     rpn_post_nms_test=100, min_scale=0.5, max_scale=1.5, eval_freq=2)


def get_args_parser():
    p = argparse.ArgumentParser('Mask R-CNN with a ViTDet backbone on COCO', parents=[common_parser()])
    g = p.add_argument_group('backbone')
    g.add_argument('--model', '--backbone', dest='model', default=None,
                   help='ViT factory in models_vit.py (default vit_tiny_patch16; vit_demo_patch4 on the demo data) '
                        'for the ViTDet backbone, or Swin factory in models_swin.py (swin_tiny, swin_tiny_um, '
                        'swin_demo) for Swin + FPN')
    g.add_argument('--finetune', default='', help='pre-trained ViT weights for the backbone, any layout the shared '
                                                  'loader (util/pretrained.py) accepts: MAE/MAE-Lite/TinyMIM/MoCo-v3/'
                                                  'timm or our own checkpoints')
    g.add_argument('--pretrain_img_size', type=int, default=None,
                   help='image size the checkpoint\'s pos-embed grid was trained at (224; 32 for the demo ViT); it is '
                        'stored at that grid and bicubic-interpolated to each input\'s grid')
    g.add_argument('--window_size', type=int, default=None,
                   help='ViT window attention size in tokens (ViTDet: 14; 8 for the 16x16-token demo); 0 = all '
                        'global. A Swin keeps its factory\'s windows')
    g.add_argument('--global_blocks', type=int, nargs='*', default=None,
                   help='indices of the global-attention blocks (default: 4 evenly spaced, 2 5 8 11 for depth 12)')
    g.add_argument('--drop_path', type=float, default=None,
                   help='stochastic depth (MAE-Lite ViT-T 0.0; ViTDet-B 0.1; Swin-T Mask R-CNN 0.2)')
    g.add_argument('--act_checkpoint', action='store_true',
                   help='recompute block activations in backward (less memory, ~30%% slower; MAE-Lite uses it)')
    g = p.add_argument_group('detector')
    g.add_argument('--fpn_dim', type=int, default=None, help='channels of the pyramid and of the conv heads (256)')
    g.add_argument('--box_fc_dim', type=int, default=None, help='width of the box head\'s fc layer (1024)')
    g.add_argument('--anchor_sizes', type=int, nargs=5, default=None,
                   help='anchor size (px) on each of the 5 RPN levels, strides 4..64 (32 64 128 256 512)')
    g.add_argument('--rois_per_image', type=int, default=None, help='RoIs sampled per image for the heads (512)')
    g.add_argument('--rpn_post_nms_train', type=int, default=None,
                   help='proposals kept after NMS in training (1000, ViTDet; pre-NMS keeps twice as many)')
    g.add_argument('--rpn_post_nms_test', type=int, default=None, help='proposals kept at test time (1000)')
    g = p.add_argument_group('data and schedule')
    g.add_argument('--train_split', default='train2017', help='COCO split name under --data_path')
    g.add_argument('--val_split', default='val2017', help='COCO split name under --data_path')
    g.add_argument('--train_ann', default='', help='instances_*.json for training (overrides --data_path layout)')
    g.add_argument('--train_images', default='', help='image folder for --train_ann')
    g.add_argument('--val_ann', default='', help='instances_*.json for evaluation')
    g.add_argument('--val_images', default='', help='image folder for --val_ann')
    g.add_argument('--min_scale', type=float, default=None, help='large-scale jitter lower bound (0.1)')
    g.add_argument('--max_scale', type=float, default=None, help='large-scale jitter upper bound (2.0)')
    g.add_argument('--warmup_iters', type=int, default=None,
                   help='linear warmup iterations (ViTDet: 250); --warmup_epochs, if given, wins')
    g.add_argument('--layer_decay', type=float, default=None,
                   help='layer-wise lr decay over the ViT blocks (MAE-Lite ViT-T: 1.0 = none; ViTDet-B: 0.7)')
    g.add_argument('--eval_freq', type=int, default=None, help='COCO evaluation every this many epochs (and at the '
                                                               'end)')
    g.add_argument('--eval', action='store_true',
                   help='only evaluate the detector checkpoint given by --resume (or output_dir\'s last) and exit')
    return p


def split_paths(args, split):
    """(image folder, annotation file) of a split, from the explicit flags or the COCO layout of --data_path."""
    ann, images = (args.train_ann, args.train_images) if split == 'train' else (args.val_ann, args.val_images)
    if ann and images:
        return images, ann
    name = args.train_split if split == 'train' else args.val_split
    root = args.data_path or demo_coco_root()
    if not args.data_path:  # the demo set's splits are called train/ and val/
        name = split
    return (images or os.path.join(root, name)), (ann or os.path.join(root, 'annotations', f'instances_{name}.json'))


def build_model(args, num_classes):
    """Mask R-CNN + ViTDet backbone as the flags say; the ViT gets LayerScale when the --finetune checkpoint has it
    (older MAE-Lite checkpoints), so its gammas load instead of being dropped."""
    vit_kwargs = {}
    if args.finetune:
        keys = unwrap_state_dict(load_file(args.finetune))
        if any(k.endswith(('.ls1.gamma', '.gamma_1')) for k in keys):
            vit_kwargs['init_values'] = 1.0  # overwritten by the checkpoint's gammas
        if models_swin.has_model(args.model) and any(k.endswith('relative_position_bias_table') or '.rpe_mlp.' in k
                                                     for k in keys):  # the Swin's bias form is the checkpoint's
            vit_kwargs['rel_pos'] = 'mlp' if any('.rpe_mlp.' in k for k in keys) else 'table'
    return mask_rcnn_vitdet(
        num_classes, args.input_size, args.model, args.pretrain_img_size, args.window_size, args.global_blocks,
        args.drop_path, args.act_checkpoint, args.fpn_dim, args.box_fc_dim, tuple(args.anchor_sizes),
        args.rois_per_image, args.rpn_post_nms_train, args.rpn_post_nms_test, **vit_kwargs)


def step(model, images, targets):
    """Mask R-CNN returns its five losses in training mode; the objective is their sum."""
    losses = model(list(images), list(targets))
    return sum(losses.values()), {k: v.detach() for k, v in losses.items()}


def main(args):
    dist.init_distributed_mode(args)
    setup_logging(args.rank, args.output_dir)
    fill_defaults(args, DEFAULTS, DEMO_DEFAULTS)
    seed_everything(args.seed + args.rank)

    val_images, val_ann = split_paths(args, 'val')
    val_set = CocoDetection(val_images, val_ann, train=False)
    # evaluation is per image (sizes differ); the model pads each batch to one square
    val_loader = build_loader(val_set, args.batch_size, args.num_workers, train=False, pin_mem=args.pin_mem)
    num_classes = len(val_set.cat_ids)
    model = build_model(args, num_classes)
    if args.eval:
        return evaluate_checkpoint(model, val_loader, val_set, args)

    train_images, train_ann = split_paths(args, 'train')
    train_set = CocoDetection(train_images, train_ann, LargeScaleJitter(args.input_size, args.min_scale,
                                                                        args.max_scale), train=True)
    if train_set.cat_ids != val_set.cat_ids:
        raise ValueError(f'{train_ann} and {val_ann} have different categories: labels would not match')
    loader = build_loader(train_set, args.batch_size, args.num_workers, train=True, seed=args.seed,
                          pin_mem=args.pin_mem)
    if len(loader) == 0:
        raise ValueError(f'{train_ann}: {len(train_set)} usable images, fewer than one batch of {args.batch_size} '
                         f'per process ({args.world_size} processes); lower --batch_size')

    start_from = resume_path(args)
    if args.finetune and not start_from:
        load_pretrained(model.backbone.net, args.finetune)
    elif args.finetune:
        log.info(f'resuming from {start_from}: --finetune {args.finetune} is superseded')
    model.to(args.device)
    n_parameters = count_parameters(model)
    model_without_ddp = model
    model = dist.wrap_model(model, args)

    # the schedule runs per iteration in fractional epochs: warmup iterations and ViTDet's step decay at 24/27 and
    # 26/27 of training become epochs here
    if args.warmup_epochs is None:
        args.warmup_epochs = args.warmup_iters / len(loader)
    args.lr_milestones = [args.epochs * 24 / 27, args.epochs * 26 / 27]
    resolve_lr(args)
    net = model_without_ddp.backbone.net
    depths = getattr(net, 'depths', None)  # a Swin: stage-aware layer ids
    groups = param_groups_lrd(model_without_ddp, args.weight_decay, args.layer_decay,
                              no_weight_decay_list=net.no_weight_decay(),
                              layer_id_fn=functools.partial(layer_id_det, depths=depths),
                              num_layers=(sum(depths) if depths else len(net.blocks)) + 1)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, fused=str(args.device).startswith('cuda'))
    scaler = make_scaler(args)
    start_epoch = resume(args, model_without_ddp, optimizer, scaler)

    log.info(f'Mask R-CNN, {args.model} backbone: {n_parameters / 1e6:.2f}M trainable parameters; '
             f'{len(train_set)} train / {len(val_set)} val images, {num_classes} classes {val_set.class_names[:10]}')
    log.info(f'blr {args.blr:.3g}  lr {args.lr:.3g}  effective batch {args.eff_batch_size} ({args.batch_size} x '
             f'{args.accum_iter} accum x {args.world_size} processes)  warmup {args.warmup_epochs:.3g} epochs  '
             f'lr x0.1 at epochs {args.lr_milestones[0]:.4g} and {args.lr_milestones[1]:.4g}')
    log.info('args: ' + ', '.join(f'{k}={v}' for k, v in sorted(vars(args).items())))
    log_writer = make_tb_writer(args.log_dir)

    metrics = {}
    if start_epoch >= args.epochs:
        log.info(f'nothing to do: training already finished {args.epochs} epochs')
    start = time.time()
    for epoch in range(start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        stats = train_one_epoch(model, step, loader, optimizer, epoch, args, scaler, log_writer=log_writer)
        test_stats = None
        if (epoch + 1) % args.eval_freq == 0 or epoch + 1 == args.epochs:
            metrics = test_stats = coco_evaluate(model_without_ddp, val_loader, val_set, args.device,
                                                 lambda: autocast(args), args.output_dir)
            log.info(f'epoch {epoch}: ' + '  '.join(f'{k} {v:.2f}' for k, v in metrics.items()))
        end_epoch(args, epoch, model, optimizer, scaler, n_parameters, stats, test_stats, log_writer)
    end_training(start, log_writer)
    return metrics


def evaluate_checkpoint(model, loader, dataset, args):
    """--eval: load a detector checkpoint of this script (strict) and write its COCO metrics."""
    path = resume_path(args)
    if not path:
        raise ValueError('--eval needs the detector checkpoint to evaluate: --resume CKPT')
    ckpt = load_file(path)
    unwrap_model(model).load_state_dict(ckpt.get('model', ckpt), strict=True)
    model.to(args.device)
    metrics = coco_evaluate(model, loader, dataset, args.device, lambda: autocast(args), args.output_dir)
    log.info(f'{path}: ' + '  '.join(f'{k} {v:.2f}' for k, v in metrics.items()))
    write_epoch_log(args.output_dir, {**{f'test_{k}': v for k, v in metrics.items()},
                                      'epoch': ckpt.get('epoch', -1), 'n_parameters': count_parameters(model)})
    dist.cleanup()
    return metrics


if __name__ == '__main__':
    args = get_args_parser().parse_args()
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    main(args)
