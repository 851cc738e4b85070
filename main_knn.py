"""Weighted k-NN classification on the features of a frozen ViT (no training).

  # demo: the embedded digits; random-init baseline, then the encoder of a demo MAE (python main_pretrain.py)
  python main_knn.py --output_dir ./output_knn_random
  python main_knn.py --finetune ./output_dir/checkpoint-last.pth --output_dir ./output_knn
  # MAE-Lite ViT-Tiny on ImageNet-1k, 8 GPUs; features cached so a rerun with other --nb_knn / --temperature is instant
  torchrun --nproc_per_node 8 main_knn.py --model vit_tiny_patch16 --finetune mae_tiny_400e.pth \
      --data_path /data/imagenet --feature_cache ./knn_features

Every train and val image is encoded once (centre crop, no augmentation); features are L2-normalised and gathered
from all processes; each val image takes the k most cosine-similar train images, each voting for its class with
weight exp(sim / T). One run reports every k in --nb_knn. Results: a table in the log and one JSON line in
output_dir/log.txt. Inference only, so the recipe order stops after loading the weights: no DDP, optimizer, resume
or epoch loop. Expect low numbers for MAE encoders: MAE features are not trained to cluster by class (MAE-priv,
ViT-S 400 epochs: 20.8 % k-NN vs 77.6 % fine-tuned); contrastive encoders (DINO, MoCo-v3) do far better here.

References:
  Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance Discrimination", CVPR 2018 (weighted k-NN).
  DINO - Caron et al., ICCV 2021 (T = 0.07, k in {10, 20, 100, 200}); its test chunking divides by zero below
         100 test images, which this version does not.
  MAE-priv - k-NN evaluation of MAE encoders (GAP or cls features).
"""
import argparse
import logging
import os

import torch
import torch.nn.functional as F

from util import dist
from util.args import channel_parser, common_parser, fill_defaults
from util.checkpoint import atomic_save
from util.data import SafeImageFolder, build_loader, channel_stats, dataset_root, eval_transform, num_classes
from util.engine import autocast
from util.evaluate import shard_len
from util.features import (build_frozen_encoder, check_feature, check_probe_args, checkpoint_layout,
                           extract_features, read_state_dict)
from util.logger import MetricLogger, setup_logging, write_epoch_log
from util.rng import seed_everything

log = logging.getLogger('mim')

DEFAULTS = dict(model='vit_tiny_patch16', input_size=224, batch_size=256)
DEMO_DEFAULTS = dict(model='vit_demo_patch4', input_size=32, batch_size=128)


def get_args_parser():
    p = argparse.ArgumentParser('k-NN evaluation', parents=[common_parser(), channel_parser()])
    g = p.add_argument_group('k-NN')
    g.add_argument('--model', default=None,
                   help=f'ViT factory in models_vit.py (default {DEFAULTS["model"]}; {DEMO_DEFAULTS["model"]} on '
                        'the demo data), or a Swin in models_swin.py (swin_tiny, swin_demo) or a PVT in models_pvt.py '
                        '(pvt_small, pvt_demo), both with --feature avg')
    g.add_argument('--finetune', default='',
                   help='weights to evaluate (an MAE checkpoint of main_pretrain, any released layout). Empty = '
                        'random initialisation, a baseline')
    g.add_argument('--feature', default='token', choices=['token', 'avg'],
                   help="'token': cls token after the final norm; 'avg': mean of the patch tokens after the final "
                        'norm (MAE-priv). Warned about when it does not match the weights')
    g.add_argument('--nb_knn', type=int, nargs='+', default=[10, 20, 100, 200],
                   help='numbers of neighbours, all reported by one run (each clipped to the train-set size)')
    g.add_argument('--temperature', type=float, default=0.07, help='vote weight exp(similarity / T) (DINO)')
    g.add_argument('--knn_chunk', type=int, default=256,
                   help='val images per similarity matrix ([chunk, n_train] floats in memory at a time)')
    g.add_argument('--feature_cache', default='',
                   help='folder to save features in and load them from (reused only when model, weights, feature, '
                        'input size and data match)')
    g.add_argument('--nb_classes', type=int, default=None, help='default: the number of class folders')
    return p


@torch.no_grad()
def knn_classify(train_feats, train_labels, test_feats, num_classes, k, T=0.07, chunk=256, test_labels=None):
    """Weighted k-NN: the k most similar train features vote for their classes with weight exp(sim / T).

    Args:
        train_feats: [N, D] and test_feats [M, D], L2-normalised (so the dot product is the cosine similarity).
        train_labels: [N] long; test_labels: [M] long, optional (for the accuracies).
        num_classes: C; k: neighbours, clipped to N; T: temperature.
        chunk: test rows per similarity matrix; any M works, also M < chunk.
    Returns: dict(pred=[M, min(5, k, C)] classes by decreasing vote, k=the k used, top1/top5 in % (None without
        test_labels)). Top-5 counts a hit among the first min(5, k) predictions, as DINO.
    """
    n = train_feats.shape[0]
    if n == 0:
        raise ValueError('k-NN needs at least one train feature')
    k = min(k, n)
    n_pred = min(5, k, num_classes)
    preds = []
    for start in range(0, test_feats.shape[0], chunk):
        sim = test_feats[start:start + chunk] @ train_feats.T  # [m, N]
        top_sim, top_idx = sim.topk(k, dim=1)  # [m, k]
        weights = (top_sim / T).exp()  # [m, k]
        votes = torch.zeros(sim.shape[0], num_classes, dtype=weights.dtype, device=weights.device)  # [m, C]
        votes.scatter_add_(1, train_labels[top_idx], weights)  # per-class sum of the neighbours' weights
        preds.append(votes.topk(n_pred, dim=1).indices)  # [m, n_pred]
    pred = torch.cat(preds) if preds else torch.zeros(0, n_pred, dtype=torch.long, device=test_feats.device)
    out = dict(pred=pred, k=k, top1=None, top5=None)
    if test_labels is not None and len(test_labels):
        hit = pred == test_labels[:, None].to(pred.device)  # [M, n_pred]
        out['top1'] = 100 * hit[:, 0].float().mean().item()
        out['top5'] = 100 * hit.any(dim=1).float().mean().item()
    return out


