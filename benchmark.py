"""Time training steps of every recipe on synthetic images: one JSON line per configuration (img/s, step time,
peak memory, FLOPs and model FLOPs utilisation), plus an input-pipeline measurement.

A step is what `util.engine.train_one_epoch` does per batch: forward under the chosen autocast, backward, the
gradient norm, fused AdamW (skipping a non-finite step on the device, no host sync), zero_grad. Times are medians
over `--steps` timed steps after `--warmup` untimed ones (the first steps of a compiled model compile it).

  # ours: fp32, batch 64, MAE-Lite ViT-Tiny at 224 px, on CUDA if there is one
  python benchmark.py
  python benchmark.py --compile
  # every recipe in one command: MAE ViT-T/S/B, baseline, D-MAE/D²-MAE, UM-MAE/SimMIM Swin-T, fine-tune ViT-T/B
  python benchmark.py --suite --steps 5
  python benchmark.py --suite --device cuda --amp bf16 --batch_size 256 --compile --data_path /data/imagenet
  # the straightforward official-style step over the same parameters (the reference we compare against)
  python benchmark.py --baseline
  # several settings in one process, one line each
  python benchmark.py --configs impl=baseline impl=baseline,compile=1 impl=ours impl=ours,compile=1
  # two settings alternated step by step in one process, plus a line with their img/s ratio (A over B): the
  # number to trust on a noisy machine
  python benchmark.py --compare impl=ours impl=baseline --steps 20
  python benchmark.py --compare impl=ours,compile=1 impl=baseline,compile=1 --steps 20
  # the GPU targets: bf16 ours vs the fp16-autocast eager official-style step, at the same batch
  python benchmark.py --device cuda --batch_size 256 --compare impl=ours,amp=bf16,compile=1 impl=baseline,amp=fp16
  # where does a step's time go? (GEMMs and their FLOP rate, attention, the ten largest other ops)
  python benchmark.py --steps 3 --profile 5
  # is the input pipeline fast enough? ('photos' = ImageNet-sized JPEGs made from scikit-learn's sample photos)
  python benchmark.py --data_path photos --data_workers 16 --device cuda --amp bf16 --batch_size 256

A configuration is comma-separated key=value overrides of the flags below (impl, model, teacher, batch_size,
input_size, amp, compile, compile_mode, channels_last, device, mask_ratio, norm_pix_loss, threads). peak_mem_mb is
torch.cuda.max_memory_allocated on a GPU; on CPU it is the process's peak resident set (ru_maxrss), so it includes
whatever ran before in the process. mfu = achieved FLOP/s (FLOPs of one step counted by torch's FlopCounterMode,
attention included) over the matmul peak measured on the device in the run's dtype. With --data_path, every line
says whether the step outruns --data_workers CPU workers (data_bound_cpu_workers) or the decode-on-device path.

On CPU, training and this benchmark make glibc keep freed memory (util.perf.keep_freed_memory; --malloc default
turns it off): otherwise the large activation buffers go back to the kernel after every step and are page-faulted
in again (about 0.3 s of system time per ViT-Tiny step on 2 cores).

References:
  MAE - He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022 (the baseline step follows the
        paper's description: embed every patch, shuffle by sorted noise and keep the first 25%, decoder appends
        mask tokens and unshuffles, loss on the removed patches).
"""
import argparse
import json
import math
import os
import resource
import statistics
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import main_distill
import models_mae
import models_swin
import models_vit
from util import engine, gpu_data, perf
from util.args import COMPILE_MODES
from util.data import SafeImageFolder, pretrain_transform
from util.lr_decay import param_groups_lrd
from util.optim import adamw

IMPLS = ('ours', 'baseline', 'd_mae', 'd2_mae', 'finetune')


