"""Distillation pre-training of lightweight ViTs from a frozen MIM teacher: D-MAE, D²-MAE (MAE-Lite) and TinyMIM.

  # demo (embedded digits, random demo teacher unless --teacher is given; a minute on a CPU)
  python main_distill.py --method d_mae
  # MAE-Lite D-MAE ViT-Tiny from the official MAE-Base, 8 GPUs (effective batch 4096)
  torchrun --nproc_per_node 8 main_distill.py --method d_mae --model mae_vit_tiny --batch_size 512 \
      --teacher mae_pretrain_vit_base.pth --data_path /data/imagenet
  # D²-MAE (13-block student, decoder fed from block 8)
  torchrun --nproc_per_node 8 main_distill.py --method d2_mae --batch_size 512 --teacher mae_pretrain_vit_base.pth \
      --data_path /data/imagenet
  # TinyMIM ViT-Tiny from MAE ViT-L, relations of block 18 (defaults: 300 epochs, warmup 15, drop path 0.1)
  torchrun --nproc_per_node 8 main_distill.py --method tinymim --model vit_tiny --teacher_model vit_large \
      --teacher_block 18 --teacher mae_pretrain_vit_large.pth --data_path /data/imagenet
  # D-MAE on Hiera: MAE Hiera-T (40% of the 32-px mask units removed) + last-block attention of an MAE Hiera-B
  torchrun --nproc_per_node 8 main_distill.py --method d_mae_hiera --batch_size 512 \
      --teacher out/mae_hiera_base/checkpoint-399.pth --data_path /data/imagenet
  python main_distill.py --method d_mae_hiera --teacher /tmp/demo_hiera/checkpoint-last.pth   # demo
  # D² on Swin: SimMIM light Swin 2-2-6-3 from a SimMIM Swin-T (224 px, window 7), SimMIM's light-Swin recipe by
  # default (400 epochs, blr 4e-4 per 2048, betas (0.9, 0.99), clip 5, crop 0.67-1); the demo's teacher is a 96-d
  # demo SimMIM (python main_pretrain.py --model simmim_swin_demo_teacher --output_dir /tmp/demo_simmim_t)
  torchrun --nproc_per_node 8 main_distill.py --method d2_swin --batch_size 256 --teacher simmim_swin_tiny.pth \
      --data_path /data/imagenet
  python main_distill.py --method d2_swin --teacher /tmp/demo_simmim_t/checkpoint-last.pth   # demo

Every run also writes `checkpoint-encoder.pth`: the student as a plain ViT (d2_swin: a plain Swin) ({'model': state
dict}) that main_finetune / main_linprobe / main_knn load directly; the teacher is never saved.

References:
  MAE-Lite - Wang et al., "A Closer Look at Self-Supervised Lightweight Vision Transformers", ICML 2023
             (D-MAE attention distillation, D²-MAE decoupled distillation).
  TinyMIM  - Ren et al., "TinyMIM: An Empirical Study of Distilling MIM Pre-trained Models", CVPR 2023
             (q-k and v-v relation distillation).
  MAE      - He et al., CVPR 2022.
"""
import argparse
import logging
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms

import masking
import models_hiera
import models_mae
import models_swin
import models_vit
from util import dist
from util.args import common_parser, fill_defaults, resolve_lr
from util.checkpoint import atomic_save, resume
from util.data import SafeImageFolder, build_loader, dataset_root, pretrain_transform
from util.engine import end_epoch, end_training, make_scaler, train_one_epoch
from util.logger import make_tb_writer, setup_logging
from util.optim import adamw
from util.pretrained import load_pretrained
from util.rng import seed_everything

log = logging.getLogger('mim')

DEFAULTS = dict(input_size=224, batch_size=64, epochs=400, warmup_epochs=40, blr=1.5e-4, weight_decay=0.05,
                teacher_model='vit_base_patch16')
DEMO_DEFAULTS = dict(input_size=32, batch_size=64, epochs=10, warmup_epochs=1, blr=1.5e-3,
                     teacher_model='vit_demo_patch4')
