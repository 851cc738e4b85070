"""Linear probing: a BatchNorm + linear head trained on a frozen, pre-trained ViT.

  # demo: the embedded digits; random-init baseline, then the encoder of a demo MAE (python main_pretrain.py)
  python main_linprobe.py --output_dir ./output_linprobe_random
  python main_linprobe.py --finetune ./output_dir/checkpoint-last.pth --output_dir ./output_linprobe
  # MAE-Lite ViT-Tiny on ImageNet-1k, official recipe: LARS, 90 epochs, effective batch 16384 = 512 x 4 accum x 8 GPUs
  torchrun --nproc_per_node 8 main_linprobe.py --model vit_tiny_patch16 --finetune mae_tiny_400e.pth \
      --batch_size 512 --accum_iter 4 --data_path /data/imagenet
  # MAE-priv's probe (mean of the patch tokens), a SimMIM-style probe of block 8, plain SGD instead of LARS
  ... --feature avg        ... --probe_layer 7        ... --optimizer sgd
  # evaluate a trained probe (the checkpoint holds encoder and head)
  ... --eval --resume ./output_linprobe/checkpoint-last.pth

Only the head trains: BatchNorm1d(D, affine=False) -> Linear. The encoder is frozen and stays in eval mode even in
the training loop, so its dropout/drop-path are off and its features are those of inference. Train images get
RandomResizedCrop (scale 0.08-1, bicubic) + flip as in the official probe (milder on the demo digits, see
DEMO_DEFAULTS); val images the centre crop.

References:
  MAE     - He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022 (the probe: BN without affine
            before the linear head, LARS at batch 16384, blr 0.1, 90 epochs, cls-token feature).
  MoCo-v3 - Chen et al., ICCV 2021 (LARS form; the BN-before-linear probe).
  MAE-priv - average-pooled probe; SimMIM - Xie et al., CVPR 2022 (intermediate-layer probe).
"""
import argparse
import logging
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import trunc_normal_
from torchvision import transforms

from util import dist
from util.args import channel_parser, common_parser, fill_defaults, resolve_lr
from util.checkpoint import load_file, resume, resume_path
from util.data import (SafeImageFolder, build_loader, channel_stats, dataset_root, eval_transform, num_classes,
                       to_tensor_steps)
from util.engine import end_epoch, end_training, make_scaler, train_one_epoch
from util.evaluate import evaluate
from util.features import (build_frozen_encoder, check_feature, check_probe_args, checkpoint_layout,
                           extract_features, read_state_dict)
from util.lars import LARS
from util.logger import make_tb_writer, setup_logging
from util.rng import seed_everything

log = logging.getLogger('mim')

DEFAULTS = dict(model='vit_tiny_patch16', input_size=224, batch_size=512, epochs=90, warmup_epochs=10, blr=0.1,
                weight_decay=0.0, min_crop_scale=0.08, hflip=True)
# Demo: LARS steps are relative to each weight's norm (about lr * 0.001 * ||w|| per step, times ~10 from momentum),
# so what a probe needs is enough lr x steps, not an lr per image. The official run makes ~7,000 steps at lr 6.4;
# the demo's 220 (10 epochs of 22) need lr 25 = blr 100 at batch 64. Digits are not mirror-symmetric and 8 % crops of
# a 32-px digit leave little to recognise, so the demo crops milder and does not flip. At this lr the head's bias
# (1-D, so plain momentum SGD under LARS) overshoots at first: the train loss peaks near 20 in epoch 1, then falls.
DEMO_DEFAULTS = dict(model='vit_demo_patch4', input_size=32, batch_size=64, epochs=10, warmup_epochs=1, blr=100.0,
                     min_crop_scale=0.35, hflip=False)


