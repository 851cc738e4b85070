"""Time MAE pre-training steps on synthetic images: one JSON line per configuration (img/s, step time, peak memory).

A step is what `util.engine.train_one_epoch` does per batch: forward under the chosen autocast, backward, the
gradient norm, fused AdamW, zero_grad. Times are medians over `--steps` timed steps after `--warmup`
untimed ones (the first steps of a compiled model compile it).

  # ours: fp32, batch 64, MAE-Lite ViT-Tiny at 224 px, on CUDA if there is one
  python benchmark.py
  python benchmark.py --compile
  # the straightforward official-style step over the same parameters (the reference we compare against)
  python benchmark.py --baseline
  python benchmark.py --baseline --compile
  # several settings in one process, one line each
  python benchmark.py --configs impl=baseline impl=baseline,compile=1 impl=ours impl=ours,compile=1
  # two settings alternated step by step in one process, plus a line with their img/s ratio (A over B): the
  # number to trust on a noisy machine
  python benchmark.py --compare impl=ours impl=baseline --steps 20
  python benchmark.py --compare impl=ours,compile=1 impl=baseline,compile=1 --steps 20
  # the demo model, or a GPU run in bf16
  python benchmark.py --model mae_vit_demo_patch4 --input_size 32 --batch_size 256
  python benchmark.py --device cuda --amp bf16 --batch_size 256 --compile

A configuration is comma-separated key=value overrides of the flags below (impl, model, batch_size, input_size,
amp, compile, device, mask_ratio, norm_pix_loss, threads). peak_mem_mb is torch.cuda.max_memory_allocated on a
GPU; on CPU it is the process's peak resident set (ru_maxrss), so it includes whatever ran before in the process.

On CPU, glibc's malloc hands the large activation buffers back to the kernel after every step and the next step
page-faults them in again (about 0.3 s of system time per ViT-Tiny step on 2 cores). Training and this benchmark
both run faster with it switched off, which needs no code change (see docs/BENCHMARKS.md):
  MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 python benchmark.py --compare impl=ours impl=baseline

References:
  MAE - He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022 (the baseline step follows the
        paper's description: embed every patch, shuffle by sorted noise and keep the first 25%, decoder appends
        mask tokens and unshuffles, loss on the removed patches).
"""
import argparse
import json
import math
import resource
import statistics
import time

import torch
import torch.nn as nn

import main_distill
import models_mae
import models_swin
import models_vit
from util import engine, perf
from util.optim import adamw

IMPLS = ('ours', 'baseline', 'd_mae', 'd2_mae')


