"""Analysis and visualisation of pre-trained encoders: MAE reconstructions, attention distance and entropy, layer-wise
CKA, attention rollout and training curves. One sub-command per figure; each writes a PNG plus the raw numbers
(.npy and a .json) to --output_dir.

  # demo: a demo MAE first (python main_pretrain.py --output_dir output_dir/demo_mae), then
  python main_analyze.py recon --weights output_dir/demo_mae/checkpoint-last.pth
  python main_analyze.py attn_stats --weights output_dir/demo_mae/checkpoint-last.pth
  python main_analyze.py cka --weights output_dir/demo_mae/checkpoint-last.pth          # the model with itself
  python main_analyze.py rollout --weights output_dir/demo_mae/checkpoint-last.pth
  python main_analyze.py curves --logs output_dir/demo_mae                              # a run folder or log.txt
  # ImageNet: MAE-Lite Tiny vs its D²-MAE student, attention statistics of both on 1024 val images (GPU)
  python main_analyze.py attn_stats --data_path /data/imagenet --model vit_tiny_patch16 \
      --weights mae_tiny_400e.pth d2mae_tiny_400e.pth --labels MAE D2-MAE --output_dir ./analysis
  python main_analyze.py cka --data_path /data/imagenet --model vit_tiny_patch16 --weights mae_tiny_400e.pth \
      --weights_b d2mae_tiny_400e.pth --output_dir ./analysis

Weights go through util/pretrained.load_pretrained (any released layout). The architecture comes from --model, else
from the 'model' saved in our checkpoints' args (an MAE factory name maps to its encoder's ViT: mae_vit_tiny_patch16
-> vit_tiny_patch16). `recon` needs a full pre-training checkpoint (encoder + decoder, main_pretrain.py's
checkpoint-*.pth); the other commands take any encoder (MAE, distilled, fine-tuned classifier).
Inference only: no distributed launch, no optimizer; images are centre-cropped (the recipes' eval transform).
Input channels (--in_chans, --mean, --std) default to those saved with the first checkpoint: 1-channel inputs are
read as greyscale and shown in grey; inputs of other channel counts (.npy arrays) show their channel 0 in grey,
min-max scaled per image.

References:
  MAE       - He et al., CVPR 2022 (reconstruction figures; norm-pix targets).
  MAE-Lite  - Wang et al., "A Closer Look at Self-Supervised Lightweight Vision Transformers", ICML 2023
              (attention distance / entropy box plots per depth, layer-wise CKA heat-maps).
  MAE-priv  - attention rollout with head fusion and discard ratio (after Abnar & Zuidema, ACL 2020).
  Nguyen et al., ICLR 2021 - minibatch CKA with the unbiased HSIC.
"""
import argparse
import functools
import inspect
import json
import logging
import math
import os

import matplotlib
matplotlib.use('Agg')  # files only, no display needed
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: E402

import masking  # noqa: E402
import models_mae  # noqa: E402
import models_swin  # noqa: E402
from util import analysis  # noqa: E402
from util.args import channel_parser, common_parser, fill_defaults  # noqa: E402
from util.checkpoint import load_file  # noqa: E402
from util.data import (IMG_EXTENSIONS, NPY_EXTENSIONS, SafeImageFolder, build_loader, channel_stats,  # noqa: E402
                       dataset_root, eval_transform, is_array_input, read_image)
from util.dist import resolve_device  # noqa: E402
from util.engine import autocast  # noqa: E402
from util.features import build_frozen_encoder, checkpoint_layout  # noqa: E402
from util.logger import setup_logging  # noqa: E402
from util.pretrained import load_pretrained, strip_prefixes, unwrap_state_dict  # noqa: E402
from util.rng import seed_everything  # noqa: E402

log = logging.getLogger('mim')

DEFAULTS = dict(input_size=224, batch_size=64)
DEMO_DEFAULTS = dict(input_size=32, batch_size=128)
DEFAULT_MODELS = dict(vit='vit_tiny_patch16', mae='mae_vit_tiny_patch16')
DEMO_MODELS = dict(vit='vit_demo_patch4', mae='mae_vit_demo_patch4')
FUSIONS = ('mean', 'max', 'min')