@torch.no_grad()
def compute_features(encoder, loader, args, header):
    """L2-normalised features [len(dataset), D] and labels [len(dataset)] of a loader, gathered over all ranks."""
    feats, labels = [], []
    for images, targets, _ in MetricLogger(header=header).log_every(loader, args.print_freq):
        if images.shape[0] == 0:
            continue
        with autocast(args):
            f = extract_features(encoder, images.to(args.device, non_blocking=True), args.feature)  # [B, D]
        feats.append(F.normalize(f.float(), dim=1))
        labels.append(targets.to(args.device))
    feats = torch.cat(feats) if feats else torch.zeros(0, encoder.embed_dim, device=args.device)
    labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=args.device)
    n = shard_len(loader)
    if n is not None:  # drop the sampler's padding repeats, so each image counts once
        feats, labels = feats[:n], labels[:n]
    return dist.all_gather_cat(feats), dist.all_gather_cat(labels)  # [N, D], [N]


def cached_features(encoder, loader, args, split):
    """compute_features, through --feature_cache when set: a cache computed for other settings is recomputed."""
    if not args.feature_cache:
        return compute_features(encoder, loader, args, f'features {split}')
    finetune = os.path.abspath(args.finetune) if args.finetune else ''
    meta = dict(model=args.model, finetune=finetune,
                finetune_mtime=os.path.getmtime(finetune) if finetune else 0.0, feature=args.feature,
                input_size=args.input_size, root=os.path.abspath(loader.dataset.root), n=len(loader.dataset),
                in_chans=args.in_chans, mean=args.mean, std=args.std)
    path = os.path.join(args.feature_cache, f'{split}.pth')
    if os.path.isfile(path):
        cache = torch.load(path, map_location='cpu', weights_only=True)
        if cache.get('meta') == meta:
            log.info(f'{split} features from {path}')
            return cache['feats'].to(args.device), cache['labels'].to(args.device)
        log.warning(f'{path} holds features of {cache.get("meta")}, not {meta}: recomputing')
    feats, labels = compute_features(encoder, loader, args, f'features {split}')
    if dist.is_main_process():
        os.makedirs(args.feature_cache, exist_ok=True)
        atomic_save(dict(feats=feats.cpu(), labels=labels.cpu(), meta=meta), path)
    return feats, labels


def main(args):
    dist.init_distributed_mode(args)
    setup_logging(args.rank, args.output_dir)
    fill_defaults(args, DEFAULTS, DEMO_DEFAULTS)
    seed_everything(args.seed + args.rank)

    mean, std = channel_stats(args.in_chans, args.mean, args.std)
    transform = eval_transform(args.input_size, mean=mean, std=std, in_chans=args.in_chans)
    train_set = SafeImageFolder(dataset_root(args.data_path, 'train'), transform, args.in_chans)
    val_set = SafeImageFolder(dataset_root(args.data_path, 'val'), transform, args.in_chans)
    args.nb_classes = num_classes(train_set, val_set, args.nb_classes)
    train_loader = build_loader(train_set, args.batch_size, args.num_workers, args.pin_mem, train=False)
    val_loader = build_loader(val_set, args.batch_size, args.num_workers, args.pin_mem, train=False)

    state = read_state_dict(args.finetune) if args.finetune else None
    layout = checkpoint_layout(state)
    encoder = build_frozen_encoder(args.model, args.input_size, state, layout, args.in_chans).to(args.device)
    check_probe_args(encoder, args.feature, None)
    check_feature(layout, args.feature, args.finetune)
    log.info(f'{args.model} ({sum(p.numel() for p in encoder.parameters()) / 1e6:.2f}M), feature {args.feature!r}; '
             f'{args.nb_classes} classes; train {len(train_set)} / val {len(val_set)} images; '
             f'k {args.nb_knn}, T {args.temperature}')

    train_feats, train_labels = cached_features(encoder, train_loader, args, 'train')
    test_feats, test_labels = cached_features(encoder, val_loader, args, 'val')

    metrics = dict(n_train=train_feats.shape[0], n_test=test_feats.shape[0], feature=args.feature,
                   temperature=args.temperature, finetune=args.finetune)
    lines = [f'{"k":>6} {"k used":>7} {"top-1":>7} {"top-5":>7}']
    for k in args.nb_knn:
        r = knn_classify(train_feats, train_labels, test_feats, args.nb_classes, k, args.temperature,
                         args.knn_chunk, test_labels)
        metrics.update({f'test_knn{k}_acc1': r['top1'], f'test_knn{k}_acc5': r['top5'], f'knn{k}_k_used': r['k']})
        lines.append(f'{k:>6} {r["k"]:>7} {r["top1"]:>7.2f} {r["top5"]:>7.2f}')
    log.info(f'weighted k-NN (T {args.temperature}) on {metrics["n_test"]} val images, '
             f'{metrics["n_train"]} train images:\n' + '\n'.join(lines))
    write_epoch_log(args.output_dir, metrics)
    dist.cleanup()
    return metrics


if __name__ == '__main__':
    args = get_args_parser().parse_args()
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    main(args)
