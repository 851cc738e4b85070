"""End-to-end fine-tuning of a (pre-trained) ViT for classification, and transfer to smaller datasets.

  # demo: the embedded digits data; first pre-train the demo MAE, then fine-tune it (a few minutes on a CPU)
  python main_pretrain.py --output_dir /tmp/demo_mae
  python main_finetune.py --finetune /tmp/demo_mae/checkpoint-last.pth --output_dir /tmp/demo_ft
  # MAE-Lite ViT-Tiny on ImageNet-1k, improved recipe (300 epochs), 8 GPUs (effective batch 1024 = 128 x 8)
  torchrun --nproc_per_node 8 main_finetune.py --model vit_tiny_patch16 --finetune mae_tiny_400e.pth \
      --data_path /data/imagenet --output_dir out/ft_tiny
  # ... with MAE-Lite's relative position bias (their RPE row: 1000 epochs, the default with --rpe)
  ... --rpe
  # official MAE ViT-B recipe (100 epochs, layer decay 0.65, mixup/cutmix, random erasing, label smoothing)
  torchrun --nproc_per_node 8 main_finetune.py --recipe fb --model vit_base_patch16 \
      --finetune mae_pretrain_vit_base.pth --data_path /data/imagenet --output_dir out/ft_base
  # MAE-Lite transfer (SGD, lr 0.1, 50 epochs, effective batch 512 = 64 x 8) to e.g. CIFAR-100
  torchrun --nproc_per_node 8 main_finetune.py --recipe transfer --dataset cifar100 --data_path /data/cifar \
      --model vit_tiny_patch16 --finetune mae_tiny_400e.pth --output_dir out/cifar100
  # UM-MAE Swin-T (window 16 at 256 px, position-MLP bias; 100 epochs, layer decay 0.85, drop path 0.1)
  torchrun --nproc_per_node 8 main_finetune.py --recipe um_swin --finetune out/um_swin/checkpoint-199.pth \
      --data_path /data/imagenet --output_dir out/ft_um_swin
  # the demo UM-MAE / SimMIM Swin (python main_pretrain.py --model mae_swin_demo --output_dir /tmp/demo_um)
  python main_finetune.py --model swin_demo --finetune /tmp/demo_um/checkpoint-last.pth --output_dir /tmp/demo_ft_um
  # UM-MAE PVT-S (sr ratios 8-4-2-1; the loader converts the pre-trained 4-2-1-1 sr convs), and the demo PVT
  torchrun --nproc_per_node 8 main_finetune.py --recipe um_swin --model pvt_small \
      --finetune out/um_pvt/checkpoint-199.pth --data_path /data/imagenet --output_dir out/ft_um_pvt
  python main_finetune.py --model pvt_demo --finetune /tmp/demo_um_pvt/checkpoint-last.pth --output_dir /tmp/demo_ft_pvt
  # Hiera-T from MAE-Hiera (main_pretrain.py --model mae_hiera_tiny), and the demo Hiera
  torchrun --nproc_per_node 8 main_finetune.py --model hiera_tiny --finetune out/mae_hiera/checkpoint-399.pth \
      --data_path /data/imagenet --output_dir out/ft_hiera
  python main_finetune.py --model hiera_demo --finetune /tmp/demo_hiera/checkpoint-last.pth --output_dir /tmp/ft_hiera
  # DeiT-style distillation from a fine-tuned classifier (a distillation token with its own head; hard targets)
  python main_finetune.py --finetune output_dir/demo_mae/checkpoint-last.pth --distillation_type hard \
      --teacher_model vit_demo_patch4 --teacher_path output_dir/demo_ft_teacher/checkpoint-best.pth
  torchrun --nproc_per_node 8 main_finetune.py --model vit_tiny_patch16 --finetune mae_tiny_400e.pth \
      --distillation_type hard --teacher_model regnety_160 --teacher_path regnety_160.pth --data_path /data/imagenet
  # evaluate a fine-tuned checkpoint
  python main_finetune.py --eval --resume out/ft_tiny/checkpoint-best.pth --model vit_tiny_patch16 \
      --data_path /data/imagenet

Every value of a --recipe can be overridden by its flag (e.g. `--recipe fb --mixup 0`). `--resume` continues an
interrupted fine-tune (rerunning the same command does it by itself); `--finetune` starts one from pre-trained
weights of any supported layout (util/pretrained.py).

References:
  MAE      - He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022 (fine-tuning recipe, GAP
             head with fc_norm, head init std 2e-5).
  BEiT     - Bao et al., ICLR 2022 (layer-wise lr decay, relative position bias).
  DeiT     - Touvron et al., ICML 2021 (RandAugment, mixup/cutmix, random erasing, EMA; through timm; distillation
             token and hard/soft teacher targets, as MAE-Lite's `finetuning_distill`).
  MAE-Lite - Wang et al., "A Closer Look at Self-Supervised Lightweight Vision Transformers", ICML 2023 (improved
             recipe for ViT-Tiny: layer decay 0.85, weak mixup, no erasing/smoothing/drop path; RPE; transfer recipe).
  Swin     - Liu et al., ICCV 2021 (fine-tuning recipe); UM-MAE - Li et al., 2022 (Swin-T at 256 px, window 16).
"""
import argparse
import copy
import logging
import math
import os
import time

