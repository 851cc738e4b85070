"""Train an OSTrack-style one-stream tracker (with candidate elimination) from a pre-trained ViT.

  # demo: moving sklearn digits in GOT-10k layout, written on first use; 3 min on a busy 2-core CPU (AUC 67)
  python track/train.py --output_dir output_dir/track_demo
  # ... starting from the demo MAE of `python main_pretrain.py --output_dir output_dir/demo_mae`
  python track/train.py --pretrained output_dir/demo_mae/checkpoint-last.pth --backbone_lr_scale 0.1 \
      --output_dir output_dir/track_demo_mae
  # MAE-Lite ViT-T on LaSOT + GOT-10k + TrackingNet + COCO, 4 GPUs x 32 = batch 128 (SPEC §6.3)
  torchrun --nproc_per_node 4 track/train.py --model vit_tiny_patch16 --pretrained mae_tiny_400e.pth \
      --train_sets lasot:/data/lasot got10k:/data/got10k/train trackingnet:/data/trackingnet coco:/data/coco \
      --output_dir out/ostrack_vit_tiny
  # GOT-10k-only protocol (train on GOT-10k train only, 100 epochs in OSTrack)
  ... --train_sets got10k:/data/got10k/train --epochs 100 --lr_drop_epoch 80

Then `python track/test.py --checkpoint out/.../checkpoint-last.pth --dataset lasot --data /data/lasot ...`.
Rerunning the same command resumes from output_dir/checkpoint-last.pth.

References:
  OSTrack  - Ye et al., "Joint Feature Learning and Relation Modeling for Tracking: A One-Stream Framework",
             ECCV 2022 (recipe: AdamW 4e-4, backbone lr x0.1, wd 1e-4, 300 epochs with x0.1 at 240, batch 128,
             60k pairs per epoch, candidate elimination from epoch 20 with an 80-epoch warm-up).
  MAE-Lite - Wang et al., ICML 2023 (the tracking transfer of lightweight MAE ViTs, SPEC §6.3).
"""
import os
import sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root: models_vit, util, track

import argparse  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from track import data as tdata  # noqa: E402
from track.model import build_tracker, keep_ratio_at, tracking_loss  # noqa: E402
from track.ope import evaluate  # noqa: E402
from track.tracker import Tracker, run_dataset  # noqa: E402
from util import dist  # noqa: E402
from util.args import common_parser, fill_defaults, resolve_lr  # noqa: E402
from util.checkpoint import resume, save_checkpoint, unwrap_model  # noqa: E402
from util.engine import make_scaler, train_one_epoch  # noqa: E402
from util.logger import make_tb_writer, setup_logging, write_epoch_log  # noqa: E402
from util.rng import seed_everything  # noqa: E402

log = logging.getLogger('mim')

# blr 8e-4 per 256 = OSTrack's lr 4e-4 at its batch 128; warmup 0 and a step decay, as in OSTrack
DEFAULTS = dict(model='vit_tiny_patch16', template_size=128, search_size=256, batch_size=32, epochs=300,
                warmup_epochs=0, blr=8e-4, weight_decay=1e-4, clip_grad=0.1, samples_per_epoch=60000,
                lr_drop_epoch=240, ce_layers=[3, 6, 9], ce_start_epoch=20, ce_warm_epochs=80, head_channels=256,
                eval_freq=0, drop_path=0.1, backbone_lr_scale=0.1)
# demo: 16/32 px crops with patch 4 (4x4 template and 8x8 search tokens) keep a CPU step well under a second; the
# demo trains from scratch, so the backbone gets the full lr (pass --backbone_lr_scale 0.1 with --pretrained);
# batches of 16 at lr 2e-3 tracked far better than 32 at 3e-3 for the same number of pairs (track/README.md)
DEMO_DEFAULTS = dict(model='vit_demo_patch4', template_size=16, search_size=32, batch_size=16, epochs=15,
                     blr=3.2e-2, samples_per_epoch=512, lr_drop_epoch=12, ce_layers=[2, 4], ce_start_epoch=3,
                     ce_warm_epochs=4, head_channels=64, eval_freq=5, drop_path=0.0, backbone_lr_scale=1.0)


def int_list(s):
    return [int(v) for v in s.split(',') if v.strip()]