def get_args_parser():
    p = argparse.ArgumentParser('Analysis and visualisation')
    sub = p.add_subparsers(dest='command', required=True, metavar='COMMAND')

    def model_parser(name, help, weights_nargs=None, weights_help=None, model_help=None):
        s = sub.add_parser(name, help=help, parents=[common_parser(), channel_parser()], description=help)
        s.set_defaults(output_dir='./output_analyze', in_chans=None)  # None: as the checkpoint was trained
        g = s.add_argument_group(name)
        g.add_argument('--weights', '--finetune', dest='weights', nargs=weights_nargs, default=None,
                       help=weights_help or 'checkpoint to analyse, any layout util/pretrained.py loads (MAE, '
                                            'distilled, fine-tuned); empty = random initialisation (a baseline)')
        g.add_argument('--model', default=None,
                       help=model_help or 'ViT factory in models_vit.py (default: the model saved in the '
                                          'checkpoint\'s args, mae_ prefix dropped; else '
                                          f'{DEFAULT_MODELS["vit"]}, {DEMO_MODELS["vit"]} on the demo data)')
        return s, g

    s, g = model_parser('recon', 'MAE reconstructions: original / masked / reconstruction / reconstruction with the '
                                 'visible patches pasted in',
                        weights_help='a full pre-training checkpoint with the decoder (main_pretrain.py\'s '
                                     'checkpoint-last.pth); encoder-only weights are refused',
                        model_help='MAE factory in models_mae.py (default: the model saved in the checkpoint\'s '
                                   f'args, else {DEFAULT_MODELS["mae"]}, {DEMO_MODELS["mae"]} on the demo data)')
    g.add_argument('--images', nargs='+', default=None,
                   help='image files or folders (default: --num_images images spread over the val split)')
    g.add_argument('--num_images', type=int, default=8, help='images in the grid (one row each)')
    g.add_argument('--mask_ratio', type=float, default=0.75, help='fraction of patches removed')
    g.add_argument('--decoder_order', default='pqc', choices=['pqc', 'cpq'],
                   help="pixel order of the checkpoint's decoder head: pqc (official MAE, MAE-Lite, this repo) or "
                        'cpq (MAE-priv, converted on loading)')
    g.add_argument('--norm_pix_loss', action=argparse.BooleanOptionalAction, default=None,
                   help='whether the model predicts norm-pix targets (default: as saved in the checkpoint\'s args, '
                        'else on). Norm-pix predictions are shown in two modes, "oracle" and "estimated"')

    s, g = model_parser('attn_stats', 'attention distance and entropy per head per block (box plots per depth)',
                        weights_nargs='+', weights_help='one or more checkpoints, compared side by side (any layout '
                                                        'util/pretrained.py loads; \'\' = random initialisation)')
    g.add_argument('--labels', nargs='+', default=None, help='one legend label per --weights (default: file names)')
    g.add_argument('--num_images', type=int, default=1024,
                   help='val images averaged over (capped by the data set; MAE-Lite uses ~1024)')
    g.add_argument('--ml_compat', action='store_true',
                   help='multiply grid distances by 14 as MAE-Lite\'s plots do, instead of the true patch size')

    s, g = model_parser('cka', 'linear CKA between the depth-wise representations of two models (or one model '
                               'with itself), minibatch unbiased HSIC')
    g.add_argument('--weights_b', default=None, help='second model\'s checkpoint (default: the same as --weights)')
    g.add_argument('--model_b', default=None, help='second model\'s factory (default: as for --model)')
    g.add_argument('--labels', nargs=2, default=None, help='axis labels of the two models (default: file names)')
    g.add_argument('--num_images', type=int, default=1024,
                   help='val images (capped by the data set); HSIC is estimated per --batch_size minibatch and '
                        'averaged, so use batches of a few hundred on real data')

    s, g = model_parser('rollout', 'attention rollout of the cls token, overlaid on the image')
    g.add_argument('--images', nargs='+', default=None,
                   help='image files or folders (default: --num_images images spread over the val split)')
    g.add_argument('--num_images', type=int, default=6, help='images in the figure (one row each)')
    g.add_argument('--head_fusion', nargs='+', default=list(FUSIONS), choices=FUSIONS,
                   help='how heads are fused per block; one figure column each')
    g.add_argument('--discard_ratio', type=float, default=0.9,
                   help='fraction of the weakest patch attentions of each row set to 0 (the cls column is kept)')

    s = sub.add_parser('curves', help='training curves of one or several log.txt files',
                       description='loss, lr and eval metrics against epoch from log.txt JSON lines')
    s.add_argument('--logs', nargs='+', required=True, help='log.txt files or the run folders holding them')
    s.add_argument('--labels', nargs='+', default=None, help='one legend label per log (default: folder names)')
    s.add_argument('--keys', nargs='+', default=None,
                   help='metrics to plot without their train_/test_ prefix, e.g. loss lr acc1 (default: every '
                        'numeric key that is not zero throughout)')
    s.add_argument('--output_dir', default='./output_analyze', help='curves.png and curves.json go here')
    return p


# ------------------------------------------------------------------------------------------------- loading

@functools.lru_cache(maxsize=4)
def read_checkpoint(path):
    """(raw checkpoint object, flat prefix-stripped state dict, saved args dict or {}); cached, as the input size and
    the model are both read from the same file. Treat the result as read-only."""
    raw = load_file(path)
    saved = raw.get('args') if isinstance(raw, dict) else None
    return raw, strip_prefixes(unwrap_state_dict(raw)), saved if isinstance(saved, dict) else {}


def demo(args):
    return not getattr(args, 'data_path', '')


def encoder_name(model, saved, args):
    """The ViT factory for an encoder: --model, else the checkpoint's saved model name (an MAE factory maps to its
    encoder: mae_vit_tiny_patch16 -> vit_tiny_patch16; the D² 13th block is dropped by the loader), else default."""
    name = model or saved.get('model')
    if not name:
        return (DEMO_MODELS if demo(args) else DEFAULT_MODELS)['vit']
    return name.removeprefix('mae_').replace('_d13', '')


