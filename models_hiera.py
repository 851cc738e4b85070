"""Hiera encoders (timm's `Hiera`, so timm's keys and released weights load by name), MAE pre-training on them with
mask units, and the attention distillation MAE-Lite applies to a Hiera student.

References:
  Hiera    - Ryali et al., "Hiera: A Hierarchical Vision Transformer without the Bells-and-Whistles", ICML 2023
             (mask units of 8x8 tokens, MAE on the visible units only, multi-scale fusion into the decoder).
  MAE      - He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022 (decoder, norm-pix loss).
  MAE-Lite - Wang et al., "A Closer Look at Self-Supervised Lightweight Vision Transformers", ICML 2023 (Hiera-T with
             mask ratio 0.4; D-MAE attention distillation, here from a Hiera-B).
  timm     - Wightman, pytorch-image-models (`timm.models.hiera.Hiera`: unroll/reroll, mask-unit attention).

Layout (timm's): the patch tokens are "unrolled" so that every mask unit's tokens lie together and each q-pooling
is a max over the leading stride axis; `Hiera.forward_features(x, mask=keep)` drops the removed units (keep: [N, G]
bool, True = visible, the same count per row), keeping the visible ones in ascending unit order, and with
`return_intermediates=True` re-rolls every stage's output to [N, K, u, u, C] (K visible units, u x u tokens each).
`encode` does the same with a gather instead of the boolean index, so a training step has static shapes.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.hiera import Hiera

import masking
from models_mae import decoder_layers, patch_targets, patchify
from models_vit import lookup
from util.pos_embed import get_2d_sincos_pos_embed


def attention_logits(block, x):
    """Scaled pre-softmax logits q·kᵀ/√d of a timm `HieraBlock` on its input tokens, with the block's own q pooling
    and windows (what its `MaskUnitAttention` computes internally and never hands out).

    Args: block a HieraBlock; x [N, L, C] its input (unrolled order).
    Returns: [N, H, Lq, L] for global attention; [N, H, nW, Lq/nW, L/nW] for mask-unit attention (Lq = L / q_stride).
    """
    attn = block.attn
    N, L, _ = x.shape
    nw = L // (attn.q_stride * attn.window_size) if attn.use_mask_unit_attn else 1
    qkv = attn.qkv(block.norm1(x)).reshape(N, -1, nw, 3, attn.heads, attn.head_dim)  # [N, L/nW, nW, 3, H, hd]
    q, k, _ = qkv.permute(3, 0, 4, 2, 1, 5).unbind(0)  # each [N, H, nW, L/nW, hd]
    if attn.q_stride > 1:  # max-pool q over the stride, the leading axis of the unrolled order (as the block does)
        q = q.reshape(N, attn.heads, nw, attn.q_stride, -1, attn.head_dim).amax(dim=3)  # [N, H, nW, Lq/nW, hd]
    logits = (q * attn.scale) @ k.transpose(-2, -1)  # [N, H, nW, Lq/nW, L/nW]
    return logits if attn.use_mask_unit_attn else logits.squeeze(2)


def encode(model, imgs, keep, attn_idx=(), num_keep=None):
    """Run a Hiera on the visible mask units only: timm's `forward_features(imgs, mask=keep,
    return_intermediates=True)`, except that the removed units are dropped by a gather of a known count, not by a
    boolean index (whose data-dependent shape is a host sync every step on a GPU and breaks a compiled graph).

    Args: model a timm Hiera (or `MaskedAutoencoderHiera`); imgs [N, C, H, W]; keep [N, G] bool (True = visible, the
        same count per row); attn_idx: blocks whose attention logits to return (computed for those blocks alone, from
        their inputs); num_keep: visible units per row (read from `keep` if not given, one host read).
    Returns: (every stage's output re-rolled per visible unit, each [N, K, u_s, u_s, C_s]; logits per attn_idx, see
        `attention_logits`).
    """
    N, G = keep.shape
    if num_keep is None:
        num_keep = int(keep[0].sum())
    x = model.patch_embed(imgs, mask=keep.view(N, 1, *model.mask_spatial_shape))  # removed units' pixels zeroed
    x = model.unroll(model._pos_embed(x))  # [N, mu*G, C]: token j*G + g is token j of unit g
    units = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :num_keep]  # [N, K], visible, ascending
    index = torch.arange(model.mu_size, device=keep.device).view(1, -1, 1) * G + units.unsqueeze(1)  # [N, mu, K]
    x = masking.gather_tokens(x, index.flatten(1))  # [N, mu*K], the order timm's boolean index leaves
    stages, inputs = [], {}
    for i, blk in enumerate(model.blocks):
        if i in attn_idx:
            inputs[i] = x
        x = blk(x)
        if i in model.stage_ends:
            stages.append(model.reroll(x, i, mask=keep))
    return stages, [attention_logits(model.blocks[i], inputs[i]) for i in attn_idx]


class MaskedAutoencoderHiera(Hiera):
    """MAE on Hiera (the Hiera paper's recipe): whole mask units are removed, the encoder runs on the visible units
    only, the outputs of the stages before the last q-pooling are brought to the last stage's resolution inside each
    unit by a strided conv and summed with the last stage's output (multi-scale fusion), normalised by the encoder
    norm (`head.norm`, timm's name for Hiera's encoder norm); the decoder puts mask tokens in the removed units,
    adds a fixed 2-D sin-cos position embedding on the token grid and predicts the pixels of every last-stage token
    (norm-pix MSE averaged over the tokens of the removed units).

    Pre-training pools q `len(stages) - 2` times (2x2 last-stage tokens per 8x8-token unit for Hiera-T: 16-px
    prediction targets at 224); the classifier pools once more. Pooling has no weights, so the encoder keys are
    `Hiera`'s; `mask_token`, `decoder_*` (the fusion convs included) are pre-training only.
    """

    def __init__(self, img_size=224, in_chans=3, embed_dim=96, num_heads=1, stages=(2, 3, 16, 3), q_pool=None,
                 q_stride=(2, 2), mask_unit_size=(8, 8), patch_stride=(4, 4), decoder_embed_dim=512, decoder_depth=8,
                 decoder_num_heads=16, mlp_ratio=4.0, norm_pix_loss=True, drop_path_rate=0.0, **kwargs):
        q_pool = len(stages) - 2 if q_pool is None else q_pool
        unroll = [q ** (len(stages) - 1) for q in q_stride]
        if tuple(mask_unit_size) != tuple(unroll):  # timm unrolls once per stage: a unit is what that spans
            raise ValueError(f'mask_unit_size {tuple(mask_unit_size)} must be q_stride^(stages-1) = {tuple(unroll)}')
        super().__init__(img_size=img_size, in_chans=in_chans, embed_dim=embed_dim, num_heads=num_heads,
                         num_classes=0, stages=stages, q_pool=q_pool, q_stride=q_stride, mask_unit_size=mask_unit_size,
                         patch_stride=patch_stride, mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate, **kwargs)
        self.norm_pix_loss = norm_pix_loss
        self.unit_tokens = mask_unit_size[0] // q_stride[0] ** q_pool  # last-stage tokens per unit side
        self.pred_stride = patch_stride[0] * q_stride[0] ** q_pool  # pixels per last-stage token side
        dims = [self.blocks[e].dim_out for e in self.stage_ends]
        self.decoder_fusion = nn.ModuleList([  # stage s (before the last pooling) -> the last stage's grid and width
            nn.Conv2d(dims[s], dims[-1], kernel_size=q_stride[0] ** (q_pool - s), stride=q_stride[0] ** (q_pool - s))
            for s in range(q_pool)])
        self.decoder_embed = nn.Linear(dims[-1], decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        grid = [g * self.unit_tokens for g in self.mask_spatial_shape]
        self.decoder_pos_embed = nn.Parameter(get_2d_sincos_pos_embed(decoder_embed_dim, grid).unsqueeze(0),
                                              requires_grad=False)  # [1, h*w, Dd], the last-stage token grid
        self.decoder_blocks, self.decoder_norm, self.decoder_pred = decoder_layers(
            self.decoder_embed, decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio,
            self.pred_stride ** 2 * in_chans)
        nn.init.normal_(self.mask_token, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self):
        return ['pos_embed', 'mask_token']

    @property
    def num_units(self):
        return self.mask_spatial_shape[0] * self.mask_spatial_shape[1]

    def random_unit_mask(self, N, mask_ratio, device=None, generator=None):
        """Per-sample random mask units (`masking.random_masking`): [N, G] float, 1 = removed; every row keeps
        int(G * (1 - mask_ratio)) units."""
        if masking.num_keep(self.num_units, mask_ratio) < 1:
            raise ValueError(f'mask_ratio {mask_ratio} leaves no visible unit of {self.num_units}')
        return masking.random_masking(N, self.num_units, mask_ratio, device, generator)[1]

    def token_mask(self, mask):
        """Unit mask [N, G] -> the same mask on the last-stage token grid [N, h*w] (row-major), constant per unit."""
        N, (gh, gw), t = mask.shape[0], self.mask_spatial_shape, self.unit_tokens
        return mask.view(N, gh, 1, gw, 1).expand(N, gh, t, gw, t).reshape(N, gh * t * gw * t)

    def forward_encoder(self, imgs, mask, attn_idx=(), num_keep=None):
        """Encode the visible units; mask [N, G] (1 = removed), num_keep its visible units per row (see `encode`).
        Returns (fused, normed latent [N, K, t, t, C_last] in ascending unit order; attention logits of the blocks
        `attn_idx`)."""
        stages, logits = encode(self, imgs, mask == 0, attn_idx, num_keep)
        x = stages[-1]  # [N, K, t, t, C_last]
        for conv, feat in zip(self.decoder_fusion, stages):
            N, K, u, _, C = feat.shape
            y = conv(feat.reshape(N * K, u, u, C).permute(0, 3, 1, 2))  # [N*K, C_last, t, t]
            x = x + y.permute(0, 2, 3, 1).reshape(x.shape)  # [N, K, t, t, C_last]
        return self.head.norm(x), logits

    def place_units(self, x, mask, fill):
        """Put the visible units' tokens back on the full last-stage token grid.

        Args: x [N, K, t, t, D], the k-th visible unit in ascending unit order (the order timm's Hiera keeps them in);
            mask [N, G] (1 = removed); fill [D], what the removed units' tokens get.
        Returns: [N, h*w, D], row-major on the (gh*t x gw*t) token grid."""
        N, _, t, _, D = x.shape
        gh, gw = self.mask_spatial_shape
        full = fill.to(x.dtype).view(1, 1, 1, 1, D).expand(N, gh * gw, t, t, D)
        full = full.masked_scatter((mask == 0).view(N, gh * gw, 1, 1, 1).expand_as(full), x)  # [N, G, t, t, D]
        return full.reshape(N, gh, gw, t, t, D).transpose(2, 3).reshape(N, gh * t * gw * t, D)  # [N, h*w, D]

    def forward_decoder(self, latent, mask):
        """latent [N, K, t, t, C_last] (visible units, ascending order); mask [N, G]. Returns predictions for every
        last-stage token [N, h*w, s*s*C], row-major on the token grid, (p, q, c) pixel order (`patchify`)."""
        x = self.place_units(self.decoder_embed(latent), mask, self.mask_token.flatten())  # [N, h*w, Dd]
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))

    def forward_loss(self, imgs, pred, mask):
        """MSE per last-stage token (norm-pix targets when on), averaged over the tokens of the removed units."""
        target = patch_targets(patchify(imgs, self.pred_stride), self.norm_pix_loss)  # [N, h*w, s*s*C]
        tokens = self.token_mask(mask)  # [N, h*w]
        loss = F.mse_loss(pred, target, reduction='none').mean(dim=-1)  # [N, h*w]
        return (loss * tokens).sum() / tokens.sum().clamp(min=1)

    def forward(self, imgs, mask_ratio=0.4, mask=None, generator=None):
        """Args: imgs [N, C, H, W]; mask_ratio: fraction of mask units removed (MAE-Lite's Hiera-T: 0.4); mask [N, G]
            (optional, 1 = removed, the same count per row) for reproducible runs; generator for the random one.
        Returns: loss, pred [N, h*w, s*s*C], mask [N, G] (1 = removed)."""
        num_keep = None
        if mask is None:
            mask = self.random_unit_mask(imgs.shape[0], mask_ratio, imgs.device, generator)
            num_keep = masking.num_keep(self.num_units, mask_ratio)
        elif mask.shape != (imgs.shape[0], self.num_units):
            raise ValueError(f'mask must be [N, {self.num_units}] (one entry per mask unit), got {tuple(mask.shape)}')
        elif not (mask.sum(1) == mask[0].sum()).all():  # the visible units are stacked into one [N, K, ...] batch
            raise ValueError('every row of the mask must remove the same number of units')
        latent, _ = self.forward_encoder(imgs, mask, num_keep=num_keep)
        pred = self.forward_decoder(latent, mask)
        return self.forward_loss(imgs, pred.float(), mask), pred, mask


def encoder_state_dict(mae):
    """The encoder part of a `MaskedAutoencoderHiera`: exactly the keys of the `Hiera` classifier without its fc."""
    return {k: v for k, v in mae.state_dict().items() if not k.startswith(('decoder', 'mask_token'))}


class HieraDistiller(nn.Module):
    """D-MAE on Hiera (MAE-Lite): the student's MAE loss plus α·MSE between the student's attention logits, mapped
    to the teacher's heads by a 1x1 conv (no bias, always on), and the frozen teacher's, block pairs `attn_pairs`
    (default the last blocks). The teacher encodes exactly the student's visible mask units; it pools like the
    student (see `create_teacher`) so both last stages hold the same tokens.

    The teacher is kept in a list: not a registered submodule, so it is not trained, not saved, not wrapped by DDP.
    """

    def __init__(self, student, teacher, attn_pairs=((-1, -1),), alpha=1.0):
        super().__init__()
        self.model = student
        self.teacher = [teacher]
        self.alpha = alpha
        self.attn_pairs = [(s % len(student.blocks), t % len(teacher.blocks)) for s, t in attn_pairs]
        self.adapters = nn.ModuleList([
            nn.Conv2d(student.blocks[s].attn.heads, teacher.blocks[t].attn.heads, 1, bias=False)
            for s, t in self.attn_pairs])

    def forward(self, imgs, mask_ratio=0.4, mask=None):
        student, teacher = self.model, self.teacher[0]
        num_keep = None
        if mask is None:
            mask = student.random_unit_mask(imgs.shape[0], mask_ratio, imgs.device)
            num_keep = masking.num_keep(student.num_units, mask_ratio)
        latent, s_logits = student.forward_encoder(imgs, mask, [s for s, _ in self.attn_pairs], num_keep)
        loss_mae = student.forward_loss(imgs, student.forward_decoder(latent, mask).float(), mask)
        with torch.no_grad():
            _, t_logits = encode(teacher, imgs, mask == 0, [t for _, t in self.attn_pairs], num_keep)
        loss_attn = 0.0
        for adapter, s, t, pair in zip(self.adapters, s_logits, t_logits, self.attn_pairs):
            a = adapter(s.flatten(2, -2))  # mask-unit attention: windows x queries as one axis
            if a.shape != t.flatten(2, -2).shape:
                raise ValueError(f'student block {pair[0]} gives attention logits {tuple(s.shape)}, teacher block '
                                 f'{pair[1]} {tuple(t.shape)}: pick blocks with the same tokens and attention type')
            loss_attn = loss_attn + F.mse_loss(a.float(), t.flatten(2, -2).float())
        loss = loss_mae + self.alpha * loss_attn
        return loss, {'loss_mae': loss_mae.detach(), 'loss_attn': loss_attn.detach()}


def _make(cls, preset, kwargs):
    """Merge a factory's preset with the caller's kwargs; the caller wins (so any preset can be overridden)."""
    return cls(**{**preset, **kwargs})


# Hiera-T as timm's hiera_tiny_224 and the Hiera paper: 96-d, stages 1-2-7-2, heads 1-2-4-8 (SPEC §1.4's "46-d" is a
# typo). Hiera-B: 96-d, stages 2-3-16-3.
TINY = dict(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2))
BASE = dict(embed_dim=96, num_heads=1, stages=(2, 3, 16, 3))
# 32 px demo digits: a 3x3 stride-2 stem (16x16 tokens) and three stages, so a mask unit is 4x4 tokens (8 px) and
# there are 4x4 = 16 units; mask-unit attention in the first stage, global after
DEMO = dict(img_size=32, embed_dim=48, num_heads=1, stages=(1, 2, 3), mask_unit_size=(4, 4),
            mask_unit_attn=(True, False, False), patch_kernel=(3, 3), patch_stride=(2, 2), patch_padding=(1, 1))
TEST = dict(DEMO, embed_dim=16, stages=(1, 1, 1))
DEMO_DECODER = dict(decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4)


def hiera_test(**kwargs):
    """A tiny Hiera classifier for unit tests (32 px, 16-d, one block per stage, 10 classes)."""
    return _make(Hiera, dict(TEST, q_pool=2, num_classes=10), kwargs)


def hiera_demo(**kwargs):
    """The demo Hiera classifier: the encoder of `mae_hiera_demo`, pooled twice (4x4 last-stage tokens)."""
    return _make(Hiera, dict(DEMO, q_pool=2), kwargs)


def hiera_tiny_224(**kwargs):
    return _make(Hiera, TINY, kwargs)


def hiera_base_224(**kwargs):
    return _make(Hiera, BASE, kwargs)


def mae_hiera_test(**kwargs):
    return _make(MaskedAutoencoderHiera, dict(TEST, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2),
                 kwargs)


def mae_hiera_demo(**kwargs):
    """The demo MAE-Hiera: 16 mask units of 8 px, decoder 64-d with 2 blocks."""
    return _make(MaskedAutoencoderHiera, dict(DEMO, **DEMO_DECODER), kwargs)


def mae_hiera_tiny_224(**kwargs):
    """MAE Hiera-T (MAE-Lite): 8x8-token (32 px) mask units; the Hiera paper's decoder (512-d, 8 blocks, 16 heads)."""
    return _make(MaskedAutoencoderHiera, TINY, kwargs)


def mae_hiera_base_224(**kwargs):
    """MAE Hiera-B: the distillation teacher's pre-training."""
    return _make(MaskedAutoencoderHiera, BASE, kwargs)


MODELS = {f.__name__: f for f in (hiera_test, hiera_demo, hiera_tiny_224, hiera_base_224, mae_hiera_test,
                                  mae_hiera_demo, mae_hiera_tiny_224, mae_hiera_base_224)}
ALIASES = {'hiera_tiny': 'hiera_tiny_224', 'hiera_base': 'hiera_base_224', 'mae_hiera_tiny': 'mae_hiera_tiny_224',
           'mae_hiera_base': 'mae_hiera_base_224'}


def has_model(name):
    """True when `name` (or its alias) is a factory of this file."""
    return ALIASES.get(name, name) in MODELS


def create_model(name, **kwargs):
    """Build a Hiera classifier / MAE-Hiera by factory name (or short alias); unknown names raise with the list of
    valid ones."""
    return lookup(name, MODELS, ALIASES)(**kwargs)


def create_teacher(name, **kwargs):
    """A headless Hiera encoder pooled as the MAE models are (q_pool = stages - 2), so that its last stage holds the
    tokens of a MAE-Hiera student's last stage: the distillation teacher (weights load as into the classifier)."""
    with torch.device('meta'):  # the stage count only; no memory or init time
        stages = len(create_model(name, **kwargs).stage_ends)
    kwargs = {'num_classes': 0, **kwargs, 'q_pool': stages - 2}
    return create_model(name, **kwargs)