import timm
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from timm.data import Mixup, RandAugment, RandomResizedCropAndInterpolation, create_transform
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torchvision import transforms

import models_hiera
import models_pvt
import models_swin
import models_vit
from util import dist
from util.args import channel_parser, common_parser, fill_defaults, require_rgb, resolve_lr
from util.checkpoint import load_file, resume, resume_path, unwrap_model
from util.data import build_loader, channel_stats, eval_transform, is_array_input
from util.datasets import DATASETS, build_dataset
from util.engine import end_epoch, end_training, make_scaler, train_one_epoch
from util.evaluate import evaluate
from util.logger import make_tb_writer, setup_logging
from util.lr_decay import param_groups_lrd
from util.optim import adamw
from util.pretrained import apply_block_heads, block_heads_of, load_pretrained, strip_prefixes, unwrap_state_dict
from util.rng import seed_everything

log = logging.getLogger('mim')

COMMON = dict(model='vit_tiny_patch16', input_size=224, crop_pct=224 / 256, min_crop_scale=0.08, hflip=0.5)
RECIPES = {
    # MAE-Lite's improved recipe for ViT-Tiny: weaker regularisation suits a small model (SPEC §4)
    'ml_improved': dict(epochs=300, batch_size=128, blr=1e-3, warmup_epochs=5, weight_decay=0.05, min_lr=1e-6,
                        layer_decay=0.85, drop_path=0.0, aa='rand-m10-mstd0.5-inc1', mixup=0.2, cutmix=0.0,
                        reprob=0.0, smoothing=0.0, opt='adamw'),
    # official MAE, ViT-B
    'fb': dict(epochs=100, batch_size=128, blr=5e-4, warmup_epochs=5, weight_decay=0.05, min_lr=1e-6,
               layer_decay=0.65, drop_path=0.1, aa='rand-m9-mstd0.5-inc1', mixup=0.8, cutmix=1.0, reprob=0.25,
               smoothing=0.1, opt='adamw'),
    # MAE-Lite transfer to small datasets: plain crops and flips, SGD with an absolute lr
    'transfer': dict(epochs=50, batch_size=64, lr=0.1, warmup_epochs=10, weight_decay=0.0, min_lr=0.0,
                     clip_grad=1.0, layer_decay=0.75, drop_path=0.0, aa='none', mixup=0.0, cutmix=0.0, reprob=0.0,
                     smoothing=0.0, opt='sgd'),
    # UM-MAE Swin-T: Swin's fine-tuning recipe at 256 px with window 16, layer decay 0.85 (stage-aware ids)
    'um_swin': dict(model='swin_tiny_patch4_window16_256', input_size=256, epochs=100, batch_size=128, blr=5e-4,
                    warmup_epochs=5, weight_decay=0.05, min_lr=1e-6, layer_decay=0.85, drop_path=0.1,
                    aa='rand-m9-mstd0.5-inc1', mixup=0.8, cutmix=1.0, reprob=0.25, smoothing=0.1, opt='adamw'),
}
# The embedded digits: a demo-sized ViT (the encoder of main_pretrain.py's demo MAE) and a one-minute run. It keeps the
# recipe's optimizer, layer decay and schedule but not its augmentation: RandAugment-m10 and mixup are tuned for 300
# ImageNet epochs, and in 5 epochs on 32 px digits they stop learning altogether (28% top-1 instead of 89% from the
# demo MAE); flips and 8% crops turn digits into other digits. A few hundred steps instead of ImageNet's 375k also
# want a higher blr (as main_pretrain's demo). crop_pct 1: the digits fill the frame.
DEMO_DEFAULTS = dict(model='vit_demo_patch4', input_size=32, crop_pct=1.0, batch_size=32, epochs=5, warmup_epochs=1,
                     blr=8e-3, aa='none', mixup=0.0, cutmix=0.0, hflip=0.0, min_crop_scale=0.5)