def load_encoder(path, model, args):
    """A frozen models_vit ViT (no head) with the weights of `path` ('' or None = random init), on args.device."""
    raw, sd, saved = read_checkpoint(path) if path else (None, None, {})
    name = encoder_name(model, saved, args)
    encoder = build_frozen_encoder(name, args.input_size, state=raw, layout=checkpoint_layout(sd),
                                   in_chans=args.in_chans or 3)
    if not path:
        log.warning(f'{name}: no weights given, randomly initialised (a baseline)')
    return encoder.to(args.device), name


def build_masked_autoencoder(name, **kwargs):
    """A ViT MAE of models_mae or a UM-MAE Swin of models_swin, by name.

    What `recon` uses of it: mask units of `patch_embed.patch_size` px on `patch_embed.grid_size` (UM-MAE's Swin:
    `unit_size` px on a `unit_grid` square), predictions in (p, q, c) order, `norm_pix_loss`, and
    `forward(imgs, mask_ratio[, noise]) -> (loss, pred [N, L, P], mask [N, L])`, seeded through the global RNG
    when it takes no noise."""
    if models_swin.has_model(name):
        return models_swin.create_model(name, **kwargs)
    return models_mae.create_model(name, **kwargs)  # raises with the list of valid names


def has_decoder(sd):
    return any(k.startswith('decoder_pred.') for k in sd)


def load_masked_autoencoder(path, args):
    """The full MAE (encoder + decoder) of a pre-training checkpoint; refuses encoder-only weights."""
    if not path:
        raise ValueError('recon needs --weights: a full pre-training checkpoint (encoder + decoder)')
    raw, sd, saved = read_checkpoint(path)
    if not has_decoder(sd):
        raise ValueError(
            f'{path} holds encoder weights only (no decoder_* keys), so it cannot reconstruct pixels. Reconstruction '
            'needs the full pre-training checkpoint with the decoder: checkpoint-last.pth or checkpoint-<epoch>.pth '
            'in the output_dir of main_pretrain.py (or main_distill.py\'s checkpoint-last.pth for an MAE student), '
            'not main_distill\'s checkpoint-encoder.pth, a fine-tuned model or an encoder-only release.')
    name = args.model or saved.get('model') or (DEMO_MODELS if demo(args) else DEFAULT_MODELS)['mae']
    norm_pix = args.norm_pix_loss
    if norm_pix is None:
        norm_pix = saved.get('norm_pix_loss')
        if norm_pix is None:
            norm_pix = True
            log.warning(f'{path}: the checkpoint does not say whether it used norm-pix targets; assuming it did '
                        '(pass --no-norm_pix_loss otherwise)')
    kwargs = dict(img_size=args.input_size, norm_pix_loss=bool(norm_pix))
    fill_channels(args, [path])
    if args.in_chans != 3:
        kwargs['in_chans'] = args.in_chans
    if saved.get('depth'):
        kwargs['depth'] = saved['depth']  # e.g. a D²-MAE student with its extra block
    model = build_masked_autoencoder(name, **kwargs)
    if getattr(args, 'decoder_order', 'pqc') == 'cpq':  # MAE-priv: its decoder predicts (c, p, q)-ordered pixels
        raw = dict(sd)
        for k in ('decoder_pred.weight', 'decoder_pred.bias'):
            raw[k] = models_mae.cpq_to_pqc(raw[k], model.patch_size, model.in_chans)
    load_pretrained(model, raw, keep_decoder=True)
    return model.to(args.device).eval(), name


def stored_input_size(saved, sd):
    """The input size a checkpoint was trained at: its saved args, else the position-embedding grid times the patch
    size (square inputs). None when neither says."""
    if saved.get('input_size'):
        return int(saved['input_size'])
    pos, proj = sd.get('pos_embed'), sd.get('patch_embed.proj.weight')
    if pos is None or proj is None or proj.dim() != 4:
        return None
    n = pos.shape[1]
    side = math.isqrt(n) if math.isqrt(n) ** 2 == n else math.isqrt(n - 1)  # with or without the cls row
    return side * proj.shape[-1]


def fill_channels(args, paths):
    """--in_chans, else the first checkpoint's (its saved args, else its patch-embedding weight), else 3; --mean and
    --std, else as saved with that channel count (else the defaults of util.data.channel_stats)."""
    saved = {}
    if args.in_chans is None:
        for path in [p for p in paths if p]:
            _, sd, saved = read_checkpoint(path)
            proj = sd.get('patch_embed.proj.weight')
            args.in_chans = saved.get('in_chans') or (proj.shape[1] if proj is not None and proj.dim() == 4 else None)
            if args.in_chans:
                break
        args.in_chans = args.in_chans or 3
    if args.mean is None and args.std is None and len(saved.get('mean') or ()) == args.in_chans:
        args.mean, args.std = saved['mean'], saved['std']


def fill_input_size(args, paths):
    """--input_size, else the first checkpoint's own input size, else the (demo) default; the input channels and
    their statistics too (`fill_channels`)."""
    fill_channels(args, paths)
    if args.input_size is None:
        for path in paths:
            if path:
                _, sd, saved = read_checkpoint(path)
                args.input_size = stored_input_size(saved, sd)
                if args.input_size:
                    log.info(f'input size {args.input_size}, as {path} was trained')
                    break
    fill_defaults(args, DEFAULTS, DEMO_DEFAULTS)


