"""MAE pre-training of (lightweight) ViTs.

  # demo: the embedded digits data, a demo-sized MAE, a couple of minutes on a laptop CPU
  python main_pretrain.py
  # MAE-Lite ViT-Tiny on ImageNet-1k, 8 GPUs (effective batch 4096 = 512 x 8)
  torchrun --nproc_per_node 8 main_pretrain.py --model mae_vit_tiny --batch_size 512 --data_path /data/imagenet
  # official MAE crop (scale 0.2, bicubic) instead of MAE-Lite's (0.08, random interpolation)
  ... --min_crop_scale 0.2 --interpolation bicubic
  # UM-MAE: uniform masking for a ViT, or on Swin-T (256 px, packed visible units); SimMIM Swin-T as its baseline
  ... --model mae_vit_tiny --mask_type uniform
  torchrun --nproc_per_node 8 main_pretrain.py --model mae_swin_tiny --batch_size 512 --data_path /data/imagenet
  torchrun --nproc_per_node 8 main_pretrain.py --model simmim_swin_tiny --batch_size 256 --data_path /data/imagenet
  # the same on the demo digits (32 px Swin, seconds per epoch)
  python main_pretrain.py --model mae_swin_demo      # or --model simmim_swin_demo
  # UM-MAE on PVT-S (256 px, sr ratios 4-2-1-1 on the packed map), and on a demo-sized PVT
  torchrun --nproc_per_node 8 main_pretrain.py --model mae_pvt_small --batch_size 512 --data_path /data/imagenet
  python main_pretrain.py --model mae_pvt_demo
  # MAE on Hiera-T with 32-px mask units, 40% of them removed (MAE-Lite); the demo-sized Hiera
  torchrun --nproc_per_node 8 main_pretrain.py --model mae_hiera_tiny --batch_size 512 --data_path /data/imagenet
  python main_pretrain.py --model mae_hiera_demo

References:
  MAE      - He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022.
  MAE-Lite - Wang et al., "A Closer Look at Self-Supervised Lightweight Vision Transformers", ICML 2023
             (Tiny recipe: 400 epochs, norm-pix loss, crop scale 0.08 with random interpolation).
  UM-MAE   - Li et al., "Uniform Masking: Enabling MAE Pre-training for Pyramid-based Vision Transformers with
             Locality", 2022.
  SimMIM   - Xie et al., "SimMIM: A Simple Framework for Masked Image Modeling", CVPR 2022.
"""
import argparse
import logging
import os
import time

import masking
import models_hiera
import models_mae
import models_pvt
import models_swin
from util import dist, gpu_data
from util.args import channel_parser, common_parser, fill_defaults, require_rgb, resolve_lr
from util.checkpoint import resume, unwrap_model
from util.data import SafeImageFolder, build_loader, channel_stats, dataset_root, pretrain_transform
from util.engine import end_epoch, end_training, make_scaler, train_one_epoch
from util.logger import make_tb_writer, setup_logging
from util.optim import adamw
from util.rng import seed_everything

log = logging.getLogger('mim')

DEFAULTS = dict(model='mae_vit_tiny_patch16', input_size=224, batch_size=64, epochs=400, warmup_epochs=40,
                blr=1.5e-4, weight_decay=0.05, mask_ratio=0.75, min_crop_scale=0.08, beta2=0.95)
DEMO_DEFAULTS = dict(model='mae_vit_demo_patch4', input_size=32, batch_size=64, epochs=20, warmup_epochs=2,
                     blr=1.5e-3)
# Swin pre-training (models_swin.py, SPEC §4): UM-MAE Swin-T 200 epochs at 256 px (window 8 on the packed map);
# SimMIM masking 60% of the 32-px blocks at the factory's own size (the number its name ends in: 192 for
# simmim_swin_tiny, 224 for the light Swin and the D² teacher, 256; their windows divide their maps), 100 epochs
# (SimMIM's Swin-T), 400 for MAE-Lite's light Swin. The demo keeps DEMO_DEFAULTS. SimMIM's optimiser (MAE-Lite's
# light-Swin row of SPEC §4): blr 4e-4 per 2048 images, betas (0.9, 0.99), gradient clipping at 5, and milder crops
# (scale 0.67-1). UM-MAE on PVT (mae_pvt_*) takes the mae_swin row.
SWIN_DEFAULTS = {'mae_swin': dict(input_size=256, epochs=200, warmup_epochs=10),
                 'simmim_swin': dict(input_size=192, epochs=100, warmup_epochs=10, blr=4e-4 / 8, beta2=0.99,
                                     clip_grad=5.0, min_crop_scale=0.67)}