def get_args_parser():
    p = argparse.ArgumentParser('OSTrack-style tracking transfer', parents=[common_parser()])
    g = p.add_argument_group('model')
    g.add_argument('--model', default=None, help=f'ViT factory in models_vit.py (default {DEFAULTS["model"]})')
    g.add_argument('--pretrained', default='',
                   help='pre-trained weights (any layout util/pretrained.load_pretrained accepts: MAE, MAE-Lite, '
                        'TinyMIM, timm, ...); empty = random init')
    g.add_argument('--num_heads', type=int, default=None,
                   help='override the factory\'s head count (it is not in the weights)')
    g.add_argument('--patch_size', type=int, default=None,
                   help='override the factory\'s patch size (training from scratch only: it changes patch_embed)')
    g.add_argument('--template_size', type=int, default=None, help='template crop side in px (128; demo 16)')
    g.add_argument('--search_size', type=int, default=None, help='search crop side in px (256; demo 32)')
    g.add_argument('--head_channels', type=int, default=None, help='center-head width (256; demo 64)')
    g.add_argument('--drop_path', type=float, default=None, help='stochastic depth in the backbone (0.1; demo 0)')
    g = p.add_argument_group('candidate elimination')
    g.add_argument('--ce_layers', type=int_list, default=None,
                   help='comma-separated 0-based blocks after which search tokens are eliminated (3,6,9; demo 2,4)')
    g.add_argument('--ce_keep_ratio', type=float, default=0.7,
                   help='fraction of the present search tokens each CE layer keeps (1 = no elimination)')
    g.add_argument('--ce_start_epoch', type=int, default=None,
                   help='keep everything before this epoch: early attention is not yet a good ranking (20)')
    g.add_argument('--ce_warm_epochs', type=int, default=None,
                   help='epochs over which the keep ratio falls from 1 to --ce_keep_ratio (80, so full elimination '
                        'from epoch 100 in OSTrack)')
    g = p.add_argument_group('tracking data')
    g.add_argument('--train_sets', nargs='*', default=[],
                   help='layout:root[:names_file] entries, layout one of got10k, lasot, trackingnet, coco (e.g. '
                        'lasot:/data/lasot:/data/lasot/training_set.txt got10k:/data/got10k/train). With neither '
                        'this nor --data_path: the demo sequences')
    g.add_argument('--eval_sets', nargs='*', default=None,
                   help='layout:root entries tracked and scored with OPE every --eval_freq epochs and at the end '
                        '(default: none; demo: the demo val split)')
    g.add_argument('--eval_freq', type=int, default=None, help='evaluate every this many epochs (0 = only at the end)')
    g.add_argument('--samples_per_epoch', type=int, default=None, help='template/search pairs per epoch (60000)')
    g.add_argument('--template_factor', type=float, default=2.0, help='template crop = sqrt(w*h) * this')
    g.add_argument('--search_factor', type=float, default=4.0, help='search crop = sqrt(w*h) * this')
    g.add_argument('--center_jitter', type=float, default=3.0,
                   help='search-box centre jitter, in units of sqrt(jittered area) (uniform, +-half of it)')
    g.add_argument('--scale_jitter', type=float, default=0.25, help='search-box log-size jitter (normal std)')
    g.add_argument('--max_gap', type=int, default=200, help='largest frame distance between template and search')
    g = p.add_argument_group('optimisation')
    g.add_argument('--backbone_lr_scale', type=float, default=None,
                   help='the ViT trains at this fraction of the lr, the head at the full lr (0.1; demo 1, as it '
                        'starts from random weights)')
    g.add_argument('--lr_drop_epoch', type=int, default=None,
                   help='multiply the lr by --lr_drop_factor from this epoch on (240)')
    g.add_argument('--lr_drop_factor', type=float, default=0.1)
    return p


def parse_sets(entries):
    """['layout:root[:names_file]', ...] -> [(sequences, weight 1), ...]. The optional names file lists the sequences
    to use, one per line (e.g. LaSOT's 1,120 training sequences)."""
    sources = []
    for e in entries:
        layout, sep, rest = e.partition(':')
        if not sep:
            raise ValueError(f'expected layout:root[:names_file], got {e!r}')
        root, _, names_file = rest.partition(':')
        seqs = tdata.load_sequences(layout, root)
        if names_file:
            with open(names_file) as f:
                names = {line.strip() for line in f if line.strip()}
            seqs = [s for s in seqs if s.name in names]
        log.info(f'{layout} {root}: {len(seqs)} sequences')
        sources.append((seqs, 1.0))
    return sources


def param_groups(model, weight_decay, backbone_lr_scale):
    """AdamW groups: backbone vs head (lr_scale) x decay vs no decay (1-D tensors, biases, position embeddings).
    `base_lr_scale` is kept so the step decay can rescale `lr_scale` each epoch."""
    skip = model.no_weight_decay()
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        backbone = not name.startswith('box_head.')
        decay = p.ndim > 1 and name not in skip
        scale = backbone_lr_scale if backbone else 1.0
        g = groups.setdefault((backbone, decay), dict(params=[], weight_decay=weight_decay if decay else 0.0,
                                                      lr_scale=scale, base_lr_scale=scale))
        g['params'].append(p)
    return list(groups.values())


def set_step_decay(optimizer, epoch, args):
    """util.engine sets each group's lr to schedule(epoch) * lr_scale; with min_lr = lr its cosine is flat, so
    folding the step factor into lr_scale gives OSTrack's warmup-free step decay."""
    factor = args.lr_drop_factor if epoch >= args.lr_drop_epoch else 1.0
    for g in optimizer.param_groups:
        g['lr_scale'] = g['base_lr_scale'] * factor


def run_eval(model, sequences, args, out_dir=None):
    """Track and score the eval sequences on this process (call on rank 0). Returns (OPE results, fps)."""
    tracker = Tracker(unwrap_model(model), args.device, args.template_factor, args.search_factor)
    preds, fps = run_dataset(tracker, sequences, out_dir)
    unwrap_model(model).train()
    return evaluate(preds, sequences), fps