# ------------------------------------------------------------------------------------------------- data

def list_images(items, extensions=IMG_EXTENSIONS):
    """Image files (or .npy arrays: `extensions`) from a list of files and folders (folders searched recursively,
    sorted)."""
    files = []
    for item in items:
        if os.path.isdir(item):
            for root, _, names in sorted(os.walk(item)):
                files += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(extensions)]
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise FileNotFoundError(f'no such image or folder: {item}')
    if not files:
        raise ValueError(f'no images found in {items}')
    return files


def load_images(args):
    """[N, C, H, W] normalised images for the figure commands: --images, else --num_images spread over the val
    split (evenly spaced indices, so the demo shows many different digits)."""
    mean, std = channel_stats(args.in_chans, args.mean, args.std)
    transform = eval_transform(args.input_size, mean=mean, std=std, in_chans=args.in_chans)
    if args.images:
        extensions = NPY_EXTENSIONS if is_array_input(args.in_chans) else IMG_EXTENSIONS
        files = list_images(args.images, extensions)[:args.num_images]
        imgs = []
        for f in files:
            img = read_image(f, args.in_chans)
            if img is None:
                raise ValueError(f'cannot read {f} as a {args.in_chans}-channel input (see the warning above)')
            imgs.append(transform(img))
        return torch.stack(imgs).to(args.device), files
    dataset = SafeImageFolder(dataset_root(args.data_path, 'val'), transform, args.in_chans)
    n = min(args.num_images, len(dataset))
    idx = np.linspace(0, len(dataset) - 1, n).round().astype(int).tolist()
    items = [dataset[i] for i in idx]
    kept = [(i, it) for i, it in zip(idx, items) if it is not None]
    return torch.stack([it[0] for _, it in kept]).to(args.device), [dataset.samples[i][0] for i, _ in kept]


def val_loader(args):
    """Loader over a seeded random subset of --num_images val images (fixed order, same for every model)."""
    mean, std = channel_stats(args.in_chans, args.mean, args.std)
    dataset = SafeImageFolder(dataset_root(args.data_path, 'val'),
                              eval_transform(args.input_size, mean=mean, std=std, in_chans=args.in_chans),
                              args.in_chans)
    n = min(args.num_images, len(dataset))
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))[:n].sort().values
    subset = torch.utils.data.Subset(dataset, idx.tolist())
    return build_loader(subset, args.batch_size, args.num_workers, args.pin_mem, train=False), n