def get_args_parser():
    p = argparse.ArgumentParser('ViT fine-tuning', parents=[common_parser(), channel_parser()])
    p.set_defaults(min_lr=None)  # the recipe's (1e-6 fine-tune, 0 transfer)
    g = p.add_argument_group('recipe')
    g.add_argument('--recipe', default='ml_improved', choices=sorted(RECIPES),
                   help='preset of schedule, optimizer and augmentation (SPEC §4): ml_improved = MAE-Lite ViT-Tiny, '
                        'fb = official MAE ViT-B, transfer = MAE-Lite transfer (SGD), um_swin = UM-MAE Swin-T (256 px, '
                        'window 16). Any flag overrides its value')
    g.add_argument('--opt', default=None, choices=['adamw', 'sgd'], help='optimizer (default: the recipe\'s)')
    g.add_argument('--momentum', type=float, default=0.9, help='SGD (Nesterov) momentum')
    g.add_argument('--layer_decay', type=float, default=None,
                   help='layer-wise lr decay: block i gets lr * decay^(depth + 1 - (i + 1)); the embeddings get the '
                        'smallest lr, the head the full lr (default: the recipe\'s)')
    g = p.add_argument_group('model')
    g.add_argument('--model', default=None, help=f'ViT factory in models_vit.py (default {COMMON["model"]}; '
                                                 'vit_demo_patch4 on the demo data) or Swin in models_swin.py '
                                                 '(swin_tiny, swin_tiny_um = window 16 at 256 px, swin_demo) or PVT '
                                                 'in models_pvt.py (pvt_small, pvt_demo) or Hiera in '
                                                 'models_hiera.py (hiera_tiny, hiera_demo)')
    g.add_argument('--finetune', default='', help='pre-trained weights to start from (MAE/MAE-Lite/TinyMIM/MoCo-v3/'
                                                  'timm layouts); the head is re-initialised (trunc-normal std 2e-5)')
    g.add_argument('--global_pool', default='avg', choices=['avg', 'token'],
                   help='avg: mean of patch tokens + fc_norm (official MAE fine-tuning); token: cls after norm')
    g.add_argument('--rpe', action='store_true',
                   help='MAE-Lite RPE model: BEiT-style relative position bias per block and separate q/v biases '
                        '(a checkpoint\'s qkv bias is split into them); with the ml_improved recipe, 1000 epochs')
    g.add_argument('--drop_path', type=float, default=None, help='stochastic depth rate (default: the recipe\'s)')
    g.add_argument('--nb_classes', type=int, default=None, help='head size (default: the dataset\'s class count)')
    g.add_argument('--model_ema', action='store_true', help='keep an EMA of the weights and report its accuracy too '
                                                            '(test_ema_*)')
    g.add_argument('--model_ema_decay', type=float, default=0.9999, help='EMA decay per optimizer step')
    g.add_argument('--model_ema_warmup', action='store_true',
                   help='ramp the EMA decay up from 0 (timm\'s warmup), useful for short runs where 0.9999 would '
                        'keep the EMA near its start')
    g = p.add_argument_group('DeiT distillation')
    g.add_argument('--distillation_type', default='none', choices=['none', 'soft', 'hard'],
                   help='DeiT: add a distillation token with its own head, trained on the teacher\'s argmax (hard) '
                        'or its softened distribution (soft); the two heads are averaged at inference')
    g.add_argument('--distillation_alpha', type=float, default=0.5,
                   help='loss = (1 - alpha) * loss of the cls head + alpha * loss of the distillation head')
    g.add_argument('--distillation_tau', type=float, default=1.0, help='soft distillation temperature')
    g.add_argument('--teacher_model', default=None,
                   help='teacher architecture: a models_vit.py factory (its pooling follows the checkpoint) or any '
                        'timm model name')
    g.add_argument('--teacher_path', default='',
                   help='the teacher\'s classifier checkpoint (any layout the shared loader reads, head included, '
                        'e.g. a checkpoint-best.pth of this script); frozen, never saved')
    g = p.add_argument_group('augmentation and regularisation')
    g.add_argument('--aa', default=None,
                   help="timm RandAugment policy, e.g. rand-m9-mstd0.5-inc1; 'none' = crop + flip only "
                        "(default: the recipe's)")
    g.add_argument('--min_crop_scale', type=float, default=None,
                   help='RandomResizedCrop area lower bound: 0.08 (DeiT/MAE); the demo uses more, as an 8%% crop of a '
                        '32 px digit no longer shows which digit it is')
    g.add_argument('--hflip', type=float, default=None,
                   help='horizontal flip probability (0.5; 0 on the demo: a mirrored digit is not the same digit)')
    g.add_argument('--color_jitter', type=float, default=None,
                   help='colour jitter strength (off when unset; timm ignores it under RandAugment)')
    g.add_argument('--reprob', type=float, default=None, help='random erasing probability (default: the recipe\'s)')
    g.add_argument('--remode', default='pixel', help='random erasing fill mode')
    g.add_argument('--recount', type=int, default=1, help='random erasing count')
    g.add_argument('--smoothing', type=float, default=None, help='label smoothing (default: the recipe\'s)')
    g.add_argument('--mixup', type=float, default=None, help='mixup alpha; 0 = off (default: the recipe\'s)')
    g.add_argument('--cutmix', type=float, default=None, help='cutmix alpha; 0 = off (default: the recipe\'s)')
    g.add_argument('--cutmix_minmax', type=float, nargs=2, default=None,
                   help='cutmix box ratio min/max (overrides --cutmix alpha when set)')
    g.add_argument('--mixup_prob', type=float, default=1.0, help='probability of applying mixup or cutmix to a batch')
    g.add_argument('--mixup_switch_prob', type=float, default=0.5,
                   help='probability of cutmix instead of mixup when both are on')
    g.add_argument('--mixup_mode', default='batch', choices=['batch', 'pair', 'elem'],
                   help='one mixing coefficient per batch, per pair or per element')
    g = p.add_argument_group('data and evaluation')
    g.add_argument('--dataset', default=None, choices=sorted(DATASETS),
                   help='dataset under --data_path (layouts in util/datasets.py); default folder (ImageNet style), '
                        'or demo when --data_path is empty')
    g.add_argument('--download', action='store_true', help='let torchvision download the dataset into --data_path '
                                                           '(never done otherwise)')
    g.add_argument('--crop_pct', type=float, default=None,
                   help='evaluation: resize to input_size / crop_pct, centre-crop input_size (224/256; 1 on the demo)')
    g.add_argument('--eval', action='store_true',
                   help='only evaluate the checkpoint given by --resume (or --finetune) and exit')
    return p