def main(args):
    dist.init_distributed_mode(args)
    setup_logging(args.rank, args.output_dir)
    demo = not args.train_sets and not args.data_path
    fill_defaults(args, DEFAULTS, DEMO_DEFAULTS if demo else None)
    seed_everything(args.seed + args.rank)

    if demo:
        root = tdata.demo_tracking_root()
        args.train_sets = [f'got10k:{os.path.join(root, "train")}']
        if args.eval_sets is None:
            args.eval_sets = [f'got10k:{os.path.join(root, "val")}']
    elif args.data_path:  # --data_path alone: a GOT-10k-layout folder
        args.train_sets = args.train_sets or [f'got10k:{args.data_path}']
    sources = parse_sets(args.train_sets)
    eval_seqs = [s for seqs, _ in parse_sets(args.eval_sets or []) for s in seqs]
    dataset = tdata.PairDataset(sources, args.samples_per_epoch, args.template_size, args.search_size,
                                args.template_factor, args.search_factor, args.center_jitter, args.scale_jitter,
                                args.max_gap, seed=args.seed)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=args.world_size, rank=args.rank,
                                                  shuffle=True, seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=sampler,
                                         num_workers=args.num_workers, collate_fn=tdata.collate_pairs,
                                         pin_memory=args.pin_mem and torch.cuda.is_available(), drop_last=True)
    if len(loader) == 0:
        raise ValueError(f'--samples_per_epoch {args.samples_per_epoch} is less than one batch per process')

    vit_kwargs = {k: getattr(args, k) for k in ('num_heads', 'patch_size') if getattr(args, k) is not None}
    model = build_tracker(args.model, args.pretrained, args.template_size, args.search_size, args.ce_layers,
                          args.ce_keep_ratio, args.head_channels, args.drop_path, **vit_kwargs).to(args.device)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model_without_ddp = model
    model = dist.wrap_model(model, args)  # DDP when launched distributed, then torch.compile with --compile

    resolve_lr(args)
    args.min_lr = args.lr  # flat "cosine": the step decay lives in set_step_decay
    optimizer = torch.optim.AdamW(param_groups(model_without_ddp, args.weight_decay, args.backbone_lr_scale),
                                  lr=args.lr, fused=str(args.device).startswith('cuda'))
    scaler = make_scaler(args)
    start_epoch = resume(args, model_without_ddp, optimizer, scaler)

    log.info(f'{args.model} tracker: {n_parameters / 1e6:.2f}M parameters; template {args.template_size}, search '
             f'{args.search_size}, CE after blocks {args.ce_layers} keeping {args.ce_keep_ratio}')
    log.info(f'blr {args.blr:.3g}  lr {args.lr:.3g} (backbone x{args.backbone_lr_scale})  effective batch '
             f'{args.eff_batch_size} ({args.batch_size} x {args.accum_iter} accum x {args.world_size} processes)')
    log.info('args: ' + ', '.join(f'{k}={v}' for k, v in sorted(vars(args).items())))
    log_writer = make_tb_writer(args.log_dir)

    keep = {'ratio': 1.0}

    def step(model, pair, boxes):
        out = model(pair.template, pair.search, keep_ratio=keep['ratio'])
        return tracking_loss(out, boxes)

    start = time.time()
    results = None
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        keep['ratio'] = keep_ratio_at(epoch, args.ce_keep_ratio, args.ce_start_epoch, args.ce_warm_epochs)
        set_step_decay(optimizer, epoch, args)
        stats = train_one_epoch(model, step, loader, optimizer, epoch, args, scaler, log_writer=log_writer)
        names = ['last']
        if (epoch + 1) % args.save_freq == 0 or epoch + 1 == args.epochs:
            names.append(str(epoch))
        save_checkpoint(args, epoch, model, optimizer, scaler, names)
        row = {**{f'train_{k}': v for k, v in stats.items()}, 'train_keep_ratio': keep['ratio'], 'epoch': epoch,
               'n_parameters': n_parameters}
        last = epoch + 1 == args.epochs
        if eval_seqs and dist.is_main_process() and (last or (args.eval_freq and (epoch + 1) % args.eval_freq == 0)):
            results, fps = run_eval(model, eval_seqs, args)
            row.update({f'test_{k}': v for k, v in results['overall'].items()}, test_fps=fps)
            log.info(f'epoch {epoch}: OPE on {len(eval_seqs)} sequences: AUC {results["overall"]["auc"]:.1f}  '
                     f'P@20 {results["overall"]["precision"]:.1f}  Pnorm {results["overall"]["norm_precision"]:.1f} '
                     f' ({fps:.0f} fps)')
        dist.barrier()
        write_epoch_log(args.output_dir, row)
    log.info(f'training time {time.strftime("%H:%M:%S", time.gmtime(time.time() - start))}')
    if log_writer is not None:
        log_writer.close()
    dist.cleanup()
    return model_without_ddp, results


if __name__ == '__main__':
    args = get_args_parser().parse_args()
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    main(args)