STUDENTS = {'d_mae': 'mae_vit_tiny_patch16', 'd2_mae': 'mae_vit_tiny_d13_patch16', 'tinymim': 'vit_tiny_patch16'}
DEMO_STUDENTS = {'d_mae': 'mae_vit_demo_patch4', 'd2_mae': 'mae_vit_demo_patch4', 'tinymim': 'vit_demo_patch4'}
# D-MAE on Hiera (MAE-Lite): Hiera-T student, Hiera-B teacher, 40% of the mask units removed (models_hiera.py)
STUDENTS['d_mae_hiera'], DEMO_STUDENTS['d_mae_hiera'] = 'mae_hiera_tiny_224', 'mae_hiera_demo'
# D² on Swin (MAE-Lite): SimMIM light Swin with an extra last block, SimMIM Swin-T teacher (models_swin.py)
STUDENTS['d2_swin'], DEMO_STUDENTS['d2_swin'] = 'simmim_swin_light_d2_patch4_window7_224', 'simmim_swin_demo_d2'
# Real-data recipes that differ from the D-MAE row (SPEC §4): TinyMIM 300 epochs, 15 warmup; D² on Swin takes the
# SimMIM light-Swin row (400 epochs, 10 warmup, blr 4e-4 per 2048, betas (0.9, 0.99), clip 5, crop scale 0.67-1).
# The demo keeps DEMO_DEFAULTS for every method.
METHOD_DEFAULTS = {'tinymim': dict(epochs=300, warmup_epochs=15),
                   'd2_swin': dict(epochs=400, warmup_epochs=10, blr=4e-4 / 8, beta2=0.99, clip_grad=5.0,
                                   min_crop_scale=0.67)}


def get_args_parser():
    p = argparse.ArgumentParser('distillation pre-training', parents=[common_parser()])
    g = p.add_argument_group('distillation')
    g.add_argument('--method', default='d_mae', choices=['d_mae', 'd2_mae', 'tinymim', 'd_mae_hiera', 'd2_swin'])
    g.add_argument('--model', default=None,
                   help='student factory: an MAE (models_mae) for d_mae/d2_mae, a ViT (models_vit) for tinymim '
                        f'(defaults {STUDENTS})')
    g.add_argument('--depth', type=int, default=None,
                   help='override the student depth (d2_mae on the demo model uses 6 + 1 blocks)')
    g.add_argument('--teacher_model', default=None, help='teacher ViT factory (default vit_base_patch16; '
                                                         'd_mae_hiera: hiera_base_224, hiera_demo on the demo data)')
    g.add_argument('--teacher', default='',
                   help='teacher weights (official mae_pretrain_vit_base.pth, a MAE-Lite teacher, or ours); '
                        'without it the teacher is random, which is only good for smoke tests')
    g.add_argument('--alpha', type=float, default=1.0, help='weight of the distillation loss (D-MAE, D²-MAE)')
    g.add_argument('--distill_attn_idx', type=int, nargs='+', default=[-1],
                   help='student blocks whose attention logits are distilled (D-MAE; default the last)')
    g.add_argument('--teacher_attn_idx', type=int, nargs='+', default=[-1],
                   help='teacher blocks they are matched to, in the same order (MAE-Lite does no depth alignment)')
    g.add_argument('--distill_hidden_idx', type=int, nargs='*', default=[],
                   help='student indices i for hidden-feature distillation: i < depth is the normalised input of '
                        'block i, i = depth the final output (off by default)')
    g.add_argument('--teacher_hidden_idx', type=int, nargs='*', default=[],
                   help='teacher indices matched to --distill_hidden_idx (default: the teacher\'s final output)')
    g.add_argument('--decode_idx', type=int, default=None,
                   help='D²-MAE: the decoder reconstructs from the output of this block (1-based; MAE-Lite: 8)')
    g.add_argument('--teacher_block', type=int, default=None,
                   help='TinyMIM: teacher relations come from this block (1-based; ViT-L 18, ViT-B 12); the '
                        'teacher stops there (default: its last block)')
    g.add_argument('--mask_ratio', type=float, default=None,
                   help='fraction of patches removed (0.75; d_mae_hiera: 0.4 of the mask units, MAE-Lite\'s choice)')
    g.add_argument('--norm_pix_loss', action=argparse.BooleanOptionalAction, default=True)
    g.add_argument('--min_crop_scale', type=float, default=None,
                   help='RandomResizedCrop lower scale (MAE-Lite 0.08; TinyMIM 0.2)')
    g.add_argument('--drop_path', type=float, default=None, help='student stochastic depth (TinyMIM: 0.1)')
    g.add_argument('--beta2', type=float, default=None,
                   help="AdamW's second beta: 0.95 (MAE recipes, default), 0.99 for d2_swin (SimMIM's)")
    return p