def to_display(imgs, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
    """Normalised [N, C, H, W] -> [N, H, W, 3] floats in [0, 1] for imshow: RGB, and 1-channel inputs as grey,
    un-normalised with the `mean`/`std` of the eval transform; any other channel count (.npy inputs) shows its
    channel 0 in grey, min-max scaled per image."""
    C = imgs.shape[1]
    if C in (1, 3):
        mean = torch.tensor(mean, device=imgs.device).view(1, C, 1, 1)
        std = torch.tensor(std, device=imgs.device).view(1, C, 1, 1)
        imgs = (imgs * std + mean).expand(-1, 3, -1, -1)  # grey: the one channel as R, G and B
    else:
        imgs = imgs[:, :1].expand(-1, 3, -1, -1)
        lo = imgs.amin(dim=(1, 2, 3), keepdim=True)
        imgs = (imgs - lo) / (imgs.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp(min=1e-8)
    return imgs.clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()


def iter_block_attention(encoder, images):
    """Run a ViT block by block, yielding (block index, pre-softmax logits [N, H, L, L]); one block's logits are held
    at a time (all twelve of a ViT-Tiny batch would take GBs)."""
    x = encoder.embed(images)  # [N, 1+L, D]
    for i, blk in enumerate(encoder.blocks):
        extras = {}
        x = blk(x, extras)
        yield i, extras['logits']


def save_json(obj, path):
    with open(path, 'w') as f:
        json.dump(obj, f, indent=1)


def run_label(path):
    """A short legend label for a checkpoint, log file or run folder: the folder name, plus the file stem unless
    it is log.txt or checkpoint-last.pth."""
    if not path:
        return 'random init'
    path = os.path.normpath(path)
    if os.path.isdir(path):
        return os.path.basename(path)
    folder = os.path.basename(os.path.dirname(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    if stem in ('log', 'checkpoint-last') and folder:
        return folder
    return f'{folder}/{stem}' if folder else stem


# ------------------------------------------------------------------------------------------------- recon

def mask_units(model):
    """(unit size in px, unit grid (h, w)) of a masked autoencoder: a ViT MAE masks its patches, UM-MAE's Swin
    masks units of several tokens (16 px for Swin-T)."""
    if hasattr(model, 'unit_size'):
        return model.unit_size, (model.unit_grid, model.unit_grid)
    return model.patch_embed.patch_size[0], tuple(model.patch_embed.grid_size)


@torch.no_grad()
def reconstruct(model, imgs, mask_ratio, seed):
    """Masked reconstruction with a seeded mask. Returns a dict of [N, C, H, W] images per column, the column
    titles, mask [N, L] and per-mode MSE on the masked patches (normalised-pixel units), plus that of a flat
    baseline (each removed patch filled with the mean estimated from the visible patches).

    Columns: 'original', 'masked', then per mode ('pixels', or 'oracle' and 'estimated' for norm-pix models)
    'reconstruction' and 'reconstruction + visible' (the input pasted into the visible patches, bit-exact)."""
    N, C = imgs.shape[:2]
    p, grid = mask_units(model)
    L = grid[0] * grid[1]
    noise = masking.random_noise(N, L, generator=torch.Generator().manual_seed(seed)).to(imgs.device)  # [N, L]
    with torch.random.fork_rng(devices=[]):  # a model drawing more randomness (UM's secondary mask) stays seeded
        torch.manual_seed(seed)
        if 'noise' in inspect.signature(model.forward).parameters:
            _, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
        else:
            _, pred, mask = model(imgs, mask_ratio=mask_ratio)
    pred, mask = pred.float(), mask.float()  # [N, L, P], [N, L]
    patches = models_mae.patchify(imgs, p)  # [N, L, P]

    def unpatchify(x):  # [N, L, P] -> [N, C, H, W]
        return models_mae.unpatchify(x, p, C)

    masked_patches = patches * (1 - mask[..., None])  # removed patches zeroed; shown grey below
    cols = {'original': imgs, 'masked': unpatchify(masked_patches)}
    modes = ['oracle', 'estimated'] if model.norm_pix_loss else ['pixels']
    mse = {}
    for mode in modes:
        rec = analysis.unnormalize_prediction(pred, patches, mask, grid, mode)  # [N, L, P] pixels
        err = ((rec - patches) ** 2).mean(dim=-1)  # [N, L]
        mse[mode] = float((err * mask).sum() / mask.sum().clamp(min=1))
        tag = '' if mode == 'pixels' else f' ({mode})'
        cols[f'reconstruction{tag}'] = unpatchify(rec)
        cols[f'reconstruction + visible{tag}'] = unpatchify(analysis.paste_visible(rec, patches, mask))
    # a yardstick: each removed patch filled flat with the mean estimated from the visible patches
    est_mean, _ = analysis.estimate_patch_stats(*analysis.patch_stats(patches), mask, grid)  # [N, L, 1]
    err = ((est_mean - patches) ** 2).mean(dim=-1)  # [N, L]
    mse['flat baseline'] = float((err * mask).sum() / mask.sum().clamp(min=1))
    pixel_mask = unpatchify(mask[..., None].expand_as(patches))  # [N, C, H, W], 1 = removed
    return dict(columns=cols, mask=mask, pixel_mask=pixel_mask, mse=mse, modes=modes)


def cmd_recon(args):
    fill_input_size(args, [args.weights])
    model, name = load_masked_autoencoder(args.weights, args)
    imgs, files = load_images(args)
    out = reconstruct(model, imgs, args.mask_ratio, args.seed)
    shown = {}
    for title, x in out['columns'].items():
        d = to_display(x, *channel_stats(args.in_chans, args.mean, args.std))  # [N, H, W, 3]
        if title == 'masked':  # removed patches in mid grey, visibly not part of the image
            m = out['pixel_mask'][:, :1].permute(0, 2, 3, 1).cpu().numpy()  # [N, H, W, 1]
            d = d * (1 - m) + 0.5 * m
        shown[title] = d
    titles = list(shown)
    n = imgs.shape[0]
    fig, axes = plt.subplots(n, len(titles), figsize=(1.3 * len(titles), 1.3 * n + 1.0), squeeze=False,
                             layout='constrained')
    for c, t in enumerate(titles):
        for r in range(n):
            axes[r, c].imshow(shown[t][r], interpolation='nearest')
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[0, c].set_title(t.replace(' + ', '\n+ ').replace(' (', '\n('), fontsize=8)
    note = ('norm-pix model - "oracle": un-normalised with the true patch mean/std (flattering); '
            '"estimated": from the visible patches only' if model.norm_pix_loss else 'pixel-target model')
    mse = ', '.join(f'{k} {v:.3f}' for k, v in out['mse'].items())
    fig.suptitle(f'{name}, mask ratio {args.mask_ratio}, seed {args.seed}\n{note}\nMSE on masked patches: {mse}',
                 fontsize=8)
    png = os.path.join(args.output_dir, 'recon.png')
    fig.savefig(png, dpi=80)
    plt.close(fig)
    np.save(os.path.join(args.output_dir, 'recon_images.npy'), np.stack([shown[t] for t in titles], axis=1))
    np.save(os.path.join(args.output_dir, 'recon_mask.npy'), out['mask'].cpu().numpy())
    save_json(dict(model=name, weights=args.weights, mask_ratio=args.mask_ratio, seed=args.seed, columns=titles,
                   modes=out['modes'], mse_masked=out['mse'], images=files,
                   arrays={'recon_images.npy': '[N, columns, H, W, 3] as shown',
                           'recon_mask.npy': '[N, L] 1 = removed'}),
              os.path.join(args.output_dir, 'recon.json'))
    log.info(f'recon: {png} ({n} images; masked-patch MSE {mse})')
    return dict(png=png, **out)


# ------------------------------------------------------------------------------------------------- attn_stats

@torch.no_grad()
def attention_stats(encoder, loader, args):
    """Mean attention distance (pixels) and entropy (nats) per block and head, averaged over queries and images.
    Returns distance, entropy: [depth, H] float64 arrays, and the image count."""
    depth, H = len(encoder.blocks), encoder.blocks[0].attn.num_heads
    grid = encoder.patch_embed.grid_size
    unit = 14 if args.ml_compat else encoder.patch_embed.patch_size[0]
    dist_sum = torch.zeros(depth, H, dtype=torch.float64)
    ent_sum = torch.zeros(depth, H, dtype=torch.float64)
    n = 0
    for images, _, _ in loader:
        if images.shape[0] == 0:
            continue
        images = images.to(args.device)
        with autocast(args):
            for i, logits in iter_block_attention(encoder, images):
                d, e = analysis.attention_distance_entropy(logits.float(), grid, unit)  # [B, H] each
                dist_sum[i] += d.sum(dim=0).cpu()
                ent_sum[i] += e.sum(dim=0).cpu()
        n += images.shape[0]
    return (dist_sum / n).numpy(), (ent_sum / n).numpy(), n


def box_plot(ax, per_model, labels, ylabel, title, reference=None):
    """Box plots over heads, one group per depth, one box per model; heads as dots on top; `reference` a dashed
    line for uniform attention."""
    colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
    m = len(per_model)
    width = 0.8 / m
    for j, (values, label) in enumerate(zip(per_model, labels)):
        depth = values.shape[0]
        pos = np.arange(1, depth + 1) + (j - (m - 1) / 2) * width
        c = colors[j % len(colors)]
        ax.boxplot(list(values), positions=pos, widths=width * 0.8, patch_artist=True, showfliers=False,
                   boxprops=dict(facecolor=c, alpha=0.35, edgecolor=c), medianprops=dict(color=c),
                   whiskerprops=dict(color=c), capprops=dict(color=c))
        jitter = (np.random.default_rng(j).random(values.shape) - 0.5) * width * 0.5
        ax.scatter((pos[:, None] + jitter).ravel(), values.ravel(), s=6, color=c, label=label, zorder=3)
    if reference is not None:
        ax.axhline(reference, color='grey', linestyle='--', linewidth=1, label='uniform attention')
    depth = per_model[0].shape[0]
    ax.set_xticks(np.arange(1, depth + 1), [str(d) for d in range(1, depth + 1)])
    ax.set_xlim(0.4, depth + 0.6)
    ax.set_xlabel('block (depth)')
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis='y', alpha=0.3)


def cmd_attn_stats(args):
    weights = args.weights or ['']
    labels = args.labels or [run_label(w) for w in weights]
    if len(labels) != len(weights):
        raise ValueError(f'--labels needs one label per --weights ({len(weights)}), got {len(labels)}')
    fill_input_size(args, weights)
    loader, n_images = val_loader(args)
    distances, entropies, results, names = [], [], {}, []
    for w, label in zip(weights, labels):
        encoder, name = load_encoder(w, args.model, args)
        names.append(name)
        d, e, n = attention_stats(encoder, loader, args)
        distances.append(d)
        entropies.append(e)
        safe = ''.join(ch if ch.isalnum() or ch in '-_' else '_' for ch in label)
        np.save(os.path.join(args.output_dir, f'attn_distance_{safe}.npy'), d)
        np.save(os.path.join(args.output_dir, f'attn_entropy_{safe}.npy'), e)
        results[label] = dict(weights=w, model=name, images=n, distance=d.tolist(), entropy=e.tolist(),
                              files=[f'attn_distance_{safe}.npy', f'attn_entropy_{safe}.npy'])
        log.info(f'{label}: mean attention distance per block (px) {np.round(d.mean(1), 2).tolist()}; '
                 f'entropy per block {np.round(e.mean(1), 3).tolist()}')
    unit = '14 px per grid step, MAE-Lite\'s convention' if args.ml_compat else 'pixels'
    # what a head attending uniformly to every patch would score: the yardsticks of both panels
    grid, step = encoder.patch_embed.grid_size, 14 if args.ml_compat else encoder.patch_embed.patch_size[0]
    uniform_d = analysis.grid_distances(*grid, unit=step).mean().item()
    uniform_e = -math.log(1 / (grid[0] * grid[1]) + 1e-6)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), layout='constrained')
    box_plot(axes[0], distances, labels, f'mean attention distance ({unit})', 'attention distance per head',
             uniform_d)
    box_plot(axes[1], entropies, labels, 'attention entropy (nats)', 'attention entropy per head', uniform_e)
    axes[1].legend(fontsize=8, loc='lower left')
    fig.suptitle(f'{", ".join(sorted(set(names)))}: {n_images} val images at {args.input_size} px '
                 f'({grid[0]}x{grid[1]} patches); one dot per head', fontsize=9)
    png = os.path.join(args.output_dir, 'attn_stats.png')
    fig.savefig(png, dpi=90)
    plt.close(fig)
    save_json(dict(unit=unit, input_size=args.input_size, num_images=n_images, uniform_distance=uniform_d,
                   uniform_entropy=uniform_e,
                   shape='[depth, heads], averaged over queries and images', models=results),
              os.path.join(args.output_dir, 'attn_stats.json'))
    log.info(f'attn_stats: {png}')
    return dict(png=png, distance=distances, entropy=entropies, num_images=n_images)


# ------------------------------------------------------------------------------------------------- cka

def depth_representations(encoder, images):
    """The input of every block after its norm1, and the final output (after `norm`), cls removed, each [N, L, D]."""
    feats = []
    hooks = [blk.norm1.register_forward_hook(lambda m, inp, out: feats.append(out[:, 1:]))
             for blk in encoder.blocks]
    try:
        out = encoder.forward_features(images)  # [N, 1+L, D]
    finally:
        for h in hooks:
            h.remove()
    return feats + [out[:, 1:]]


@torch.no_grad()
def layer_cka(enc_a, enc_b, loader, args):
    """[depth_a + 1, depth_b + 1] linear CKA over the loader's images, minibatch unbiased HSIC (batches < 4 skipped)."""
    acc = analysis.MinibatchCKA(len(enc_a.blocks) + 1, len(enc_b.blocks) + 1)
    n = 0
    for images, _, _ in loader:
        if images.shape[0] < 4:
            if images.shape[0]:
                log.info(f'cka: skipped a last batch of {images.shape[0]} images (the unbiased HSIC needs 4)')
            continue
        images = images.to(args.device)
        with autocast(args):
            fa = depth_representations(enc_a, images)
            fb = fa if enc_b is enc_a else depth_representations(enc_b, images)
        acc.update(fa, fb)
        n += images.shape[0]
    return acc.compute().numpy(), n


def cmd_cka(args):
    wb = args.weights if args.weights_b is None else args.weights_b
    fill_input_size(args, [args.weights, wb])
    loader, _ = val_loader(args)
    enc_a, name_a = load_encoder(args.weights, args.model, args)
    same = wb == args.weights and (args.model_b or args.model) == args.model
    model_b = args.model_b or args.model or (name_a if not wb else None)  # a random-init baseline: A's architecture
    enc_b, name_b = (enc_a, name_a) if same else load_encoder(wb, model_b, args)
    cka, n = layer_cka(enc_a, enc_b, loader, args)
    la, lb = args.labels or [run_label(args.weights), run_label(wb)]
    ticks = lambda d: [f'b{i}' for i in range(d)] + ['out']  # noqa: E731
    size = 2.2 + 0.35 * max(cka.shape)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    im = ax.imshow(cka, origin='lower', vmin=0, vmax=1, cmap='magma')
    ax.set_xticks(range(cka.shape[1]), ticks(cka.shape[1] - 1), fontsize=8)
    ax.set_yticks(range(cka.shape[0]), ticks(cka.shape[0] - 1), fontsize=8)
    ax.set_xlabel(f'{lb} ({name_b})')
    ax.set_ylabel(f'{la} ({name_a})')
    ax.set_title(f'linear CKA, {n} val images, unbiased HSIC in batches of {args.batch_size}\n'
                 'b<i>: input of block i after its norm1; out: final output', fontsize=9)
    if max(cka.shape) <= 14:  # small enough to print the numbers: near-1 differences are invisible in colour
        for (i, j), v in np.ndenumerate(cka):
            ax.text(j, i, f'{v:.2f}', ha='center', va='center', fontsize=7, color='black' if v > 0.6 else 'white')
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    png = os.path.join(args.output_dir, 'cka.png')
    fig.savefig(png, dpi=90)
    plt.close(fig)
    np.save(os.path.join(args.output_dir, 'cka.npy'), cka)
    save_json(dict(a=dict(label=la, weights=args.weights, model=name_a), b=dict(label=lb, weights=wb, model=name_b),
                   images=n, batch_size=args.batch_size, rows=ticks(cka.shape[0] - 1), cols=ticks(cka.shape[1] - 1),
                   cka=cka.tolist()), os.path.join(args.output_dir, 'cka.json'))
    log.info(f'cka: {png} ({n} images); diagonal {np.round(np.diag(cka), 3).tolist()}')
    return dict(png=png, cka=cka, images=n)


# ------------------------------------------------------------------------------------------------- rollout

@torch.no_grad()
def rollout_maps(encoder, images, fusions, discard_ratio, args):
    """{fusion: [N, h, w] rollout map of the cls token (sums to 1 per image)}."""
    with autocast(args):
        attns = [logits.float().softmax(dim=-1) for _, logits in iter_block_attention(encoder, images)]
    grid = encoder.patch_embed.grid_size
    return {f: analysis.rollout_map(analysis.attention_rollout(attns, f, discard_ratio), grid).float()
            for f in fusions}


def cmd_rollout(args):
    fill_input_size(args, [args.weights])
    encoder, name = load_encoder(args.weights, args.model, args)
    if encoder.global_pool == 'avg':
        log.warning(f'{name}: fine-tuned with global average pooling, so its cls token is not what it classifies '
                    'with; the rollout still shows what the cls token draws on')
    imgs, files = load_images(args)
    maps = rollout_maps(encoder, imgs, args.head_fusion, args.discard_ratio, args)
    shown = to_display(imgs, *channel_stats(args.in_chans, args.mean, args.std))  # [N, H, W, 3]
    n = imgs.shape[0]
    cols = len(maps) + 1
    fig, axes = plt.subplots(n, cols, figsize=(1.6 * cols, 1.6 * n + 0.6), squeeze=False)
    for r in range(n):
        axes[r, 0].imshow(shown[r], interpolation='nearest')
        for c, (f, m) in enumerate(maps.items(), start=1):
            heat = F.interpolate(m[r][None, None], size=imgs.shape[-2:], mode='bilinear', align_corners=False)[0, 0]
            heat = (heat / heat.max().clamp(min=1e-12)).cpu().numpy()
            axes[r, c].imshow(shown[r], interpolation='nearest')
            axes[r, c].imshow(heat, cmap='jet', alpha=0.5, vmin=0, vmax=1)
        for c in range(cols):
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
    axes[0, 0].set_title('image', fontsize=9)
    for c, f in enumerate(maps, start=1):
        axes[0, c].set_title(f'{f} fusion', fontsize=9)
    fig.suptitle(f'attention rollout of the cls token, {name}\ndiscard ratio {args.discard_ratio}', fontsize=9)
    fig.tight_layout()
    png = os.path.join(args.output_dir, 'rollout.png')
    fig.savefig(png, dpi=80)
    plt.close(fig)
    np.save(os.path.join(args.output_dir, 'rollout_maps.npy'), np.stack([m.cpu().numpy() for m in maps.values()]))
    save_json(dict(model=name, weights=args.weights, discard_ratio=args.discard_ratio, fusions=list(maps),
                   images=files, array='rollout_maps.npy: [fusions, N, h, w], each map sums to 1'),
              os.path.join(args.output_dir, 'rollout.json'))
    log.info(f'rollout: {png}')
    return dict(png=png, maps=maps)


# ------------------------------------------------------------------------------------------------- curves

def cmd_curves(args):
    paths = [os.path.join(p, 'log.txt') if os.path.isdir(p) else p for p in args.logs]
    labels = args.labels or [run_label(p) for p in args.logs]
    if len(labels) != len(paths):
        raise ValueError(f'--labels needs one label per log ({len(paths)}), got {len(labels)}')
    runs = {label: analysis.curve_series(analysis.read_log(p)) for label, p in zip(labels, paths)}
    # one panel per metric, train_ and test_ versions together (train solid, test dashed)
    panels = {}
    for series in runs.values():
        for key, (_, ys) in series.items():
            metric = key.split('_', 1)[1] if key.startswith(('train_', 'test_')) else key
            if args.keys is None and all(y == 0 for y in ys):
                continue  # counters that stayed 0 (e.g. skipped steps) carry nothing
            if args.keys is None or metric in args.keys:
                panels.setdefault(metric, set()).add(key)
    if not panels:
        which = f' matching {args.keys}' if args.keys else ''
        raise ValueError(f'nothing to plot: no numeric per-epoch keys{which} in {paths}')
    order = sorted(panels, key=lambda m: (m != 'loss', m != 'lr', m))
    ncol = min(3, len(order))
    nrow = math.ceil(len(order) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.0 * nrow), squeeze=False)
    colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
    for ax, metric in zip(axes.flat, order):
        for j, (label, series) in enumerate(runs.items()):
            for key in sorted(panels[metric], key=lambda k: (not k.startswith('train_'), k)):
                if key in series:
                    xs, ys = series[key]
                    style = '--' if key.startswith('test_') else '-'
                    split = key.split('_', 1)[0] if key != metric else ''
                    ax.plot(xs, ys, style, color=colors[j % len(colors)], marker='.', markersize=3,
                            label=f'{label} {split}'.strip())
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel('epoch')
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        if metric == 'lr':
            ax.ticklabel_format(axis='y', style='sci', scilimits=(-2, 2))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(order):]:
        ax.axis('off')
    fig.tight_layout()
    os.makedirs(args.output_dir, exist_ok=True)
    png = os.path.join(args.output_dir, 'curves.png')
    fig.savefig(png, dpi=90)
    plt.close(fig)
    save_json({label: {k: dict(epoch=xs, value=ys) for k, (xs, ys) in s.items()} for label, s in runs.items()},
              os.path.join(args.output_dir, 'curves.json'))
    log.info(f'curves: {png} ({", ".join(order)})')
    return dict(png=png, panels=order, runs=runs)


COMMANDS = dict(recon=cmd_recon, attn_stats=cmd_attn_stats, cka=cmd_cka, rollout=cmd_rollout, curves=cmd_curves)


def main(args):
    setup_logging(0)
    os.makedirs(args.output_dir, exist_ok=True)
    if args.command != 'curves':
        args.device = resolve_device(args.device, 0)
        seed_everything(args.seed)
    return COMMANDS[args.command](args)


if __name__ == '__main__':
    main(get_args_parser().parse_args())