def build_transform(train, args):
    """Training: timm's RandomResizedCrop + flip (+ RandAugment, random erasing); evaluation: resize + centre crop.
    .npy inputs (--in_chans other than 1 and 3) are tensors: crop, flip, normalise (+ random erasing) on them."""
    mean, std = channel_stats(args.in_chans, args.mean, args.std)
    if not train:
        return eval_transform(args.input_size, args.crop_pct, mean, std, args.in_chans)
    if is_array_input(args.in_chans):
        if args.aa not in (None, 'none') or args.color_jitter:
            raise ValueError(f'--aa and --color_jitter work on RGB/greyscale images; with --in_chans {args.in_chans} '
                             '(.npy inputs) pass --aa none and no --color_jitter')
        steps = [RandomResizedCropAndInterpolation(args.input_size, scale=(args.min_crop_scale, 1.0),
                                                   interpolation='bicubic'),
                 transforms.RandomHorizontalFlip(args.hflip), transforms.Normalize(mean, std)]
        if args.reprob > 0:  # torchvision's: 'pixel' mode fills with normal noise, as timm's does
            value = 'random' if args.remode == 'pixel' else 0
            steps += [transforms.RandomErasing(args.reprob, value=value) for _ in range(args.recount)]
        return transforms.Compose(steps)
    transform = create_transform(args.input_size, is_training=True, scale=(args.min_crop_scale, 1.0),
                                 hflip=args.hflip, color_jitter=args.color_jitter,
                                 auto_augment=None if args.aa in (None, 'none') else args.aa, interpolation='bicubic',
                                 re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
                                 mean=mean, std=std)
    for t in transform.transforms:
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.name.startswith('Posterize'):
                    op.aug_fn = posterize
    return transform