def get_args_parser():
    p = argparse.ArgumentParser('Linear probe', parents=[common_parser(), channel_parser()])
    g = p.add_argument_group('linear probe')
    g.add_argument('--model', default=None,
                   help=f'ViT factory in models_vit.py (default {DEFAULTS["model"]}; {DEMO_DEFAULTS["model"]} on '
                        'the demo data), or a Swin in models_swin.py (swin_tiny, swin_demo) or a PVT in models_pvt.py '
                        '(pvt_small, pvt_demo), both with --feature avg')
    g.add_argument('--finetune', default='',
                   help='pre-trained weights to probe (an MAE checkpoint of main_pretrain, any released layout; '
                        'decoder keys are dropped). Empty = random initialisation, a baseline')
    g.add_argument('--feature', default='token', choices=['token', 'avg'],
                   help="'token': cls token after the final norm (official MAE probe); 'avg': mean of the patch "
                        'tokens after the final norm (MAE-priv). Warned about when it does not match the weights')
    g.add_argument('--probe_layer', type=int, default=None,
                   help='probe the output of this block (0-based; then the final norm) instead of the last '
                        '(SimMIM probes block 8 of 12: --probe_layer 7)')
    g.add_argument('--optimizer', default='lars', choices=['lars', 'sgd'],
                   help='lars (official MAE, for its batch of 16384) or sgd with momentum 0.9 (smaller batches)')
    g.add_argument('--min_crop_scale', type=float, default=None,
                   help='RandomResizedCrop scale lower bound (official probe 0.08; 0.35 on the demo digits)')
    g.add_argument('--hflip', action=argparse.BooleanOptionalAction, default=None,
                   help='random horizontal flip (official probe: on; demo: off, digits are not mirror-symmetric)')
    g.add_argument('--nb_classes', type=int, default=None,
                   help='outputs of the head (default: the number of class folders)')
    g.add_argument('--eval', action='store_true', help='only evaluate (a probe checkpoint via --resume)')
    return p


def train_transform(input_size, min_scale=0.08, hflip=True, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                    in_chans=3):
    """The official MAE probe's augmentation: RandomResizedCrop(scale=(min_scale, 1), bicubic) + flip (on PIL
    images, or on the tensors of .npy inputs)."""
    t = [transforms.RandomResizedCrop(input_size, scale=(min_scale, 1.0),
                                      interpolation=transforms.InterpolationMode.BICUBIC)]
    if hflip:
        t.append(transforms.RandomHorizontalFlip())
    return transforms.Compose(t + to_tensor_steps(in_chans) + [transforms.Normalize(mean, std)])


class LinearProbe(nn.Module):
    """Frozen ViT -> feature [N, D] -> BatchNorm1d(D, affine=False, eps=1e-6) -> Linear(D, num_classes).

    State-dict keys: `encoder.*` (the ViT's own names) and `head.0.*` (BN statistics), `head.1.*` (the linear)."""

    def __init__(self, encoder, num_classes, feature='token', layer=None):
        super().__init__()
        check_probe_args(encoder, feature, layer)
        self.encoder = encoder.requires_grad_(False)
        self.feature, self.layer = feature, layer
        # BN without affine whitens the features, so one lr suits encoders of any feature scale (MoCo-v3, MAE)
        self.head = nn.Sequential(nn.BatchNorm1d(encoder.embed_dim, affine=False, eps=1e-6),
                                  nn.Linear(encoder.embed_dim, num_classes))
        trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    def train(self, mode=True):
        # train_one_epoch calls model.train(True): only the head may follow it, the encoder stays in eval mode
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, x):
        return self.head(extract_features(self.encoder, x, self.feature, self.layer))  # [N, num_classes]


def encoder_layout(args, state):
    """How the encoder is laid out (util.features.checkpoint_layout): from --finetune; when resuming or evaluating
    without it, only whether the probe checkpoint's encoder has a GAP-trained fc_norm instead of a final norm."""
    if state is not None:
        return checkpoint_layout(state)
    path = resume_path(args)
    if path and 'encoder.fc_norm.weight' in load_file(path).get('model', {}):
        return 'avg'
    return None