def attention_only(block):
    """Strip a block down to what its attention logits need (norm1 + qkv): the rest would get no gradient."""
    block.attn.proj = nn.Identity()
    block.norm2 = block.mlp = block.ls2 = nn.Identity()
    return block


def attention_logits(block, x):
    """Scaled pre-softmax logits q·kᵀ/√d of `block` on input tokens x: [N, H, L, L]."""
    q, k, _ = block.attn.qkv_heads(block.norm1(x))
    return (q * block.attn.scale) @ k.transpose(-2, -1)


class MAEDistiller(nn.Module):
    """D-MAE / D²-MAE: the student MAE's loss plus α·MSE between adapted student and teacher attention logits (and
    optionally hidden features), the teacher seeing exactly the student's visible patches.

    The teacher is kept in a list so it is not a registered submodule: it is not trained, not saved and not
    wrapped by DDP. `decode_idx` (1-based) turns on D²: the decoder reads block `decode_idx`'s output normalised by
    the encoder's final norm, and the last block is attention-only.
    """

    def __init__(self, student, teacher, attn_pairs, hidden_pairs=(), alpha=1.0, decode_idx=None):
        super().__init__()
        self.model = student
        self.teacher = [teacher]
        self.attn_pairs, self.hidden_pairs, self.alpha, self.decode_idx = attn_pairs, hidden_pairs, alpha, decode_idx
        self.d2 = decode_idx is not None
        if self.d2:
            attention_only(student.blocks[-1])
        t_heads, s_heads = teacher.num_heads, student.num_heads
        # a 1x1 conv over the head axis maps student heads to teacher heads (always on, as in MAE-Lite)
        self.adapters = nn.ModuleList([nn.Conv2d(s_heads, t_heads, 1, bias=False) for _ in attn_pairs])
        self.hidden_adapters = nn.ModuleList([nn.Linear(student.embed_dim, teacher.embed_dim, bias=False)
                                              for _ in hidden_pairs])

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        student, teacher = self.model, self.teacher[0]
        patches = student.patchify(imgs)  # [N, L, p*p*C]
        N, L, _ = patches.shape
        if noise is None:
            noise = masking.random_noise(N, L, device=imgs.device)
        ids_keep, mask, ids_restore, _ = masking.masking_from_noise(noise, mask_ratio)

        s_logits, s_hidden, latent = self.run_student(patches, ids_keep)
        pred = student.forward_decoder(latent, ids_restore)
        loss_mae = student.forward_loss(patches, pred.float(), mask)
        with torch.no_grad():
            t_logits, t_hidden = run_teacher(teacher, imgs, ids_keep, [t for _, t in self.attn_pairs],
                                             [t for _, t in self.hidden_pairs])
        loss_attn = sum(F.mse_loss(a(s).float(), t.float()) for a, s, t in zip(self.adapters, s_logits, t_logits))
        loss_hidden = sum((F.mse_loss(a(s).float(), t.float())
                           for a, s, t in zip(self.hidden_adapters, s_hidden, t_hidden)), torch.zeros(()))
        loss = loss_mae + self.alpha * (loss_attn + loss_hidden.to(loss_mae.device))
        return loss, {'loss_mae': loss_mae.detach(), 'loss_attn': loss_attn.detach()}

    def run_student(self, patches, ids_keep):
        """Returns (attention logits per attn pair, hidden features per hidden pair, decoder input latent)."""
        student = self.model
        blocks = student.blocks[:-1] if self.d2 else student.blocks
        s_attn = {s for s, _ in self.attn_pairs if not (self.d2 and s == len(student.blocks) - 1)}
        need = {s - 1 for s, _ in self.hidden_pairs if 0 < s < len(student.blocks)}
        if self.d2:
            need.add(self.decode_idx - 1)
        x0 = student.embed_visible(patches, ids_keep)  # [N, 1+K, D]
        x, outs, extras = models_vit.run_blocks(blocks, x0, need, s_attn)
        latent = student.norm(outs[self.decode_idx - 1]) if self.d2 else student.norm(x)
        logits = []
        for s, _ in self.attn_pairs:
            logits.append(attention_logits(student.blocks[s], x) if s not in extras else extras[s]['logits'])
        hidden = []
        for s, _ in self.hidden_pairs:
            if s == len(student.blocks):
                hidden.append(latent)
            else:
                hidden.append(student.blocks[s].norm1(outs[s - 1] if s > 0 else x0))
        return logits, hidden, latent