def posterize(img, bits, **_):
    """timm's posterize op, including 0 bits. RandAugment's 'PosterizeIncreasing' keeps 4 - int(0.4 * magnitude) bits:
    0 at magnitude 10, which MAE-Lite's m10 (mstd 0.5) draws for about half of its posterize calls. Older Pillow
    turned 0 bits into a black image; current Pillow raises ValueError and kills the data loader."""
    if bits >= 8:
        return img
    if bits <= 0:
        return Image.new(img.mode, img.size)  # all zeros, what the 0-bit mask ~255 gave
    return ImageOps.posterize(img, bits)


def distillation_loss(base_loss, dist_logits, teacher_logits, kind, alpha, tau):
    """DeiT: (1 - alpha) * base_loss + alpha * the distillation head's loss against the teacher; 'hard' is the
    cross-entropy with the teacher's argmax, 'soft' KL(teacher || student) at temperature tau, summed and scaled by
    tau² / numel as DeiT does. Args: logits [N, K]. Returns (loss, distillation term)."""
    dist_logits, teacher_logits = dist_logits.float(), teacher_logits.float()
    if kind == 'hard':
        term = F.cross_entropy(dist_logits, teacher_logits.argmax(dim=1))
    else:
        term = F.kl_div(F.log_softmax(dist_logits / tau, dim=1), F.log_softmax(teacher_logits / tau, dim=1),
                        reduction='sum', log_target=True) * (tau * tau) / dist_logits.numel()
    return (1 - alpha) * base_loss + alpha * term, term


def is_vit(name):
    return name in models_vit.MODELS or name in models_vit.ALIASES