def get_args_parser():
    p = argparse.ArgumentParser('MAE pre-training step benchmark')
    p.add_argument('--model', default='mae_vit_tiny_patch16',
                   help='MAE factory in models_mae.py, or a UM-MAE / SimMIM Swin in models_swin.py (mae_swin_tiny at '
                        '256 px, simmim_swin_tiny at 192 or 256 px; impl ours only)')
    p.add_argument('--impl', default='ours', choices=IMPLS,
                   help="'ours' = models_mae as trained; 'baseline' = the official-style step below, same weights; "
                        "'d_mae' / 'd2_mae' = main_distill's step with a frozen --teacher (the student is --model; "
                        "d2_mae adds its attention-only extra block); 'finetune' = main_finetune's classification step "
                        "(the ViT of --model without its mae_ prefix, 1000 classes, layer decay 0.85)")
    p.add_argument('--teacher', default='vit_base_patch16', help='teacher ViT factory for d_mae / d2_mae')
    p.add_argument('--baseline', action='store_const', const='baseline', dest='impl', help='same as --impl baseline')
    p.add_argument('--batch_size', type=int, default=64)
    p.add_argument('--input_size', type=int, default=224)
    p.add_argument('--mask_ratio', type=float, default=None,
                   help="default: the model's (0.75 MAE and UM-MAE, 0.6 SimMIM)")
    p.add_argument('--norm_pix_loss', type=_bool, default=True, help='MAE-Lite pre-trains with it (true/false)')
    p.add_argument('--amp', default='none', choices=['none', 'bf16', 'fp16'], help='autocast dtype')
    p.add_argument('--compile', type=_bool, nargs='?', const=True, default=False, help='torch.compile the model')
    p.add_argument('--compile_mode', default='default', choices=COMPILE_MODES,
                   help='torch.compile mode with --compile (reduce-overhead: CUDA graphs on a GPU)')
    p.add_argument('--channels_last', type=_bool, nargs='?', const=True, default=False,
                   help='images and conv weights in channels-last memory layout (only the patch embedding of a ViT '
                        'is a convolution, so this is measured rather than on by default)')
    p.add_argument('--device', default='auto', help="'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:N'")
    p.add_argument('--threads', type=int, default=0, help='torch.set_num_threads (0: leave torch\'s default)')
    p.add_argument('--steps', type=int, default=10, help='timed steps (the median is reported)')
    p.add_argument('--warmup', type=int, default=3,
                   help='untimed steps first (a compiled model compiles in the first one or two)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--profile', type=int, default=0, metavar='STEPS',
                   help='after timing, profile this many steps of each configuration and print where the time goes '
                        '(GEMMs with their FLOP rate, attention, the largest other ops); not with --compare')
    p.add_argument('--malloc', default='keep', choices=['keep', 'default'],
                   help="'keep': glibc keeps freed memory (util.perf.keep_freed_memory, what training does on CPU); "
                        "'default': glibc's defaults. A process-wide setting, so not a --compare key")
    p.add_argument('--configs', nargs='+', metavar='K=V,...', help='run these settings one after another')
    p.add_argument('--suite', action='store_true',
                   help='every recipe in one command (SUITE below): MAE ViT-T/S/B, the official-style baseline, '
                        'D-MAE and D²-MAE (ViT-T from ViT-B), UM-MAE and SimMIM Swin-T, fine-tuning ViT-T/B')
    p.add_argument('--mfu', type=_bool, default=True,
                   help='count the FLOPs of a step once (torch FlopCounterMode) and report TFLOP/s and the model '
                        'FLOPs utilisation against the matmul peak measured on this device in the run\'s dtype')
    p.add_argument('--data_path', default=None,
                   help='also measure the input pipeline on this image folder (ImageFolder layout; its train/ if '
                        'there is one): CPU decode + RandomResizedCrop per worker, and the decode-on-device path; '
                        "'photos' writes a stand-in of ImageNet-sized JPEGs from scikit-learn's sample photos")
    p.add_argument('--data_workers', type=int, default=16,
                   help='CPU data workers the input-pipeline verdict assumes (data_bound = the model step is faster '
                        'than data_workers x the measured per-worker rate)')
    p.add_argument('--compare', nargs=2, metavar=('A', 'B'),
                   help='alternate two settings step by step in one process and report img/s(A) / img/s(B)')
    return p