def swin_defaults(model):
    """SWIN_DEFAULTS for a pyramid pre-training model; a SimMIM Swin gets its factory's input size and, for the light
    Swin, MAE-Lite's 400 epochs."""
    preset = dict(SWIN_DEFAULTS[model.split('_')[0] + '_swin'])
    name = models_swin.ALIASES.get(model, model)
    if name.startswith('simmim_swin'):
        size = name.rsplit('_', 1)[-1]
        if size.isdigit():
            preset['input_size'] = int(size)
        if '_light' in name:
            preset['epochs'] = 400
    return preset


def get_args_parser():
    p = argparse.ArgumentParser('MAE pre-training', parents=[common_parser(), channel_parser()])
    g = p.add_argument_group('MAE')
    g.add_argument('--model', default=None,
                   help=f'MAE factory in models_mae.py (default {DEFAULTS["model"]}; short names like mae_vit_tiny '
                        'work), or a UM-MAE / SimMIM Swin in models_swin.py (mae_swin_tiny, simmim_swin_tiny; '
                        'mae_swin_demo / simmim_swin_demo on the demo data), or a UM-MAE PVT in models_pvt.py '
                        '(mae_pvt_small; mae_pvt_demo on the demo data), or an MAE Hiera in models_hiera.py '
                        '(mae_hiera_tiny; mae_hiera_demo on the demo data)')
    g.add_argument('--mask_ratio', type=float, default=None,
                   help='fraction of patches removed (default 0.75; 0.6 of the mask blocks for SimMIM; 0.4 of the '
                        'mask units for Hiera, MAE-Lite\'s choice; uniform masking is always 0.75)')
    g.add_argument('--mask_type', default='random', choices=['random', 'uniform'],
                   help='ViT MAE: random (MAE) or uniform (UM-MAE: one visible patch per 2x2 block). mae_swin_* '
                        'models always mask uniformly, simmim_swin_* by blocks')
    g.add_argument('--vis_mask_ratio', type=float, default=0.25,
                   help='uniform masking: fraction of the visible patches/units shown as a learned vis_mask_token '
                        '(UM-MAE secondary masking; the loss stays on the removed ones)')
    g.add_argument('--shared_mask', action='store_true',
                   help='one random mask for the whole batch (MAE-priv) instead of one per image')
    g.add_argument('--norm_pix_loss', action=argparse.BooleanOptionalAction, default=True,
                   help='targets are patches normalised by their own mean/std (on in MAE-Lite and the best MAE runs)')
    g.add_argument('--min_crop_scale', type=float, default=None,
                   help='RandomResizedCrop scale lower bound: 0.08 MAE-Lite (default), 0.2 official MAE, 0.67 SimMIM')
    g.add_argument('--beta2', type=float, default=None,
                   help="AdamW's second beta: 0.95 for MAE (default; steadier with large batches), 0.99 SimMIM")
    g.add_argument('--interpolation', default='random', choices=['random', 'bicubic', 'bilinear'],
                   help="crop resize interpolation: 'random' MAE-Lite, 'bicubic' official MAE")
    g.add_argument('--drop_path', type=float, default=0.0, help='stochastic depth in the encoder')
    g.add_argument('--decode', default='auto', choices=['auto', 'cpu', 'gpu'],
                   help="where images are decoded and cropped: 'cpu' (PIL in the --num_workers processes), 'gpu' "
                        "(workers only read files; batched JPEG decoding and the crops run on --device, "
                        "util/gpu_data.py), 'auto' = the GPU path when training on a GPU that the measured CPU "
                        "workers cannot keep fed")
    return p