def run_teacher(teacher, imgs, ids_keep, attn_idx, hidden_idx):
    """Teacher attention logits at `attn_idx` and hidden features at `hidden_idx` (same index rule as the
    student) on the visible patches `ids_keep` (all patches when None)."""
    x0 = teacher.embed(imgs, ids_keep)
    # Run only as deep as the targets reach: blocks before the deepest target in full, and a block whose logits are
    # the deepest target only as far as norm1 + qkv (the usual last-block target: no attention output, MLP or norm).
    deepest = max([*attn_idx, *hidden_idx])
    need = {i - 1 for i in hidden_idx if 0 < i < len(teacher.blocks)}
    x, outs, extras = models_vit.run_blocks(teacher.blocks[:deepest], x0, need, {i for i in attn_idx if i < deepest})
    if deepest in attn_idx:
        extras[deepest] = {'logits': attention_logits(teacher.blocks[deepest], x)}
    hidden = [teacher.norm(x) if i == len(teacher.blocks) else teacher.blocks[i].norm1(outs[i - 1] if i > 0 else x0)
              for i in hidden_idx]
    return [extras[i]['logits'] for i in attn_idx], hidden


def relations(block, x):
    """TinyMIM relations of `block` on tokens x, as logits: (q·kᵀ/√d, v·vᵀ/√d), each [N, H, L, L]."""
    q, k, v = block.attn.qkv_heads(block.norm1(x))
    s = block.attn.scale
    return (q * s) @ k.transpose(-2, -1), (v * s) @ v.transpose(-2, -1)


def relation_kl(t_logits, s_logits):
    """KL(teacher ‖ student) of the softmaxed relations: summed over keys, averaged over batch, heads, queries."""
    t_log = F.log_softmax(t_logits.float(), dim=-1)
    s_log = F.log_softmax(s_logits.float(), dim=-1)
    return (t_log.exp() * (t_log - s_log)).sum(-1).mean()


