"""MoCo v3 pre-training of a ViT: the contrastive baseline of MAE-Lite's comparison (SPEC §1.4).

  # demo: the embedded digits, the demo ViT with a small projector, 10 epochs (about 10 minutes on 2 CPU cores)
  python main_moco.py --output_dir output_dir/demo_moco
  python main_finetune.py --finetune output_dir/demo_moco/checkpoint-encoder.pth --output_dir output_dir/demo_ft_moco
  # MoCo v3 ViT-Tiny on ImageNet-1k, 8 GPUs (effective batch 4096 = 512 x 8), 300 epochs
  torchrun --nproc_per_node 8 main_moco.py --model vit_tiny_patch16 --batch_size 512 --data_path /data/imagenet \
      --stop_grad_conv1 --output_dir out/moco_tiny

The query encoder is a ViT (cls token after `norm`) + a 3-layer projector + a 2-layer predictor; the key encoder is a
momentum copy of ViT + projector whose momentum follows a cosine from --moco_m to 1 per optimizer step. Every run
writes `checkpoint-last.pth` (the whole MoCo model: auto-resume) and at the end `checkpoint-encoder.pth`, the query
ViT alone as a plain models_vit ViT, which main_finetune / main_linprobe / main_knn load (so does the full
checkpoint: the loader strips `base_encoder.` and drops the momentum copy, projector and predictor).

References:
  MoCo v3  - Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision Transformers", ICCV 2021
             (symmetrised InfoNCE x 2T, BN projector/predictor, cosine momentum, frozen random patch projection,
             fixed 2-D sin-cos position embedding, AdamW blr 1.5e-4 wd 0.1 for ViT).
  BYOL     - Grill et al., NeurIPS 2020 (the asymmetric two-view augmentations).
  MAE-Lite - Wang et al., "A Closer Look at Self-Supervised Lightweight Vision Transformers", ICML 2023 (MoCo v3
             ViT-Tiny as the contrastive baseline: 76.8 top-1 after fine-tuning).
"""
import argparse
import copy
import logging
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms

import models_vit
from util import dist
from util.args import common_parser, fill_defaults, resolve_lr
from util.checkpoint import atomic_save, resume, unwrap_model
from util.data import SafeImageFolder, build_loader, dataset_root
from util.engine import end_epoch, end_training, make_scaler, train_one_epoch
from util.logger import make_tb_writer, setup_logging
from util.optim import adamw
from util.pos_embed import get_2d_sincos_pos_embed
from util.rng import seed_everything

log = logging.getLogger('mim')

DEFAULTS = dict(model='vit_tiny_patch16', input_size=224, batch_size=128, epochs=300, warmup_epochs=40, blr=1.5e-4,
                weight_decay=0.1, moco_dim=256, moco_mlp_dim=4096, min_crop_scale=0.08)
# The demo ViT on 32 px digits: a projector/predictor sized to its 128-d features, and milder crops (an 8% crop of a
# digit shows a stroke, not a digit, so the two views would share nothing to agree on).
DEMO_DEFAULTS = dict(model='vit_demo_patch4', input_size=32, batch_size=64, epochs=10, warmup_epochs=2, blr=1.5e-3,
                     moco_dim=64, moco_mlp_dim=512, min_crop_scale=0.3)


def get_args_parser():
    p = argparse.ArgumentParser('MoCo v3 pre-training', parents=[common_parser()])
    g = p.add_argument_group('MoCo v3')
    g.add_argument('--model', default=None,
                   help=f'ViT factory in models_vit.py (default {DEFAULTS["model"]}; vit_demo_patch4 on the demo data)')
    g.add_argument('--moco_dim', type=int, default=None, help='output width of projector and predictor (256)')
    g.add_argument('--moco_mlp_dim', type=int, default=None, help='hidden width of projector and predictor (4096)')
    g.add_argument('--moco_m', type=float, default=0.99,
                   help='momentum of the key encoder at the start; it rises to 1 along a half-cosine over training')
    g.add_argument('--moco_t', type=float, default=0.2, help='softmax temperature of the InfoNCE loss (0.2 for ViT)')
    g.add_argument('--stop_grad_conv1', action='store_true',
                   help='freeze the randomly initialised patch projection (MoCo v3\'s fix for the training '
                        'instability of ViTs at large batch/lr; its ViT commands all use it)')
    g.add_argument('--min_crop_scale', type=float, default=None,
                   help='RandomResizedCrop area lower bound of both views (0.08; 0.3 on the demo digits)')
    g.add_argument('--drop_path', type=float, default=0.0, help='stochastic depth in the encoder')
    return p