def main(args):
    dist.init_distributed_mode(args)
    setup_logging(args.rank, args.output_dir)
    swin = str(args.model).startswith(('mae_swin', 'simmim_swin', 'mae_pvt'))  # a pyramid encoder (Swin or PVT)
    if swin:
        if args.mask_ratio is None and args.model.startswith('simmim'):
            args.mask_ratio = 0.6
        if args.data_path:
            fill_defaults(args, swin_defaults(args.model))
        if args.shared_mask or args.mask_type != 'random':
            raise ValueError(f'{args.model} masks its own way: --shared_mask and --mask_type are for mae_vit_*')
    elif args.shared_mask and args.mask_type == 'uniform':
        raise ValueError('--shared_mask is a random mask; it does not combine with --mask_type uniform')
    hiera = models_hiera.has_model(args.model)  # MAE on Hiera: whole mask units removed, 40% of them (MAE-Lite)
    if hiera and (args.shared_mask or args.mask_type != 'random'):
        raise ValueError(f'{args.model} removes random whole mask units: --shared_mask and --mask_type do not apply')
    if hiera and args.mask_ratio is None:
        args.mask_ratio = 0.4
    fill_defaults(args, DEFAULTS, DEMO_DEFAULTS)
    if swin or hiera:
        require_rgb(args, 'Hiera' if hiera else 'Swin/PVT')
    mean, std = channel_stats(args.in_chans, args.mean, args.std)
    if args.in_chans != 3:  # the GPU decoder (util/gpu_data.py) decodes RGB JPEGs only
        if args.decode == 'gpu':
            raise ValueError(f'--decode gpu decodes RGB images; --in_chans {args.in_chans} needs --decode cpu')
        args.decode = 'cpu'
    seed_everything(args.seed + args.rank)

    root = dataset_root(args.data_path, 'train')
    dataset = SafeImageFolder(root, pretrain_transform(args.input_size, args.min_crop_scale, args.interpolation,
                                                       mean, std, args.in_chans), in_chans=args.in_chans)
    loader = build_loader(dataset, args.batch_size, args.num_workers, args.pin_mem, train=True, seed=args.seed)
    if len(loader) == 0:
        raise ValueError(f'{root} has {len(dataset)} images: fewer than one batch of {args.batch_size} per process '
                         f'({args.world_size} processes); lower --batch_size')

    if hiera:
        model = models_hiera.create_model(args.model, img_size=args.input_size, norm_pix_loss=args.norm_pix_loss,
                                          drop_path_rate=args.drop_path).to(args.device)
    elif swin:  # UM-MAE (mae_swin_*) or SimMIM (simmim_swin_*) on a Swin encoder
        mae_kw = {} if args.model.startswith('simmim') else dict(norm_pix_loss=args.norm_pix_loss,
                                                                  vis_mask_ratio=args.vis_mask_ratio)
        create = models_pvt.create_model if models_pvt.has_model(args.model) else models_swin.create_model
        model = create(args.model, img_size=args.input_size, drop_path_rate=args.drop_path, **mae_kw).to(args.device)
    else:
        model = models_mae.create_model(args.model, img_size=args.input_size, in_chans=args.in_chans,
                                        norm_pix_loss=args.norm_pix_loss, drop_path_rate=args.drop_path,
                                        mask_type=args.mask_type, vis_mask_ratio=args.vis_mask_ratio).to(args.device)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model_without_ddp = model
    loader = gpu_data.pretrain_loader(args, dataset, loader, model)  # --decode
    model = dist.wrap_model(model, args)

    resolve_lr(args)
    optimizer = adamw(model_without_ddp, args, betas=(0.9, args.beta2))
    scaler = make_scaler(args)
    start_epoch = resume(args, model_without_ddp, optimizer, scaler)

    log.info(f'{args.model}: {n_parameters / 1e6:.2f}M trainable parameters; data {root}: {len(dataset)} images')
    log.info(f'blr {args.blr:.3g}  lr {args.lr:.3g}  effective batch {args.eff_batch_size} '
             f'({args.batch_size} x {args.accum_iter} accum x {args.world_size} processes)')
    log.info('args: ' + ', '.join(f'{k}={v}' for k, v in sorted(vars(args).items())))
    log_writer = make_tb_writer(args.log_dir)

    def step(model, images, targets):
        if swin or hiera:
            return model(images, mask_ratio=args.mask_ratio)[0], {}
        noise = None
        if args.shared_mask:
            noise = masking.random_noise(images.shape[0], unwrap_model(model).patch_embed.num_patches,
                                         device=images.device, shared=True)
        loss, _, _ = model(images, mask_ratio=args.mask_ratio, noise=noise)
        return loss, {}

    if start_epoch >= args.epochs:
        log.info(f'nothing to do: training already finished {args.epochs} epochs')
    start = time.time()
    for epoch in range(start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        stats = train_one_epoch(model, step, loader, optimizer, epoch, args, scaler, log_writer=log_writer)
        end_epoch(args, epoch, model, optimizer, scaler, n_parameters, stats, log_writer=log_writer)
    end_training(start, log_writer)
    return model_without_ddp


if __name__ == '__main__':
    args = get_args_parser().parse_args()
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    main(args)