class RelationDistiller(nn.Module):
    """TinyMIM: no masking; student and teacher see all patches (+ cls) of the same crop (the student's copy also
    colour-jittered); the student's last block, built with the teacher's head count and stripped to norm1 + qkv,
    is matched to the teacher's block `teacher_block` by KL on q-k and v-v relations."""

    def __init__(self, student, teacher, teacher_block):
        super().__init__()
        last = student.blocks[-1]
        models_vit.set_block_heads(student, [(len(student.blocks) - 1, teacher.num_heads)])
        attention_only(last)
        student.norm = nn.Identity()  # unused by the loss: would ship untrained
        self.model = student
        self.teacher = [teacher]
        self.teacher_block = teacher_block

    def forward(self, imgs):
        """imgs [N, 2, C, H, W]: the teacher's view and the student's (jittered) view of one crop."""
        student, teacher = self.model, self.teacher[0]
        x, _, _ = models_vit.run_blocks(student.blocks[:-1], student.embed(imgs[:, 1]))
        s_qk, s_vv = relations(student.blocks[-1], x)
        with torch.no_grad():
            xt, _, _ = models_vit.run_blocks(teacher.blocks[:self.teacher_block - 1], teacher.embed(imgs[:, 0]))
            t_qk, t_vv = relations(teacher.blocks[self.teacher_block - 1], xt)
        loss_qk, loss_vv = relation_kl(t_qk, s_qk), relation_kl(t_vv, s_vv)
        return loss_qk + loss_vv, {'loss_qk': loss_qk.detach(), 'loss_vv': loss_vv.detach()}