def mlp(num_layers, in_dim, hidden_dim, out_dim, last_bn=True):
    """MoCo v3 MLP: bias-free Linear layers, BN + ReLU between them, and a last BN without affine parameters
    (projector) or none (predictor)."""
    layers = []
    for i in range(num_layers):
        last = i == num_layers - 1
        layers.append(nn.Linear(in_dim if i == 0 else hidden_dim, out_dim if last else hidden_dim, bias=False))
        if not last:
            layers += [nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


def contrastive_loss(q, k, T):
    """InfoNCE of each query against every key of the global batch, its own key being the positive, times 2T
    (MoCo v3, so the gradient scale does not depend on T).

    Args: q [N, C] queries of this rank (with grad); k [N, C] keys of this rank (no grad; gathered from all ranks).
    Returns: a scalar.
    """
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    k_all = dist.all_gather_cat(k)  # [N_total, C]; no gradient flows through a gather, none is needed for keys
    # this rank's positives sit after the keys of the ranks before it (batches may differ by dropped images)
    sizes = dist.all_gather_cat(torch.tensor([q.shape[0]], device=q.device))  # [world]
    logits = q @ k_all.t() / T  # [N, N_total]
    labels = torch.arange(q.shape[0], device=q.device) + sizes[:dist.get_rank()].sum()  # [N], on the device
    return F.cross_entropy(logits.float(), labels) * (2 * T)


def moco_momentum(progress, m0):
    """Key-encoder momentum at `progress` in [0, 1] of training: a half-cosine from m0 up to 1."""
    return 1.0 - (1.0 - m0) * (1.0 + math.cos(math.pi * progress)) / 2


class MoCoV3(nn.Module):
    """MoCo v3 around a ViT `encoder` (num_classes=0, cls-token pooling).

    State-dict layout: `base_encoder.*` (the ViT), `projector.*`, `predictor.*`, and the key encoder as
    `momentum_encoder.*` / `momentum_projector.*` (no gradient, updated by `update_momentum`).
    """

    def __init__(self, encoder, dim=256, mlp_dim=4096, T=0.2):
        super().__init__()
        self.T = T
        self.base_encoder = encoder
        self.projector = mlp(3, encoder.embed_dim, mlp_dim, dim, last_bn=True)
        self.predictor = mlp(2, dim, mlp_dim, dim, last_bn=False)
        self.momentum_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {f'base_encoder.{n}' for n in self.base_encoder.no_weight_decay()}

    @torch.no_grad()
    def update_momentum(self, m):
        """key <- m * key + (1 - m) * query, for encoder and projector (buffers such as BN statistics are not
        averaged: both BNs normalise with batch statistics in training)."""
        query = [*self.base_encoder.parameters(), *self.projector.parameters()]
        key = [*self.momentum_encoder.parameters(), *self.momentum_projector.parameters()]
        for pk, pq in zip(key, query):
            pk.lerp_(pq, 1.0 - m)

    def forward(self, x1, x2):
        """Two views [N, C, H, W] each -> the symmetrised loss ctr(q1, k2) + ctr(q2, k1)."""
        q1, q2 = (self.predictor(self.projector(self.base_encoder(x))) for x in (x1, x2))  # [N, dim] each
        with torch.no_grad():
            k1, k2 = (self.momentum_projector(self.momentum_encoder(x)) for x in (x1, x2))  # [N, dim] each
        return contrastive_loss(q1, k2, self.T) + contrastive_loss(q2, k1, self.T)


class TwoViews:
    """MoCo v3's (BYOL's) asymmetric augmentations: two random-resized crops of one image, each colour-jittered
    (p 0.8) and greyed (p 0.2); the first always blurred, the second blurred with p 0.1 and solarised with p 0.2.
    Blur sigmas (0.1-2 px at 224) scale with the image size. Returns [2, C, H, W]."""

    def __init__(self, size, min_scale=0.08):
        sigma = (0.1 * size / 224, 2.0 * size / 224)
        kernel = 2 * math.ceil(3 * sigma[1]) + 1  # +-3 sigma

        def view(blur_p, solarize_p):
            return transforms.Compose([
                transforms.RandomResizedCrop(size, scale=(min_scale, 1.0),
                                             interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                transforms.RandomGrayscale(p=0.2),
                transforms.RandomApply([transforms.GaussianBlur(kernel, sigma)], p=blur_p),
                transforms.RandomSolarize(128, p=solarize_p),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
        self.views = view(1.0, 0.0), view(0.1, 0.2)

    def __call__(self, img):
        return torch.stack([t(img) for t in self.views])


def build_moco(args):
    """The query ViT with MoCo v3's fixed sin-cos position embedding (and, with --stop_grad_conv1, a frozen random
    patch projection), wrapped in MoCoV3."""
    encoder = models_vit.create_model(args.model, img_size=args.input_size, num_classes=0, global_pool='token',
                                      drop_path_rate=args.drop_path)
    pos = get_2d_sincos_pos_embed(encoder.embed_dim, encoder.patch_embed.grid_size, cls_token=True)  # [1+L, D]
    encoder.pos_embed.data.copy_(pos.unsqueeze(0))
    encoder.pos_embed.requires_grad_(False)
    if args.stop_grad_conv1:
        encoder.patch_embed.requires_grad_(False)
    return MoCoV3(encoder, args.moco_dim, args.moco_mlp_dim, args.moco_t)


def export_encoder(args, encoder):
    """Write output_dir/checkpoint-encoder.pth: the query ViT as a plain models_vit state dict."""
    if args.output_dir and dist.is_main_process():
        atomic_save({'model': encoder.state_dict(), 'args': {'method': 'mocov3', 'model': args.model}},
                    os.path.join(args.output_dir, 'checkpoint-encoder.pth'))


def main(args):
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    dist.init_distributed_mode(args)
    setup_logging(args.rank, args.output_dir)
    fill_defaults(args, DEFAULTS, DEMO_DEFAULTS)
    seed_everything(args.seed + args.rank)

    root = dataset_root(args.data_path, 'train')
    dataset = SafeImageFolder(root, TwoViews(args.input_size, args.min_crop_scale))
    loader = build_loader(dataset, args.batch_size, args.num_workers, args.pin_mem, train=True, seed=args.seed)
    if len(loader) == 0:
        raise ValueError(f'{root}: {len(dataset)} images, fewer than one --batch_size {args.batch_size} per process')

    model = build_moco(args).to(args.device)
    if args.distributed and str(args.device).startswith('cuda'):  # MoCo v3: BN statistics over the global batch
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model_without_ddp, model = model, dist.wrap_model(model, args)
    resolve_lr(args)
    optimizer = adamw(model_without_ddp, args, betas=(0.9, 0.999))
    scaler = make_scaler(args)
    start_epoch = resume(args, model_without_ddp, optimizer, scaler)
    log.info(f'MoCo v3 {args.model}: {n_parameters / 1e6:.2f}M trainable parameters (encoder, projector, '
             f'predictor); data {root}: {len(dataset)} images; blr {args.blr:.3g}  lr {args.lr:.3g}  effective batch '
             f'{args.eff_batch_size} ({args.batch_size} x {args.accum_iter} accum x {args.world_size} processes)')
    log.info('args: ' + ', '.join(f'{k}={v}' for k, v in sorted(vars(args).items())))
    log_writer = make_tb_writer(args.log_dir)

    steps_per_epoch = math.ceil(len(loader) / args.accum_iter)
    steps_done = start_epoch * steps_per_epoch  # the momentum schedule continues where a resumed run stopped
    momentum = moco_momentum(0.0, args.moco_m)

    def step(model, images, targets):
        return model(images[:, 0], images[:, 1]), {}  # images [N, 2, C, H, W]: the two views

    def after_step(model):
        nonlocal steps_done, momentum
        steps_done += 1
        momentum = moco_momentum(steps_done / (args.epochs * steps_per_epoch), args.moco_m)
        unwrap_model(model).update_momentum(momentum)

    start = time.time()
    for epoch in range(start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        stats = train_one_epoch(model, step, loader, optimizer, epoch, args, scaler, after_step=after_step,
                                log_writer=log_writer)
        stats['moco_m'] = momentum
        end_epoch(args, epoch, model, optimizer, scaler, n_parameters, stats, log_writer=log_writer)
    export_encoder(args, model_without_ddp.base_encoder)
    end_training(start, log_writer)
    return model_without_ddp


if __name__ == '__main__':
    main(get_args_parser().parse_args())