def build_teacher(args):
    """The frozen DeiT teacher: --teacher_model (a models_vit factory, pooled as its checkpoint was fine-tuned, or a
    timm model) with --teacher_path's weights, which must include the classifier for --nb_classes classes."""
    if not args.teacher_path or not args.teacher_model:
        raise ValueError(f'--distillation_type {args.distillation_type} needs --teacher_model and --teacher_path '
                         '(a fine-tuned classifier checkpoint)')
    raw = load_file(args.teacher_path)
    keys = strip_prefixes(unwrap_state_dict(raw))
    if is_vit(args.teacher_model):
        teacher = models_vit.create_model(args.teacher_model, img_size=args.input_size, num_classes=args.nb_classes,
                                          in_chans=args.in_chans, distilled='dist_token' in keys,
                                          global_pool='avg' if 'fc_norm.weight' in keys else 'token')
    else:
        try:
            teacher = timm.create_model(args.teacher_model, num_classes=args.nb_classes, in_chans=args.in_chans)
        except RuntimeError as e:
            raise ValueError(f'--teacher_model {args.teacher_model!r} is neither a models_vit factory '
                             f'({", ".join(sorted(models_vit.MODELS))}) nor a timm model: {e}') from None
    info = load_pretrained(teacher, raw)
    if info['missing'] or info['mismatched']:
        raise ValueError(f'--teacher_path {args.teacher_path}: not a {args.nb_classes}-class {args.teacher_model} '
                         f'classifier (missing {info["missing"][:4]}, shape-mismatched {info["mismatched"][:4]})')
    return teacher.requires_grad_(False).eval().to(args.device)


def has_dist_token(path):
    """Whether the checkpoint at `path` holds a DeiT distillation token (so --eval builds the distilled model)."""
    return bool(path) and 'dist_token' in strip_prefixes(unwrap_state_dict(load_file(path)))


def set_recipe_defaults(args):
    """preset < explicit flag; demo sizes when --data_path is empty."""
    recipe = {**COMMON, **RECIPES[args.recipe]}
    if args.blr is not None:  # an explicit --blr beats a recipe's absolute lr (transfer)
        recipe.pop('lr', None)
    if args.rpe and args.recipe == 'ml_improved':  # MAE-Lite's RPE row: the improved recipe for 1000 epochs
        recipe['epochs'] = 1000
    fill_defaults(args, recipe, DEMO_DEFAULTS)
    if args.dataset is None:
        args.dataset = 'folder' if args.data_path else 'demo'
    return args