def _bool(s):
    if str(s).lower() in ('1', 'true', 'yes', 'on'):
        return True
    if str(s).lower() in ('0', 'false', 'no', 'off'):
        return False
    raise argparse.ArgumentTypeError(f'not a boolean: {s!r}')


class OfficialStyleMAE(nn.Module):
    """The plain MAE step over the parameters of a `models_mae` model, written as the paper describes it: the
    conv embeds every patch and 75% are then dropped by a gather; cls is concatenated; attention is
    softmax(q·kᵀ/√d)·v with explicit matmuls (timm's pre-SDPA Attention); the decoder concatenates mask tokens,
    unshuffles with a gather and concatenates cls back; the loss is taken over all patches and masked. Given the
    same noise it computes the same loss as `models_mae` (to float rounding): only the cost differs."""

    def __init__(self, mae):
        super().__init__()
        self.mae = mae

    @staticmethod
    def attention(attn, x):
        N, L, _ = x.shape
        qkv = attn.qkv(x).reshape(N, L, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)  # [3, N, H, L, d]
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)  # [N, H, L, L]
        return attn.proj((a @ v).transpose(1, 2).reshape(N, L, -1))  # [N, L, H*d]

    def block(self, blk, x):
        x = x + self.attention(blk.attn, blk.norm1(x))
        return x + blk.mlp.fc2(blk.mlp.act(blk.mlp.fc1(blk.norm2(x))))

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        m = self.mae
        x = m.patch_embed(imgs) + m.pos_embed[:, 1:]  # [N, L, D], every patch embedded
        N, L, D = x.shape
        K = int(L * (1 - mask_ratio))
        noise = torch.rand(N, L, device=x.device) if noise is None else noise
        ids_shuffle = torch.argsort(noise, dim=1)  # [N, L], kept first
        ids_restore = torch.argsort(ids_shuffle, dim=1)  # [N, L]
        x = torch.gather(x, 1, ids_shuffle[:, :K].unsqueeze(-1).repeat(1, 1, D))  # [N, K, D]
        mask = torch.ones(N, L, device=x.device)
        mask[:, :K] = 0
        mask = torch.gather(mask, 1, ids_restore)  # [N, L], 1 = removed
        x = torch.cat([(m.cls_token + m.pos_embed[:, :1]).expand(N, -1, -1), x], dim=1)  # [N, 1+K, D]
        for blk in m.blocks:
            x = self.block(blk, x)
        x = m.decoder_embed(m.norm(x))  # [N, 1+K, Dd]
        Dd = x.shape[-1]
        x_ = torch.cat([x[:, 1:], m.mask_token.repeat(N, L - K, 1)], dim=1)  # [N, L, Dd], shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, Dd))  # [N, L, Dd], image order
        x = torch.cat([x[:, :1], x_], dim=1) + m.decoder_pos_embed  # [N, 1+L, Dd]
        for blk in m.decoder_blocks:
            x = self.block(blk, x)
        pred = m.decoder_pred(m.decoder_norm(x))[:, 1:]  # [N, L, p*p*C]
        p, C = m.patch_size, imgs.shape[1]
        t = imgs.reshape(N, C, imgs.shape[2] // p, p, imgs.shape[3] // p, p)
        target = torch.einsum('nchpwq->nhwpqc', t).reshape(N, L, p * p * C)  # [N, L, p*p*C]
        if m.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred.float() - target) ** 2).mean(dim=-1)  # [N, L]
        return (loss * mask).sum() / mask.sum(), pred, mask


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