class SwinD2Distiller(nn.Module):
    """D² on a SimMIM Swin (MAE-Lite's hierarchical variant, SPEC §3.4). The student's last stage has one extra block
    (light Swin: 2-2-6-3), attention-only. The SimMIM decoder reconstructs from the output before that block, i.e.
    the plain Swin's output after `norm` (SPEC's "decoder from stage index 1": the last stage's block 1); the extra
    block's attention logits on that output go through a 1x1 conv over heads (24 -> 24) and are matched (MSE) to the
    teacher's last-block logits on the same masked input (the teacher's own mask token on the student's mask).
    Gradients as D²-MAE: the extra block gets the distillation term only, everything before it both terms.
    The teacher is kept in a list: not a submodule, so not trained, saved or wrapped by DDP."""

    def __init__(self, student, teacher, alpha=1.0):
        super().__init__()
        for flag, m in (('--model', student), ('--teacher_model', teacher)):
            if not isinstance(m, models_swin.SimMIMSwin):
                raise ValueError(f'd2_swin: {flag} must be a SimMIM Swin of models_swin.py (simmim_swin_*), got a '
                                 f'{type(m).__name__}')
        self.model = student
        self.teacher = [teacher]
        self.alpha = alpha
        extra = attention_only(student.layers[-1].blocks[-1])
        t_heads = teacher.layers[-1].blocks[-1].attn.num_heads
        self.adapters = nn.ModuleList([nn.Conv2d(extra.attn.num_heads, t_heads, 1, bias=False)])

    def forward(self, imgs, mask_ratio=0.6, mask=None):
        """imgs [N, C, H, W]; mask [N, h*w] (token grid, 1 = masked) or None for SimMIM's block masking."""
        student, teacher = self.model, self.teacher[0]
        N, _, H, W = imgs.shape
        p, s = student.patch_embed.patch_size, student.mask_patch_size
        if mask is None:
            mask = masking.block_masking(N, (H // s, W // s), s // p, mask_ratio, imgs.device)
        x, ctx = swin_before_last_block(student, student.embed_masked(imgs, mask))  # [N, h', w', C_last]
        loss_rec, _ = student.reconstruction_loss(imgs, student.norm(x), mask)
        s_logits = student.layers[-1].blocks[-1].attention_logits(x, ctx)  # [N, nW, H_s, L, L]
        with torch.no_grad():
            xt, ctx_t = swin_before_last_block(teacher, teacher.embed_masked(imgs, mask))
            t_logits = teacher.layers[-1].blocks[-1].attention_logits(xt, ctx_t)  # [N, nW, H_t, L, L]
        if s_logits.shape[1] != t_logits.shape[1] or s_logits.shape[-1] != t_logits.shape[-1]:
            raise ValueError(f'student and teacher last-stage windows differ ({tuple(s_logits.shape)} vs '
                             f'{tuple(t_logits.shape)} logits): give the teacher the student\'s window size')
        loss_attn = F.mse_loss(self.adapters[0](s_logits.flatten(0, 1)).float(), t_logits.flatten(0, 1).float())
        loss = loss_rec + self.alpha * loss_attn
        return loss, {'loss_rec': loss_rec.detach(), 'loss_attn': loss_attn.detach()}


def swin_before_last_block(swin, x):
    """Run a models_swin Swin on embedded tokens x [N, h, w, D] up to its last block. Returns that block's input
    [N, h', w', C_last] and the last stage's shared context (windows, bias index, shift mask)."""
    for stage in swin.layers[:-1]:
        x = stage(x)[0]
    x, _, _, ctx = swin.layers[-1].prepare(x)
    for blk in swin.layers[-1].blocks[:-1]:
        x = blk(x, ctx)
    return x, ctx


def build_swin_teacher(args):
    """The d2_swin teacher: a SimMIM Swin (its mask token fills the student's masked tokens) at the input size, its
    checkpoint's mask token kept by the loader (relative-position tables resized to the factory's window)."""
    teacher = models_swin.create_model(args.teacher_model, img_size=args.input_size)
    if args.teacher:
        load_pretrained(teacher, args.teacher, keep_decoder=True)
    else:
        log.warning('no --teacher given: the teacher is randomly initialised (smoke test only)')
    return teacher.requires_grad_(False).eval().to(args.device)


def export_swin_encoder(args, student):
    """Write output_dir/checkpoint-encoder.pth for d2_swin: the student without its extra block, mask token and
    decoder, checked to load strictly into the plain Swin (e.g. swin_light_patch4_window7_224 with num_classes=0;
    `norm` is kept: it normalised the decoder's input, the plain Swin's output)."""
    if not args.output_dir or not dist.is_main_process():
        return
    last = len(student.depths) - 1
    depths = student.depths[:-1] + (student.depths[-1] - 1,)
    swin = models_swin.SwinTransformer(
        img_size=args.input_size, patch_size=student.patch_embed.patch_size, num_classes=0,
        embed_dim=student.stem_dim, depths=depths, num_heads=[st.blocks[0].attn.num_heads for st in student.layers],
        window_size=student.layers[0].window_size, rel_pos=student.rel_pos)
    sd = {k: v for k, v in student.state_dict().items()
          if not k.startswith((f'layers.{last}.blocks.{depths[-1]}.', 'mask_token', 'decoder.'))}
    swin.load_state_dict(sd, strict=True)
    atomic_save({'model': sd, 'args': {'method': args.method, 'model': args.model, 'depths': list(depths)}},
                os.path.join(args.output_dir, 'checkpoint-encoder.pth'))


class SharedCropTwoViews:
    """TinyMIM views: one random-resized crop (bicubic) + flip shared by both; the student's copy is also
    colour-jittered. Returns [2, C, H, W] (teacher view, student view)."""

    def __init__(self, size, min_scale=0.2):
        self.crop = transforms.Compose([
            transforms.RandomResizedCrop(size, scale=(min_scale, 1.0),
                                         interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip()])
        self.jitter = transforms.ColorJitter(0.4, 0.4, 0.4)
        self.to_tensor = transforms.Compose([transforms.ToTensor(),
                                             transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])

    def __call__(self, img):
        img = self.crop(img)
        return torch.stack([self.to_tensor(img), self.to_tensor(self.jitter(img))])


def build_teacher(args):
    if args.method == 'd_mae_hiera':  # pooled as the MAE-Hiera student, so both last stages hold the same tokens
        teacher = models_hiera.create_teacher(args.teacher_model, img_size=args.input_size)
    else:
        teacher = models_vit.create_model(args.teacher_model, num_classes=0, img_size=args.input_size)
    if args.teacher:
        load_pretrained(teacher, args.teacher)
    else:
        log.warning('no --teacher given: the teacher is randomly initialised (smoke test only)')
    return teacher.requires_grad_(False).eval().to(args.device)


def build_student(args):
    kw = dict(img_size=args.input_size, drop_path_rate=args.drop_path)
    if args.method == 'd2_swin':
        return models_swin.create_model(args.model, **kw)
    if args.method == 'd_mae_hiera':
        if args.depth or args.distill_hidden_idx:
            raise ValueError('d_mae_hiera distils attention logits only: no --depth / --distill_hidden_idx')
        return models_hiera.create_model(args.model, norm_pix_loss=args.norm_pix_loss, **kw)
    if args.depth:
        kw['depth'] = args.depth
    if args.method == 'tinymim':
        return models_vit.create_model(args.model, num_classes=0, **kw)
    return models_mae.create_model(args.model, norm_pix_loss=args.norm_pix_loss, **kw)


def export_encoder(args, student):
    """Write output_dir/checkpoint-encoder.pth: the student as a complete plain ViT for the downstream recipes.
    D²'s attention-only last block is dropped; parts that never got a gradient (D²'s final norm, which normalised
    block `decode_idx`; TinyMIM's last-block projection/MLP and final norm) are written at a fresh init."""
    if not args.output_dir or not dist.is_main_process():
        return
    if args.method == 'd_mae_hiera':  # the Hiera classifier's keys (head.norm = the encoder norm), no fc
        atomic_save({'model': models_hiera.encoder_state_dict(student), 'args': {'method': args.method,
                                                                                'model': args.model}},
                    os.path.join(args.output_dir, 'checkpoint-encoder.pth'))
        return
    depth = len(student.blocks) - (1 if args.method == 'd2_mae' else 0)
    vit = models_vit.VisionTransformer(img_size=args.input_size, patch_size=student.patch_embed.patch_size[0],
                                       embed_dim=student.embed_dim, depth=depth, num_heads=student.num_heads,
                                       num_classes=0)
    # TinyMIM's last block has the teacher's head count: the export says so, and util/pretrained.load_pretrained
    # rebuilds that block with it before loading (SPEC §3.3: fine-tune with the pre-trained head count)
    block_heads = [[i, student.blocks[i].attn.num_heads] for i in range(depth)
                   if student.blocks[i].attn.num_heads != student.num_heads]
    models_vit.set_block_heads(vit, block_heads)
    sd = {k: v for k, v in student.state_dict().items() if k in vit.state_dict()
          and v.shape == vit.state_dict()[k].shape}
    if args.method == 'd2_mae':
        sd = {k: v for k, v in sd.items() if not k.startswith('norm.')}
    vit.load_state_dict(sd, strict=False)
    atomic_save({'model': vit.state_dict(), 'args': {'method': args.method, 'model': args.model,
                                                     'block_heads': block_heads}},
                os.path.join(args.output_dir, 'checkpoint-encoder.pth'))


def main(args):
    dist.init_distributed_mode(args)
    setup_logging(args.rank, args.output_dir)
    demo = DEMO_STUDENTS if not args.data_path else STUDENTS
    if args.method == 'd_mae_hiera':
        fill_defaults(args, dict(teacher_model='hiera_base_224', mask_ratio=0.4), dict(teacher_model='hiera_demo'))
    if args.method == 'd2_swin':  # SimMIM masks 60% of the mask patches
        fill_defaults(args, dict(teacher_model='simmim_swin_tiny_patch4_window7_224', mask_ratio=0.6),
                      dict(teacher_model='simmim_swin_demo_teacher'))
    if args.data_path:
        fill_defaults(args, METHOD_DEFAULTS.get(args.method, {}))
    fill_defaults(args, {**DEFAULTS, 'model': demo[args.method]}, DEMO_DEFAULTS)
    fill_defaults(args, dict(min_crop_scale=0.2 if args.method == 'tinymim' else 0.08, mask_ratio=0.75,
                             drop_path=0.1 if args.method == 'tinymim' else 0.0, beta2=0.95))
    if args.method == 'd2_mae' and not args.data_path and args.depth is None:
        args.depth = 7  # the demo MAE has 6 blocks; D² adds an attention-only 7th
    seed_everything(args.seed + args.rank)

    root = dataset_root(args.data_path, 'train')
    tf = (SharedCropTwoViews(args.input_size, args.min_crop_scale) if args.method == 'tinymim'
          else pretrain_transform(args.input_size, args.min_crop_scale))
    dataset = SafeImageFolder(root, tf)
    loader = build_loader(dataset, args.batch_size, args.num_workers, args.pin_mem, train=True, seed=args.seed)

    teacher = build_swin_teacher(args) if args.method == 'd2_swin' else build_teacher(args)
    student = build_student(args)
    if args.method == 'd2_swin':
        model = SwinD2Distiller(student, teacher, args.alpha)
    elif args.method == 'd_mae_hiera':
        if len(args.distill_attn_idx) != len(args.teacher_attn_idx):
            raise ValueError('--distill_attn_idx and --teacher_attn_idx need the same number of entries')
        model = models_hiera.HieraDistiller(student, teacher, list(zip(args.distill_attn_idx, args.teacher_attn_idx)),
                                            args.alpha)
    elif args.method == 'tinymim':
        tb = args.teacher_block or teacher.depth
        if not 1 <= tb <= teacher.depth:
            raise ValueError(f'--teacher_block {tb} is outside the teacher\'s 1..{teacher.depth} blocks')
        model = RelationDistiller(student, teacher, tb)
    else:
        depth = len(student.blocks)
        attn = [(s % depth, t % teacher.depth) for s, t in zip(args.distill_attn_idx, args.teacher_attn_idx)]
        if len(args.distill_attn_idx) != len(args.teacher_attn_idx):
            raise ValueError('--distill_attn_idx and --teacher_attn_idx need the same number of entries')
        t_hidden = args.teacher_hidden_idx or [teacher.depth] * len(args.distill_hidden_idx)
        decode_idx = None
        if args.method == 'd2_mae':
            if args.distill_attn_idx != [-1] or args.teacher_attn_idx != [-1]:
                raise ValueError('d2_mae distils its extra last block onto the teacher\'s last block: '
                                 '--distill_attn_idx / --teacher_attn_idx do not apply (use d_mae to choose blocks)')
            decode_idx = args.decode_idx or (8 if depth == 13 else (depth - 1) * 2 // 3)
            attn = [(depth - 1, teacher.depth - 1)]  # D²: the attention-only extra block is what is distilled
        model = MAEDistiller(student, teacher, attn, list(zip(args.distill_hidden_idx, t_hidden)), args.alpha,
                             decode_idx)
    model.to(args.device)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model_without_ddp = model
    model = dist.wrap_model(model, args)

    resolve_lr(args)
    optimizer = adamw(model_without_ddp.model, args, betas=(0.9, args.beta2))
    optimizer.add_param_group({'params': [p for n, p in model_without_ddp.named_parameters()
                                          if 'adapters' in n], 'weight_decay': args.weight_decay})
    scaler = make_scaler(args)
    start_epoch = resume(args, model_without_ddp, optimizer, scaler)
    log.info(f'{args.method}: student {args.model} ({n_parameters / 1e6:.2f}M trainable incl. adapters), teacher '
             f'{args.teacher_model}; blr {args.blr:.3g} lr {args.lr:.3g} effective batch {args.eff_batch_size}')
    log_writer = make_tb_writer(args.log_dir)

    def step(model, images, targets):
        if args.method == 'tinymim':
            return model(images)
        return model(images, mask_ratio=args.mask_ratio)

    start = time.time()
    for epoch in range(start_epoch, args.epochs):
        loader.sampler.set_epoch(epoch)
        stats = train_one_epoch(model, step, loader, optimizer, epoch, args, scaler, log_writer=log_writer)
        end_epoch(args, epoch, model, optimizer, scaler, n_parameters, stats, log_writer=log_writer)
    (export_swin_encoder if args.method == 'd2_swin' else export_encoder)(args, model_without_ddp.model)
    end_training(start, log_writer)
    return model_without_ddp


if __name__ == '__main__':
    args = get_args_parser().parse_args()
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    main(args)