def main(args):
    dist.init_distributed_mode(args)
    setup_logging(args.rank, args.output_dir)
    fill_defaults(args, DEFAULTS, DEMO_DEFAULTS)
    seed_everything(args.seed + args.rank)

    mean, std = channel_stats(args.in_chans, args.mean, args.std)
    train_set = SafeImageFolder(dataset_root(args.data_path, 'train'), train_transform(
        args.input_size, args.min_crop_scale, args.hflip, mean, std, args.in_chans), in_chans=args.in_chans)
    val_set = SafeImageFolder(dataset_root(args.data_path, 'val'),
                              eval_transform(args.input_size, mean=mean, std=std, in_chans=args.in_chans),
                              in_chans=args.in_chans)
    args.nb_classes = num_classes(train_set, val_set, args.nb_classes)
    train_loader = build_loader(train_set, args.batch_size, args.num_workers, args.pin_mem, train=True,
                                seed=args.seed)
    val_loader = build_loader(val_set, args.batch_size, args.num_workers, args.pin_mem, train=False)
    if len(train_loader) == 0 and not args.eval:
        raise ValueError(f'{train_set.root} has {len(train_set)} images: fewer than one batch of {args.batch_size} '
                         f'per process ({args.world_size} processes); lower --batch_size')

    state = read_state_dict(args.finetune) if args.finetune else None
    layout = encoder_layout(args, state)
    encoder = build_frozen_encoder(args.model, args.input_size, state, layout, args.in_chans)
    if args.finetune or not resume_path(args):
        check_feature(layout if args.finetune else None, args.feature, args.finetune)
    model = LinearProbe(encoder, args.nb_classes, args.feature, args.probe_layer).to(args.device)
    model_without_ddp = model
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model = dist.wrap_model(model, args)

    resolve_lr(args)
    head_params = list(model_without_ddp.head.parameters())
    if args.optimizer == 'lars':
        optimizer = LARS(head_params, lr=args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.SGD(head_params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    scaler = make_scaler(args)
    start_epoch = resume(args, model_without_ddp, optimizer, scaler)

    n_frozen = sum(p.numel() for p in encoder.parameters())
    log.info(f'{args.model} ({n_frozen / 1e6:.2f}M frozen) + head ({n_parameters} trainable parameters), '
             f'feature {args.feature!r} of block {args.probe_layer if args.probe_layer is not None else "last"}; '
             f'{args.nb_classes} classes; train {len(train_set)} / val {len(val_set)} images; train crops scale '
             f'({args.min_crop_scale}, 1){" + flip" if args.hflip else ", no flip"}')
    log.info(f'{args.optimizer}: blr {args.blr:.3g}  lr {args.lr:.3g}  effective batch {args.eff_batch_size} '
             f'({args.batch_size} x {args.accum_iter} accum x {args.world_size} processes)')
    log.info('args: ' + ', '.join(f'{k}={v}' for k, v in sorted(vars(args).items())))

    if args.eval:
        if not resume_path(args):
            log.warning('--eval without --resume: the head is untrained')
        test_stats = evaluate(model, val_loader, args)
        dist.cleanup()
        return test_stats

    log_writer = make_tb_writer(args.log_dir)

    def step(model, images, targets):
        logits = model(images)
        acc1 = (logits.argmax(dim=1) == targets).float().mean() * 100
        return F.cross_entropy(logits, targets), {'acc1': acc1}

    test_stats, start = None, time.time()
    for epoch in range(start_epoch, args.epochs):
        train_loader.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(model, step, train_loader, optimizer, epoch, args, scaler,
                                      log_writer=log_writer)
        test_stats = evaluate(model, val_loader, args)
        log.info(f'epoch {epoch}: val top-1 {test_stats["acc1"]:.2f}%  top-5 {test_stats["acc5"]:.2f}%')
        end_epoch(args, epoch, model, optimizer, scaler, n_parameters, train_stats, test_stats, log_writer)
    if test_stats is None:  # resumed a finished run: report the checkpoint's accuracy
        log.info(f'nothing to do: training already finished {args.epochs} epochs')
        test_stats = evaluate(model, val_loader, args)
    log.info(f'final val top-1 {test_stats["acc1"]:.2f}%  top-5 {test_stats["acc5"]:.2f}%')
    end_training(start, log_writer)
    return test_stats


if __name__ == '__main__':
    args = get_args_parser().parse_args()
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    main(args)