class Bench:
    """One configuration: model, optimizer, a fixed synthetic batch, and a timed `step()`."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        torch.manual_seed(cfg.seed)
        kw = dict(img_size=cfg.input_size, norm_pix_loss=cfg.norm_pix_loss)
        if cfg.impl == 'd2_mae':
            kw['depth'] = models_mae.create_model(cfg.model, **kw).depth + 1
        if cfg.impl == 'finetune':  # main_finetune's step: GAP ViT, cross-entropy, layer-decay groups
            self.net = models_vit.create_model(cfg.model.removeprefix('mae_'), img_size=cfg.input_size,
                                               num_classes=1000, global_pool='avg').to(self.device)
            mae = self.net
            self.labels = torch.randint(1000, (cfg.batch_size,), generator=torch.Generator().manual_seed(cfg.seed))
            self.labels = self.labels.to(self.device)
        elif models_swin.has_model(cfg.model):  # UM-MAE or SimMIM on Swin, as main_pretrain trains them
            if cfg.impl != 'ours':
                raise ValueError(f'{cfg.model}: only impl=ours exists for the Swin models')
            if cfg.model.startswith('simmim'):
                kw.pop('norm_pix_loss')
            mae = models_swin.create_model(cfg.model, **kw).to(self.device)
        else:
            mae = models_mae.create_model(cfg.model, **kw).to(self.device)
        if cfg.impl != 'finetune':
            self.net = mae
        if cfg.impl == 'baseline':
            self.net = OfficialStyleMAE(mae)
        elif cfg.impl in ('d_mae', 'd2_mae'):
            teacher = models_vit.create_model(cfg.teacher, num_classes=0, img_size=cfg.input_size)
            teacher = teacher.requires_grad_(False).eval().to(self.device)
            d = len(mae.blocks)
            decode_idx = (d - 1) * 2 // 3 if cfg.impl == 'd2_mae' else None  # 8 of 12 (+1) for Tiny
            self.net = main_distill.MAEDistiller(mae, teacher, [(d - 1, teacher.depth - 1)], (), 1.0,
                                                 decode_idx).to(self.device)
        if cfg.compile:
            self.net = torch.compile(self.net, mode=None if cfg.compile_mode == 'default' else cfg.compile_mode)
        # MAE's optimizer: AdamW, betas (0.9, 0.95), no decay on 1-D parameters and tokens, lr for the batch
        opt_args = argparse.Namespace(weight_decay=0.05, lr=1.5e-4 * cfg.batch_size / 256, device=cfg.device)
        groups = param_groups_lrd(mae, 0.05, 0.85) if cfg.impl == 'finetune' else None
        self.opt = adamw(self.net if cfg.impl.startswith('d') else mae, opt_args, betas=(0.9, 0.95), groups=groups)
        self.params = [p for g in self.opt.param_groups for p in g['params']]
        self.scaler = engine.make_scaler(cfg)
        g = torch.Generator().manual_seed(cfg.seed)
        self.imgs = torch.randn(cfg.batch_size, 3, cfg.input_size, cfg.input_size, generator=g)
        self.imgs = self.imgs.to(self.device)
        if cfg.channels_last:
            self.imgs = self.imgs.contiguous(memory_format=torch.channels_last)
            self.net.to(memory_format=torch.channels_last)
        self.times = []
        self.rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB, before any step

    def loss(self):
        with engine.autocast(self.cfg):
            if self.cfg.impl == 'finetune':
                return F.cross_entropy(self.net(self.imgs), self.labels)
            ratio = {} if self.cfg.mask_ratio is None else {'mask_ratio': self.cfg.mask_ratio}
            return self.net(self.imgs, **ratio)[0]

    def step(self):
        """One training step as util.engine.train_one_epoch takes it; returns its wall time."""
        _sync(self.device)
        t0 = time.perf_counter()
        loss = self.loss()
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if self.scaler:
            self.scaler.unscale_(self.opt)
        norm = torch.nn.utils.clip_grad_norm_(self.params, math.inf)  # the engine always takes the norm
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:  # the engine's skip test, decided on the device (fused AdamW reads found_inf): no host sync
            engine.step_unless(self.opt, ~torch.isfinite(norm))
        self.opt.zero_grad(set_to_none=True)
        _sync(self.device)
        return time.perf_counter() - t0

    def flop_counter(self):
        """torch's FlopCounterMode over one forward + backward of the uncompiled module, attention in its math form
        (so it is counted as the batched matmuls it is)."""
        compiled, self.net = self.net, getattr(self.net, '_orig_mod', self.net)
        try:
            with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
                self.loss().backward()
        finally:
            self.net = compiled
            self.opt.zero_grad(set_to_none=True)
        return counter

    def count_flops(self):
        """FLOPs of one forward + backward (matmuls, convolutions and attention)."""
        return self.flop_counter().get_total_flops()

    def result(self):
        cfg, ms = self.cfg, statistics.median(self.times) * 1e3
        if self.device.type == 'cuda':
            peak = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        teacher = {'teacher': cfg.teacher} if cfg.impl.startswith('d') else {}
        return dict(impl=cfg.impl, model=cfg.model, **teacher, batch=cfg.batch_size, input_size=cfg.input_size,
                    amp=cfg.amp, compile=cfg.compile, channels_last=cfg.channels_last, device=str(self.device),
                    img_per_s=round(cfg.batch_size / ms * 1e3, 2),
                    step_ms=round(ms, 1), step_ms_min=round(min(self.times) * 1e3, 1), steps=len(self.times),
                    **({'compile_mode': cfg.compile_mode} if cfg.compile else {}),
                    peak_mem_mb=round(peak, 1), torch=torch.__version__, threads=torch.get_num_threads(),
                    # CPU: how far the steps raised the peak RSS above the set-up's (model, optimizer, batch): the
                    # training-step memory, meaningful for one configuration per process (--configs)
                    **({} if self.device.type == 'cuda' else {'step_mem_mb': round(peak - self.rss_setup, 1)}))


_PEAKS = {}


def matmul_peak_tflops(device, dtype):
    """The best TFLOP/s of a large square matmul on `device` in `dtype`: the peak that MFU is measured against
    (measured, not the datasheet's, so it holds for this machine, clocks and library)."""
    key = (str(device), dtype)
    if key not in _PEAKS:
        n = 8192 if device.type == 'cuda' else 2048  # large enough to reach the peak, ~0.1 s per product on 2 cores
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        best = math.inf
        for _ in range(10 if device.type == 'cuda' else 6):
            _sync(device)
            t0 = time.perf_counter()
            a @ b
            _sync(device)
            best = min(best, time.perf_counter() - t0)
        _PEAKS[key] = 2 * n ** 3 / best / 1e12
    return _PEAKS[key]


def utilisation(bench):
    """GFLOP per image, achieved TFLOP/s and MFU of a timed bench."""
    cfg = bench.cfg
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(cfg.amp, torch.float32)
    flops = bench.count_flops()
    achieved = flops / statistics.median(bench.times) / 1e12
    peak = matmul_peak_tflops(bench.device, dtype)
    return dict(gflop_per_img=round(flops / cfg.batch_size / 1e9, 3), tflops=round(achieved, 4),
                peak_tflops=round(peak, 3), mfu=round(achieved / peak, 4))


GEMM_OPS = ('aten::mm', 'aten::addmm')  # every Linear, forward and backward
ATTENTION_OPS = ('aten::bmm', 'aten::baddbmm')  # with the SDPA kernels: attention in its fused or explicit form


def is_attention(op):
    return op in ATTENTION_OPS or 'scaled_dot_product' in op or 'flash_attention' in op or 'efficient_attention' in op


def profile_breakdown(bench, steps):
    """Where a step's time goes, from torch's profiler over `steps` steps (self times per op, per step): the GEMMs
    with their FLOPs and rate, attention (SDPA kernels and batched matmuls; FLOPs of its math form, as
    `count_flops`), and everything else with its ten largest ops. Profiler overhead (~10 us per op) is in 'other'."""
    from torch.profiler import ProfilerActivity, profile
    counter = bench.flop_counter()
    flops = {f'aten::{str(k).split(".")[-1]}': v for k, v in counter.get_flop_counts()['Global'].items()}
    gemm_flops = sum(v for k, v in flops.items() if k in GEMM_OPS)
    attn_flops = sum(v for k, v in flops.items() if k in ATTENTION_OPS)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.device.type == 'cuda' else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            bench.step()
    ms = {}
    for e in prof.key_averages():
        t = e.self_device_time_total if bench.device.type == 'cuda' else e.self_cpu_time_total
        ms[e.key] = ms.get(e.key, 0.0) + t / 1e3 / steps
    gemm = sum(v for k, v in ms.items() if k in GEMM_OPS)
    attn = sum(v for k, v in ms.items() if is_attention(k))
    other = {k: v for k, v in ms.items() if k not in GEMM_OPS and not is_attention(k)
             and not k.startswith(('autograd::', 'Optimizer.', 'ProfilerStep'))}
    top = sorted(other.items(), key=lambda kv: -kv[1])[:10]
    return dict(config=bench.cfg.spec, profiled_steps=steps, gemm_ms=round(gemm, 1),
                gemm_gflop=round(gemm_flops / 1e9, 4), gemm_tflops=round(gemm_flops / max(gemm, 1e-9) / 1e9, 4),
                attention_ms=round(attn, 1), attention_gflop=round(attn_flops / 1e9, 4),
                other_gflop=round((counter.get_total_flops() - gemm_flops - attn_flops) / 1e9, 4),
                other_ms=round(sum(other.values()), 1), top_other_ms={k: round(v, 1) for k, v in top})


def photo_folder(root, n=64):
    """A stand-in for ImageNet's train/: `n` JPEGs of ImageNet's typical size (about 500 x 375, quality 90) cut from
    scikit-learn's two sample photos (they ship inside the package: no download)."""
    from sklearn.datasets import load_sample_images
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    photos = load_sample_images().images  # two 427 x 640 RGB arrays
    for i in range(n):
        img = Image.fromarray(photos[i % 2])
        w, h = 400 + int(torch.randint(200, (), generator=g)), 300 + int(torch.randint(127, (), generator=g))
        left, top = int(torch.randint(640 - w + 1, (), generator=g)), int(torch.randint(427 - h + 1, (), generator=g))
        os.makedirs(os.path.join(root, str(i % 2)), exist_ok=True)
        img.crop((left, top, left + w, top + h)).save(os.path.join(root, str(i % 2), f'{i:03d}.jpg'), quality=90)
    return root


def measure_pipeline(args, device):
    """Images/s of the two input pipelines on --data_path at --input_size: one CPU worker (PIL decode + MAE-Lite's
    RandomResizedCrop + flip + normalise, in this process) and decode-on-device (util/gpu_data.py; file reading
    excluded, the files are read once up front)."""
    root = args.data_path
    if root == 'photos':
        root = photo_folder(tempfile.mkdtemp(prefix='bench_photos_'))
    elif os.path.isdir(os.path.join(root, 'train')):
        root = os.path.join(root, 'train')
    cpu = SafeImageFolder(root, pretrain_transform(args.input_size))
    per_worker = gpu_data.cpu_pipeline_rate(cpu, n=64)
    encoded = gpu_data.EncodedImageFolder(root)
    data = [encoded[i][0] for i in range(min(64, len(encoded)))]
    crop = gpu_data.DeviceRandomResizedCrop(args.input_size)

    def device_batch():
        crop([img for img in gpu_data.decode_batch(data, device) if img is not None])
        _sync(device)
    on_device = gpu_data.images_per_second(device_batch, len(data))
    return dict(data_path=args.data_path, images=len(cpu), cpu_img_per_s_per_worker=round(per_worker, 1),
                data_workers=args.data_workers, cpu_workers_img_per_s=round(per_worker * args.data_workers, 1),
                device_decode_img_per_s=round(on_device, 1), device=str(device))


def report(bench, args, pipeline=None):
    """The bench's JSON line: timing and memory, MFU (--mfu), and whether the input pipeline keeps up."""
    r = {'config': bench.cfg.spec, **bench.result()}
    if args.mfu:
        r.update(utilisation(bench))
    if pipeline is not None:
        r['data_bound_cpu_workers'] = r['img_per_s'] > pipeline['cpu_workers_img_per_s']
        r['data_bound_device_decode'] = r['img_per_s'] > pipeline['device_decode_img_per_s']
    return r


def suite(args, device):
    """The configurations of --suite. On a CPU the ViT-B ones run at a quarter of --batch_size (a 2-core machine
    takes tens of seconds per ViT-B step at batch 64)."""
    big = args.batch_size if device.type == 'cuda' else max(8, args.batch_size // 4)
    return ['impl=ours,model=mae_vit_tiny_patch16', 'impl=baseline,model=mae_vit_tiny_patch16',
            'impl=ours,model=mae_vit_small_patch16', f'impl=ours,model=mae_vit_base_patch16,batch_size={big}',
            'impl=d_mae,model=mae_vit_tiny_patch16,teacher=vit_base_patch16',
            'impl=d2_mae,model=mae_vit_tiny_patch16,teacher=vit_base_patch16',
            'impl=ours,model=mae_swin_tiny,input_size=256', 'impl=ours,model=simmim_swin_tiny,input_size=192',
            'impl=finetune,model=vit_tiny_patch16', f'impl=finetune,model=vit_base_patch16,batch_size={big}']


def make_config(args, spec=''):
    """args with the overrides of `spec` ('k=v,k=v') applied, and the device resolved."""
    cfg = argparse.Namespace(**vars(args))
    types = {a.dest: a.type for a in get_args_parser()._actions}
    for item in filter(None, spec.split(',')):
        k, _, v = item.partition('=')
        if k not in ('impl', 'model', 'teacher', 'batch_size', 'input_size', 'amp', 'compile', 'compile_mode',
                     'device', 'mask_ratio', 'norm_pix_loss', 'threads', 'channels_last'):
            raise ValueError(f'cannot override {k!r} in a configuration')
        setattr(cfg, k, (types[k] or str)(v))
    if cfg.impl not in IMPLS:
        raise ValueError(f'impl must be one of {IMPLS}, got {cfg.impl!r}')
    if cfg.compile_mode not in COMPILE_MODES:
        raise ValueError(f'compile_mode must be one of {", ".join(COMPILE_MODES)}, got {cfg.compile_mode!r}')
    if cfg.amp not in ('none', 'bf16', 'fp16'):
        raise ValueError(f"amp must be one of none, bf16, fp16, got {cfg.amp!r}")
    if cfg.device == 'auto':
        cfg.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    cfg.spec = spec
    return cfg


def run(benches, steps, warmup):
    """Warm every bench up, then time `steps` rounds; in each round every bench takes one step, the order
    alternating, so a slow patch of the machine hits all of them alike."""
    for b in benches:
        if b.cfg.threads:
            torch.set_num_threads(b.cfg.threads)
        for _ in range(warmup):
            b.step()
        if b.device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(b.device)
    for i in range(steps):
        for b in (benches if i % 2 == 0 else benches[::-1]):
            if b.cfg.threads:
                torch.set_num_threads(b.cfg.threads)
            b.times.append(b.step())


def main(args):
    if args.malloc == 'keep':
        perf.keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(make_config(args).device)
    pipeline = None
    if args.data_path:
        pipeline = measure_pipeline(args, device)
        print(json.dumps({'input_pipeline': pipeline}), flush=True)
    if args.compare:
        a, b = Bench(make_config(args, args.compare[0])), Bench(make_config(args, args.compare[1]))
        run([a, b], args.steps, args.warmup)
        ra, rb = report(a, args, pipeline), report(b, args, pipeline)
        for r in (ra, rb):
            print(json.dumps(r), flush=True)
        paired = statistics.median(tb / ta for ta, tb in zip(a.times, b.times))
        print(json.dumps({'compare': list(args.compare), 'ratio': round(ra['img_per_s'] / rb['img_per_s'], 3),
                          'paired_ratio': round(paired, 3)}), flush=True)
        return
    for spec in suite(args, device) if args.suite else args.configs or ['']:
        bench = Bench(make_config(args, spec))
        run([bench], args.steps, args.warmup)
        print(json.dumps(report(bench, args, pipeline)), flush=True)
        if args.profile:
            print(json.dumps({'profile': profile_breakdown(bench, args.profile)}), flush=True)
        del bench


if __name__ == '__main__':
    main(get_args_parser().parse_args())