def get_args_parser():
    p = argparse.ArgumentParser('MAE pre-training step benchmark')
    p.add_argument('--model', default='mae_vit_tiny_patch16',
                   help='MAE factory in models_mae.py, or a UM-MAE / SimMIM Swin in models_swin.py (mae_swin_tiny at '
                        '256 px, simmim_swin_tiny at 192 or 256 px; impl ours only)')
    p.add_argument('--impl', default='ours', choices=IMPLS,
                   help="'ours' = models_mae as trained; 'baseline' = the official-style step below, same weights; "
                        "'d_mae' / 'd2_mae' = main_distill's step with a frozen --teacher (the student is --model; "
                        "d2_mae adds its attention-only extra block)")
    p.add_argument('--teacher', default='vit_base_patch16', help='teacher ViT factory for d_mae / d2_mae')
    p.add_argument('--baseline', action='store_const', const='baseline', dest='impl', help='same as --impl baseline')
    p.add_argument('--batch_size', type=int, default=64)
    p.add_argument('--input_size', type=int, default=224)
    p.add_argument('--mask_ratio', type=float, default=None,
                   help="default: the model's (0.75 MAE and UM-MAE, 0.6 SimMIM)")
    p.add_argument('--norm_pix_loss', type=_bool, default=True, help='MAE-Lite pre-trains with it (true/false)')
    p.add_argument('--amp', default='none', choices=['none', 'bf16', 'fp16'], help='autocast dtype')
    p.add_argument('--compile', type=_bool, nargs='?', const=True, default=False, help='torch.compile the model')
    p.add_argument('--device', default='auto', help="'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:N'")
    p.add_argument('--threads', type=int, default=0, help='torch.set_num_threads (0: leave torch\'s default)')
    p.add_argument('--steps', type=int, default=10, help='timed steps (the median is reported)')
    p.add_argument('--warmup', type=int, default=3,
                   help='untimed steps first (a compiled model compiles in the first one or two)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--malloc', default='keep', choices=['keep', 'default'],
                   help="'keep': glibc keeps freed memory (util.perf.keep_freed_memory, what training does on CPU); "
                        "'default': glibc's defaults. A process-wide setting, so not a --compare key")
    p.add_argument('--configs', nargs='+', metavar='K=V,...', help='run these settings one after another')
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
        if models_swin.has_model(cfg.model):  # UM-MAE or SimMIM on Swin, as main_pretrain trains them
            if cfg.impl != 'ours':
                raise ValueError(f'{cfg.model}: only impl=ours exists for the Swin models')
            if cfg.model.startswith('simmim'):
                kw.pop('norm_pix_loss')
            mae = models_swin.create_model(cfg.model, **kw).to(self.device)
        else:
            mae = models_mae.create_model(cfg.model, **kw).to(self.device)
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
            self.net = torch.compile(self.net)
        # MAE's optimizer: AdamW, betas (0.9, 0.95), no decay on 1-D parameters and tokens, lr for the batch
        opt_args = argparse.Namespace(weight_decay=0.05, lr=1.5e-4 * cfg.batch_size / 256, device=cfg.device)
        self.opt = adamw(self.net if cfg.impl.startswith('d') else mae, opt_args, betas=(0.9, 0.95))
        self.params = [p for g in self.opt.param_groups for p in g['params']]
        self.scaler = engine.make_scaler(cfg)
        g = torch.Generator().manual_seed(cfg.seed)
        self.imgs = torch.randn(cfg.batch_size, mae.in_chans, cfg.input_size, cfg.input_size, generator=g)
        self.imgs = self.imgs.to(self.device)
        self.times = []
        self.rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB, before any step

    def step(self):
        _sync(self.device)
        t0 = time.perf_counter()
        with engine.autocast(self.cfg):
            ratio = {} if self.cfg.mask_ratio is None else {'mask_ratio': self.cfg.mask_ratio}
            loss = self.net(self.imgs, **ratio)[0]
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if self.scaler:
            self.scaler.unscale_(self.opt)
        norm = torch.nn.utils.clip_grad_norm_(self.params, math.inf)  # the engine always takes the norm
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        elif bool(torch.isfinite(norm)):  # the engine's skip test: a host sync every step
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        _sync(self.device)
        return time.perf_counter() - t0

    def result(self):
        cfg, ms = self.cfg, statistics.median(self.times) * 1e3
        if self.device.type == 'cuda':
            peak = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return dict(impl=cfg.impl, model=cfg.model, **({'teacher': cfg.teacher} if cfg.impl.startswith('d') else {}), batch=cfg.batch_size, input_size=cfg.input_size, amp=cfg.amp,
                    compile=cfg.compile, device=str(self.device), img_per_s=round(cfg.batch_size / ms * 1e3, 2),
                    step_ms=round(ms, 1), step_ms_min=round(min(self.times) * 1e3, 1), steps=len(self.times),
                    peak_mem_mb=round(peak, 1), torch=torch.__version__, threads=torch.get_num_threads(),
                    # CPU: how far the steps raised the peak RSS above the set-up's (model, optimizer, batch): the
                    # training-step memory, meaningful for one configuration per process (--configs)
                    **({} if self.device.type == 'cuda' else {'step_mem_mb': round(peak - self.rss_setup, 1)}))


def make_config(args, spec=''):
    """args with the overrides of `spec` ('k=v,k=v') applied, and the device resolved."""
    cfg = argparse.Namespace(**vars(args))
    types = {a.dest: a.type for a in get_args_parser()._actions}
    for item in filter(None, spec.split(',')):
        k, _, v = item.partition('=')
        if k not in ('impl', 'model', 'teacher', 'batch_size', 'input_size', 'amp', 'compile', 'device',
                     'mask_ratio', 'norm_pix_loss', 'threads'):
            raise ValueError(f'cannot override {k!r} in a configuration')
        setattr(cfg, k, (types[k] or str)(v))
    if cfg.impl not in IMPLS:
        raise ValueError(f'impl must be one of {IMPLS}, got {cfg.impl!r}')
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
    if args.compare:
        a, b = Bench(make_config(args, args.compare[0])), Bench(make_config(args, args.compare[1]))
        run([a, b], args.steps, args.warmup)
        ra, rb = a.result(), b.result()
        for spec, r in zip(args.compare, (ra, rb)):
            print(json.dumps({'config': spec, **r}), flush=True)
        paired = statistics.median(tb / ta for ta, tb in zip(a.times, b.times))
        print(json.dumps({'compare': list(args.compare), 'ratio': round(ra['img_per_s'] / rb['img_per_s'], 3),
                          'paired_ratio': round(paired, 3)}), flush=True)
        return
    for spec in args.configs or ['']:
        bench = Bench(make_config(args, spec))
        run([bench], args.steps, args.warmup)
        print(json.dumps({'config': spec, **bench.result()}), flush=True)
        del bench


if __name__ == '__main__':
    main(get_args_parser().parse_args())