def main(args):
    dist.init_distributed_mode(args)
    setup_logging(args.rank, args.output_dir)
    set_recipe_defaults(args)
    seed_everything(args.seed + args.rank)

    dataset_val, nb_classes = build_dataset(args.dataset, args.data_path, False, build_transform(False, args),
                                            args.download, args.in_chans)
    loader_val = build_loader(dataset_val, args.batch_size, args.num_workers, args.pin_mem, train=False)
    if not args.eval:
        dataset_train, nb_train = build_dataset(args.dataset, args.data_path, True, build_transform(True, args),
                                                args.download, args.in_chans)
        nb_classes = max(nb_classes, nb_train)
        loader_train = build_loader(dataset_train, args.batch_size, args.num_workers, args.pin_mem, train=True,
                                    seed=args.seed)
        if len(loader_train) == 0:
            raise ValueError(f'{args.dataset}: {len(dataset_train)} training images, fewer than one batch of '
                             f'{args.batch_size} per process ({args.world_size} processes); lower --batch_size')
    if args.nb_classes is None:
        args.nb_classes = nb_classes
    elif args.nb_classes < nb_classes:
        raise ValueError(f'--nb_classes {args.nb_classes} is smaller than the {nb_classes} classes of {args.dataset}')

    if args.distillation_type != 'none' and not is_vit(args.model):
        raise ValueError(f'--distillation_type {args.distillation_type} needs a models_vit ViT (it adds a '
                         f'distillation token); --model {args.model} is not one')
    pyramid = models_swin if models_swin.has_model(args.model) else models_pvt if models_pvt.has_model(args.model) \
        else None
    if pyramid is not None:  # GAP: 'avg' = mean then fc_norm (MAE layout); no cls token to pool
        if args.global_pool != 'avg' or args.rpe:
            raise ValueError(f'{args.model}: Swin and PVT pool by average (--global_pool avg) and have their own '
                             'positions (no --rpe)')
        require_rgb(args, 'Swin/PVT')
        model = pyramid.create_model(args.model, img_size=args.input_size, num_classes=args.nb_classes,
                                     fc_norm=True, drop_path_rate=args.drop_path)
    elif models_hiera.has_model(args.model):  # timm's Hiera classifier: mean of the last stage, head.norm, head.fc
        if args.global_pool != 'avg' or args.rpe:
            raise ValueError(f'{args.model}: Hiera pools by average (--global_pool avg) and has no --rpe')
        require_rgb(args, 'Hiera')
        model = models_hiera.create_model(args.model, img_size=args.input_size, num_classes=args.nb_classes,
                                          drop_path_rate=args.drop_path)
    else:
        rpe = {'rel_pos_bias': True} if args.rpe else {}
        distilled = args.distillation_type != 'none' or (args.eval and has_dist_token(resume_path(args) or
                                                                                       args.finetune))
        model = models_vit.create_model(args.model, img_size=args.input_size, num_classes=args.nb_classes,
                                        in_chans=args.in_chans, global_pool=args.global_pool,
                                        drop_path_rate=args.drop_path, distilled=distilled, **rpe)
    start_from = resume_path(args)
    if args.finetune and not args.eval and not start_from:
        info = load_pretrained(model, args.finetune)
        args.block_heads = [list(p) for p in block_heads_of(info['source'])]  # kept in this run's checkpoints
        head = model.get_classifier() if hasattr(model, 'get_classifier') else model.head  # Swin: head.fc
        for h in (head, getattr(model, 'head_dist', None) or head):  # DeiT's distillation head too
            trunc_normal_(h.weight, std=2e-5)  # official MAE: a near-zero head, whatever the checkpoint held
            torch.nn.init.zeros_(h.bias)
    elif start_from and not args.eval:
        if args.finetune:
            log.info(f'resuming from {start_from}: --finetune {args.finetune} is superseded')
        last = load_file(start_from)  # a fine-tune of a TinyMIM student: its blocks' head counts before the load
        apply_block_heads(model, last)
        args.block_heads = [list(p) for p in block_heads_of(last)]
    model.to(args.device)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)

    if args.eval:
        return evaluate_checkpoint(model, loader_val, args)
    teacher = None
    if args.distillation_type != 'none':
        if not 0.0 <= args.distillation_alpha <= 1.0 or args.distillation_tau <= 0:
            raise ValueError('--distillation_alpha must lie in [0, 1] and --distillation_tau be positive')
        teacher = build_teacher(args)
        log.info(f'teacher {args.teacher_model} ({args.teacher_path}): val acc1 '
                 f'{evaluate(teacher, loader_val, args)["acc1"]:.2f}')

    model_ema = None
    if args.model_ema:  # a copy on the same device, outside DDP (its update reads the unwrapped weights)
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
    model_without_ddp = model
    model = dist.wrap_model(model, args)

    resolve_lr(args)
    if args.blr is None:  # absolute lr (transfer): report its per-256 equivalent
        args.blr = args.lr * 256 / args.eff_batch_size
    groups = param_groups_lrd(model_without_ddp, args.weight_decay, args.layer_decay)
    if args.opt == 'adamw':
        optimizer = adamw(model_without_ddp, args, groups=groups)
    else:
        optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=True)
    scaler = make_scaler(args)
    start_epoch = resume(args, model_without_ddp, optimizer, scaler)
    best = dict(acc1=-1.0, epoch=-1)
    if start_epoch > 0:  # the EMA weights and the best accuracy so far ride along in the checkpoint
        ckpt = load_file(start_from)
        best = ckpt.get('best', best)
        if model_ema is not None and 'model_ema' in ckpt:
            model_ema.module.load_state_dict(ckpt['model_ema'])

    log.info(f'{args.model}: {n_parameters / 1e6:.2f}M trainable parameters; {args.dataset}: {len(dataset_train)} '
             f'train / {len(dataset_val)} val images, {args.nb_classes} classes')
    log.info(f'recipe {args.recipe}: blr {args.blr:.3g}  lr {args.lr:.3g}  effective batch {args.eff_batch_size} '
             f'({args.batch_size} x {args.accum_iter} accum x {args.world_size} processes)  '
             f'{args.opt}  layer decay {args.layer_decay}')
    log.info('args: ' + ', '.join(f'{k}={v}' for k, v in sorted(vars(args).items())))
    log_writer = make_tb_writer(args.log_dir)

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=args.nb_classes)
        criterion = SoftTargetCrossEntropy()  # mixup makes soft targets (smoothing is folded into them)
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()

    def step(model, images, targets):
        if mixup_fn is not None:
            if images.shape[0] % 2:  # mixup pairs images with the flipped batch: needs an even count (a batch
                images, targets = images[:-1], targets[:-1]  # loses one when an unreadable image was dropped)
            images, targets = mixup_fn(images, targets)
        if teacher is None:
            return criterion(model(images), targets), {}
        cls_logits, dist_logits = model(images)
        with torch.no_grad():
            teacher_logits = teacher(images)  # the teacher sees the same (mixed) images
        base = criterion(cls_logits, targets)
        loss, term = distillation_loss(base, dist_logits, teacher_logits, args.distillation_type,
                                       args.distillation_alpha, args.distillation_tau)
        return loss, dict(loss_cls=base.detach(), loss_distill=term.detach())

    ema_steps = start_epoch * math.ceil(len(loader_train) / args.accum_iter)  # optimizer steps so far

    def after_step(model):
        nonlocal ema_steps
        ema_steps += 1
        model_ema.update(unwrap_model(model), step=ema_steps)

    test_stats = ema_stats = {}
    if start_epoch >= args.epochs:
        log.info(f'nothing to do: training already finished {args.epochs} epochs')
        test_stats = evaluate(model, loader_val, args)
    start = time.time()
    for epoch in range(start_epoch, args.epochs):
        loader_train.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(model, step, loader_train, optimizer, epoch, args, scaler,
                                      after_step=after_step if model_ema is not None else None, log_writer=log_writer)
        test_stats = evaluate(model, loader_val, args)
        improved = test_stats['acc1'] > best['acc1']
        if improved:
            best = dict(acc1=test_stats['acc1'], acc5=test_stats['acc5'], epoch=epoch)
        extra = {'best': best}
        if model_ema is not None:
            ema_stats = evaluate(model_ema.module, loader_val, args)
            extra['model_ema'] = model_ema.module.state_dict()
        log.info(f'epoch {epoch}: acc1 {test_stats["acc1"]:.2f}  best {best["acc1"]:.2f} (epoch {best["epoch"]})')
        end_epoch(args, epoch, model, optimizer, scaler, n_parameters, train_stats,
                  {**test_stats, **{f'ema_{k}': v for k, v in ema_stats.items()}}, log_writer,
                  also_save=['best'] if improved else [], extra=extra)
    end_training(start, log_writer)
    result = {**test_stats, 'best_acc1': best['acc1'], 'best_epoch': best['epoch']}
    result.update({f'ema_{k}': v for k, v in ema_stats.items()})
    return result


def evaluate_checkpoint(model, loader, args):
    """--eval: load the fine-tuned weights (head included; a missing head is an error, not a random one) and
    report top-1/top-5; also the EMA weights when the checkpoint carries them."""
    path = resume_path(args) or args.finetune
    if not path:
        raise ValueError('--eval needs the checkpoint to evaluate: --resume CKPT')
    info = load_pretrained(model, path)
    if info['missing']:
        raise KeyError(f'{path}: cannot evaluate, the checkpoint lacks {info["missing"][:8]} (a pre-training '
                       'checkpoint? fine-tune it first)')
    stats = evaluate(model, loader, args)
    raw = info['source']
    if isinstance(raw, dict) and 'model_ema' in raw:
        ema = copy.deepcopy(model)
        ema.load_state_dict(raw['model_ema'])
        stats.update({f'ema_{k}': v for k, v in evaluate(ema, loader, args).items()})
    log.info(f'{path}: ' + '  '.join(f'{k} {v:.3f}' for k, v in stats.items()))
    dist.cleanup()
    return stats


if __name__ == '__main__':
    args = get_args_parser().parse_args()
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    main(args)
