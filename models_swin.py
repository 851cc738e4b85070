"""Swin Transformer encoders (timm-identical keys) and the two masked-image-modeling models built on them: UM-MAE
(uniform masking, visible units packed into a dense quarter-size map) and SimMIM (block masking, mask token inside
the encoder).

References:
  Swin     - Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", ICCV 2021.
  UM-MAE   - Li et al., "Uniform Masking: Enabling MAE Pre-training for Pyramid-based Vision Transformers with
             Locality", 2022 (uniform sampling, secondary masking, packing, position MLP, PixelShuffle decoder).
  SimMIM   - Xie et al., "SimMIM: A Simple Framework for Masked Image Modeling", CVPR 2022 (block mask, 1x1 conv +
             PixelShuffle decoder, L1 loss on masked pixels).
  MAE-Lite - Wang et al., ICML 2023 (light Swin, 48-d).
  timm     - Wightman, pytorch-image-models (SwinTransformer key names and stage layout, so its weights load).

Layout: tokens travel as [B, H, W, C] maps. Every token carries its (row, col) coordinate at the current stage's
stride; a dense map has the plain grid, UM-MAE's packed map the coordinates its tokens had in the full image. The
relative position bias is computed from these coordinates, so the same code serves both.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_

import masking
from models_mae import decoder_layers, patch_targets, patchify, unpatchify
from models_vit import Mlp, lookup
from util.pos_embed import get_2d_sincos_pos_embed

MASK_VALUE = -100.0  # Swin's additive mask between tokens that the cyclic shift made neighbours (timm uses it too)


def window_partition(x, w):
    """[B, H, W, C] -> [B, nW, w*w, C]; windows in row-major order, tokens row-major inside each."""
    B, H, W, C = x.shape
    x = x.view(B, H // w, w, W // w, w, C).transpose(2, 3)  # [B, H/w, W/w, w, w, C]
    return x.reshape(B, (H // w) * (W // w), w * w, C)


def window_reverse(x, w, H, W):
    """[B, nW, w*w, C] -> [B, H, W, C]; the inverse of `window_partition`."""
    B, C = x.shape[0], x.shape[-1]
    x = x.view(B, H // w, W // w, w, w, C).transpose(2, 3)  # [B, H/w, w, W/w, w, C]
    return x.reshape(B, H, W, C)


def grid_coords(H, W, device=None):
    """(row, col) of every token of a dense H x W map: [1, H, W, 2] long."""
    rows, cols = torch.meshgrid(torch.arange(H, device=device), torch.arange(W, device=device), indexing='ij')
    return torch.stack([rows, cols], dim=-1).unsqueeze(0)


def merge_coords(coords):
    """The coordinates after patch merging: each 2x2 group's top-left coordinate, halved.

    [Bc, H, W, 2] -> [Bc, H/2, W/2, 2]. On a dense map this is the next stage's grid; on UM's packed map (where each
    2x2 group lies inside one visible unit, or at the last stage spans four units) it halves the original coordinates.
    """
    return torch.div(coords[:, ::2, ::2], 2, rounding_mode='floor')


def shift_mask(H, W, w, s, device=None):
    """Swin's mask for shifted windows: after rolling the map by -s, the last window row/column holds tokens from
    opposite borders of the image; tokens of different regions must not attend to each other.

    Returns [nW, w*w, w*w] float: 0 within a region, MASK_VALUE across."""
    def labels(n):
        lab = torch.zeros(n, dtype=torch.long, device=device)
        lab[n - w:] = 1  # the last window before the wrap...
        lab[n - s:] = 2  # ...and the rolled-in strip
        return lab
    region = labels(H)[:, None] * 3 + labels(W)[None, :]  # [H, W]
    win = window_partition(region[None, :, :, None], w)[0, :, :, 0]  # [nW, w*w]
    return (win[:, :, None] != win[:, None, :]).float() * MASK_VALUE  # [nW, L, L]


def relative_index(coords, radius):
    """Row of every token pair in a table of offsets (Δrow, Δcol) ∈ [-radius, radius]², laid out as Swin/timm:
    (Δrow + r)·(2r+1) + (Δcol + r), Δ = query − key. Larger offsets are clamped (they only occur between tokens
    that the shift mask separates).

    Args: coords [Bc, nW, L, 2] long, the tokens' coordinates per window. Returns [Bc, nW, L, L] long."""
    d = coords[:, :, :, None, :] - coords[:, :, None, :, :]  # [Bc, nW, L, L, 2]
    d = d.clamp(-radius, radius) + radius
    return d[..., 0] * (2 * radius + 1) + d[..., 1]


def log_spaced(delta):
    """UM-MAE's input to the position MLP: sign(Δ)·log(1 + |Δ|)."""
    return torch.sign(delta) * torch.log1p(delta.abs())


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, through `F.scaled_dot_product_attention` with the relative
    position bias (plus the shift mask) as its additive `attn_mask`.

    rel_pos='table': a learned [(2w-1)², H] table (`relative_position_bias_table`, Swin/timm layout; offsets within a
    window). rel_pos='mlp': UM-MAE's position MLP, bias = MLP(sign(Δ)·log(1+|Δ|)) (1x1 conv 2->32, ReLU, 1x1 conv
    32->H), defined for any offset, so tokens packed from far apart in the image still get their true offsets.
    """

    def __init__(self, dim, num_heads, window_size, qkv_bias=True, attn_drop=0.0, proj_drop=0.0, rel_pos='table'):
        super().__init__()
        if rel_pos not in ('table', 'mlp'):
            raise ValueError(f"rel_pos must be 'table' or 'mlp', got {rel_pos!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.rel_pos = rel_pos
        if rel_pos == 'table':
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
            trunc_normal_(self.relative_position_bias_table, std=0.02)
        else:
            self.rpe_mlp = nn.Sequential(nn.Conv2d(2, 32, 1), nn.ReLU(), nn.Conv2d(32, num_heads, 1))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def table_radius(self, extent):
        """Largest offset the bias table covers: window - 1 for the learned table; for the MLP, every offset between
        coordinates below `extent` (a packed map: the full map's size at this stage; a dense one: the window)."""
        return self.window_size - 1 if self.rel_pos == 'table' else extent - 1

    def bias_table(self, radius):
        """[(2r+1)², H]: the bias of every offset in [-r, r]², rows as `relative_index`."""
        if self.rel_pos == 'table':
            return self.relative_position_bias_table
        d = log_spaced(torch.arange(-radius, radius + 1, dtype=torch.float32,
                                    device=self.rpe_mlp[0].weight.device))  # [2r+1]
        x = torch.stack(torch.meshgrid(d, d, indexing='ij'), dim=-1).flatten(0, 1)  # [(2r+1)², 2] (Δrow, Δcol)
        # the 1x1 convs applied as Linear layers over the offsets (same weights, the fast matmul path)
        conv1, conv2 = self.rpe_mlp[0], self.rpe_mlp[2]
        x = F.relu(F.linear(x, conv1.weight.flatten(1), conv1.bias))  # [(2r+1)², 32]
        return F.linear(x, conv2.weight.flatten(1), conv2.bias)  # [(2r+1)², H]

    def qkv_heads(self, x):
        """x [B, nW, L, C] -> q, k, v, each [B, nW, H, L, d]."""
        B, nW, L, _ = x.shape
        qkv = self.qkv(x).view(B, nW, L, 3, self.num_heads, self.head_dim)  # [B, nW, L, 3, H, d]
        return tuple(t.transpose(2, 3) for t in qkv.unbind(3))

    def logits(self, x, index, radius):
        """The pre-softmax logits q·kᵀ/√d + relative position bias, without the shift mask (what attention
        distillation matches). x [B, nW, L, C]; index, radius as in `forward`. Returns [B, nW, H, L, L]."""
        q, k, _ = self.qkv_heads(x)
        bias = self.bias_table(radius)[index].permute(0, 1, 4, 2, 3)  # [Bc, nW', H, L, L]
        return (q * self.head_dim ** -0.5) @ k.transpose(-2, -1) + bias

    def forward(self, x, index, radius, mask=None):
        """x [B, nW, L, C]; index [Bc, nW', L, L] (Bc 1 or B, nW' 1 or nW) rows of `bias_table(radius)`;
        mask [nW, L, L] or None. Returns [B, nW, L, C]."""
        B, nW, L, C = x.shape
        q, k, v = self.qkv_heads(x)  # each [B, nW, H, L, d]
        bias = self.bias_table(radius)[index].permute(0, 1, 4, 2, 3)  # [Bc, nW', H, L, L]
        if mask is not None:
            bias = bias + mask[:, None]  # [Bc, nW, H, L, L]
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                           dropout_p=self.attn_drop if self.training else 0.0)  # [B, nW, H, L, d]
        x = x.transpose(2, 3).reshape(B, nW, L, C)
        return self.proj_drop(self.proj(x))


class SwinBlock(nn.Module):
    """x + attn(norm1(x)) in (shifted) windows, then x + mlp(norm2(x)); LayerNorm eps 1e-5 as Swin."""

    def __init__(self, dim, num_heads, window_size, shifted, mlp_ratio=4.0, qkv_bias=True, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, rel_pos='table'):
        super().__init__()
        self.shifted = shifted
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, qkv_bias, attn_drop, drop, rel_pos)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def windows(self, x, ctx):
        """norm1(x), rolled by -s when the block shifts, cut into windows: [B, H, W, C] -> [B, nW, w*w, C]."""
        w, s = ctx[self.shifted][:2]
        y = self.norm1(x)
        if s:
            y = torch.roll(y, (-s, -s), dims=(1, 2))
        return window_partition(y, w)

    def attention_logits(self, x, ctx):
        """This block's pre-softmax attention logits on x [B, H, W, C] (`WindowAttention.logits`): [B, nW, heads,
        w*w, w*w]."""
        _, _, index, radius, _ = ctx[self.shifted]
        return self.attn.logits(self.windows(x, ctx), index, radius)

    def forward(self, x, ctx):
        """x [B, H, W, C]; ctx[shifted] = (window w, shift s, bias index, radius, mask) from the stage."""
        B, H, W, C = x.shape
        w, s, index, radius, mask = ctx[self.shifted]
        y = self.attn(self.windows(x, ctx), index, radius, mask)  # [B, nW, w*w, C]
        y = window_reverse(y, w, H, W)
        if s:
            y = torch.roll(y, (s, s), dims=(1, 2))
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbours -> one token: LayerNorm(4C) + Linear(4C, out, no bias). [B, H, W, C] -> [B, H/2, W/2, out].
    The 4C vector is ordered (column offset, row offset, channel), Swin's [x00, x10, x01, x11] concatenation that
    timm's weights expect."""

    def __init__(self, dim, out_dim):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x):
        B, H, W, C = x.shape
        if H % 2 or W % 2:
            raise ValueError(f'patch merging needs an even map, got {H}x{W}')
        x = x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5)  # [B, H/2, W/2, dc, dr, C]
        return self.reduction(self.norm(x.reshape(B, H // 2, W // 2, 4 * C)))


class SwinStage(nn.Module):
    """(Patch merging, for every stage but the first,) then `depth` blocks alternating plain and shifted windows.

    `resolution` is the stage's dense token grid; as timm, a window larger than it shrinks to it and then never
    shifts. Maps smaller than that at run time (UM's packed map) shrink the window again the same way."""

    def __init__(self, dim, out_dim, depth, num_heads, window_size, resolution, downsample, mlp_ratio=4.0,
                 qkv_bias=True, drop=0.0, attn_drop=0.0, drop_path=(), rel_pos='table'):
        super().__init__()
        self.downsample = PatchMerging(dim, out_dim) if downsample else nn.Identity()
        self.window_size = min(window_size, resolution)
        self.blocks = nn.Sequential(*[
            SwinBlock(out_dim, num_heads, self.window_size, shifted=b % 2 == 1, mlp_ratio=mlp_ratio,
                      qkv_bias=qkv_bias, drop=drop, attn_drop=attn_drop, drop_path=drop_path[b], rel_pos=rel_pos)
            for b in range(depth)])

    def forward(self, x, coords=None, extent=None):
        """x [B, H, W, C] (before merging); coords [B, H, W, 2] of a packed map, or None for a dense one; extent:
        the full map's size (before merging) that the coordinates live in. Returns (x, coords, extent) after the
        stage (coords None for a dense map)."""
        x, coords, extent, ctx = self.prepare(x, coords, extent)
        for blk in self.blocks:
            x = blk(x, ctx)
        return x, coords, extent

    def prepare(self, x, coords=None, extent=None):
        """Patch merging, then what every block of the stage shares, for the map it actually gets: returns
        (x, coords, extent, ctx), ctx[shifted] = (window, shift, bias index, radius, shift mask or None)."""
        if not isinstance(self.downsample, nn.Identity):
            x = self.downsample(x)
            coords = None if coords is None else merge_coords(coords)
            extent = None if extent is None else (extent + 1) // 2
        B, H, W, _ = x.shape
        w = min(self.window_size, H, W)
        if H % w or W % w:
            raise ValueError(f'a {H}x{W} map does not split into {w}x{w} windows')
        attn = self.blocks[0].attn
        radius = attn.table_radius(extent or w)  # a dense map's windows hold offsets up to w - 1
        ctx = {}
        for shifted in {b.shifted for b in self.blocks}:
            s = w // 2 if shifted and min(H, W) > w else 0
            if coords is None:
                # a dense map: every window holds the same offsets (the pairs the shift mask separates aside)
                index = relative_index(window_partition(grid_coords(w, w, x.device), w), radius)  # [1, 1, L, L]
            else:
                c = torch.roll(coords, (-s, -s), dims=(1, 2)) if s else coords
                index = relative_index(window_partition(c, w), radius)  # [B, nW, L, L]
            ctx[shifted] = (w, s, index, radius, shift_mask(H, W, w, s, x.device) if s else None)
        return x, coords, extent, ctx


class PatchEmbed(nn.Module):
    """Stride-p convolution + LayerNorm: [B, C, H, W] -> [B, H/p, W/p, D] (keys `patch_embed.proj/norm`, as timm)."""

    def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=96):
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x):
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # [B, h, w, D]


class ClassifierHead(nn.Module):
    """Dropout + Linear; the module is named `head` and its Linear `fc`, timm's `head.fc` key."""

    def __init__(self, dim, num_classes, drop=0.0):
        super().__init__()
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x):
        return self.fc(self.drop(x))


def init_weights(module):
    """Swin's init: trunc-normal(0.02) Linear weights, zero biases, LayerNorm (1, 0)."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class SwinTransformer(nn.Module):
    """Swin for classification: patch embed, stages with patch merging, global average pooling, `head.fc`.

    fc_norm=False is the Swin/timm layout: `norm` on every token of the last stage, then the mean (timm's weights
    load strictly). fc_norm=True is the MAE fine-tuning layout: the mean of the last stage's tokens, then `fc_norm`
    (no `norm`; the pre-training `norm` is dropped by util/pretrained).
    `embed_dim` is the first stage's width; the attribute `embed_dim`, like `num_features`, is the output width
    (what the probes read, as for the ViT)."""

    def __init__(self, img_size=224, patch_size=4, in_chans=3, num_classes=1000, embed_dim=96, depths=(2, 2, 6, 2),
                 num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4.0, qkv_bias=True, drop_rate=0.0,
                 attn_drop_rate=0.0, drop_path_rate=0.0, rel_pos='table', fc_norm=False):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f'depths {depths} and num_heads {num_heads} need one entry per stage')
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.depths = tuple(depths)
        self.rel_pos = rel_pos
        self.stem_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        dims = [embed_dim * 2 ** s for s in range(len(depths))]
        self.num_features = self.embed_dim = dims[-1]
        n = sum(depths)
        dpr = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # stochastic depth grows over all blocks
        res = self.patch_embed.grid_size[0]
        layers = []
        for s, depth in enumerate(depths):
            res = res if s == 0 else res // 2
            layers.append(SwinStage(dims[max(s - 1, 0)], dims[s], depth, num_heads[s], window_size, res,
                                    downsample=s > 0, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                                    attn_drop=attn_drop_rate, drop_path=dpr[sum(depths[:s]):sum(depths[:s + 1])],
                                    rel_pos=rel_pos))
        self.layers = nn.Sequential(*layers)
        self.norm = nn.Identity() if fc_norm else nn.LayerNorm(self.num_features)
        self.fc_norm = nn.LayerNorm(self.num_features) if fc_norm else nn.Identity()
        self.head = ClassifierHead(self.num_features, num_classes, drop_rate)
        self.apply(init_weights)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {n for n, _ in self.named_parameters()
                if n.endswith(('relative_position_bias_table', 'mask_token', 'decoder_pos_embed'))}

    def get_classifier(self):
        return self.head.fc

    def forward_tokens(self, x, coords=None, extent=None):
        """Run the stages. x [B, H, W, C] embedded tokens; coords [B, H, W, 2] their coordinates in a full map of
        size `extent` (UM's packed map) or None (dense). Returns the last stage's map [B, h, w, C_last]."""
        for stage in self.layers:
            x, coords, extent = stage(x, coords, extent)
        return x

    def forward_features(self, x):
        """[B, C, H, W] -> last-stage tokens [B, h, w, C_last] after `norm` (identity in the fc_norm layout)."""
        return self.norm(self.forward_tokens(self.patch_embed(x)))

    def pool(self, x):
        """[B, h, w, C] -> [B, C]: global average, then `fc_norm` (identity in the Swin layout)."""
        return self.fc_norm(x.mean(dim=(1, 2)))

    def forward_head(self, x):
        return self.head(self.pool(x))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


class UniformMaskingMAE:
    """The encoder-independent half of UM-MAE on a pyramid encoder (Swin here, PVT in models_pvt.py): uniform
    masking, packing the visible units, secondary masking at the first embedding, the PixelShuffle decoder back to
    one token per visible unit, and MSE (norm-pix) on the masked units.

    A subclass that is also the encoder calls `init_um` after the encoder's __init__ and defines
    `forward_encoder(imgs, ids_keep, vis_mask)` -> the last stage's packed map [N, G/4, G/4, C_last]. A unit is the
    area of one last-but-one-stage token, so the stages before the last never merge tokens of two units."""

    def init_um(self, img_size, patch_size, unit_size, in_chans, embed_dim, mlp_ratio, decoder_embed_dim,
                decoder_depth, decoder_num_heads, norm_pix_loss, vis_mask_ratio):
        self.unit_size = unit_size
        self.unit_tokens = self.unit_size // patch_size  # first-stage tokens per unit side
        self.unit_grid = img_size // self.unit_size
        if img_size % self.unit_size or self.unit_grid % 4:
            raise ValueError(f'img_size {img_size} must be a multiple of 4 units of {self.unit_size} px')
        self.norm_pix_loss = norm_pix_loss
        self.vis_mask_ratio = vis_mask_ratio
        self.vis_mask_token = nn.Parameter(torch.zeros(embed_dim))
        # Linear to 4 x decoder width + PixelShuffle(2): each last-stage token covers 2x2 visible units
        self.decoder_embed = nn.Linear(self.num_features, 4 * decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(get_2d_sincos_pos_embed(decoder_embed_dim, self.unit_grid).unsqueeze(0),
                                              requires_grad=False)  # [1, G*G, Dd], no cls
        self.decoder_blocks, self.decoder_norm, self.decoder_pred = decoder_layers(
            self.decoder_embed, decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio,
            self.unit_size ** 2 * in_chans, init=init_weights)
        nn.init.normal_(self.vis_mask_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def pack(self, imgs, ids_keep):
        """The visible units' pixels as one dense image. imgs [N, C, H, W]; ids_keep [N, K] (block-row-major, from
        `masking.uniform_masking`). Returns [N, C, H/2, W/2]; packed unit k sits at block position k."""
        units = patchify(imgs, self.unit_size)  # [N, G*G, u*u*C]
        return unpatchify(masking.gather_tokens(units, ids_keep), self.unit_size, self.in_chans)

    def embed_visible(self, imgs, ids_keep, vis_mask, patch_embed):
        """The packed visible units through `patch_embed` (a `PatchEmbed`: proj, then norm), secondary-masked.

        Args: imgs [N, C, H, W]; ids_keep [N, K]; vis_mask [N, K] (1 = this visible unit shows `vis_mask_token`).
        Returns the packed first-stage map [N, Ph, Pw, D] and each token's original coordinate [N, Ph, Pw, 2]."""
        x = patch_embed.proj(self.pack(imgs, ids_keep)).permute(0, 2, 3, 1)  # [N, G/2*t, G/2*t, D]
        N, Ph, Pw, _ = x.shape
        t, g = self.unit_tokens, self.unit_grid // 2
        # secondary masking per unit: its t x t tokens become the token, which then goes through the embed norm
        m = vis_mask.view(N, g, 1, g, 1).expand(N, g, t, g, t).reshape(N, Ph, Pw, 1).bool()  # [N, Ph, Pw, 1]
        x = patch_embed.norm(torch.where(m, self.vis_mask_token.to(x.dtype), x))
        return x, masking.packed_coords(ids_keep, (self.unit_grid, self.unit_grid), t)  # coords [N, Ph, Pw, 2]

    def decoder_tokens(self, latent):
        """[N, h, w, C_last] -> one token per visible unit [N, K, Dd], in packing (block-row-major) order."""
        x = self.decoder_embed(latent).permute(0, 3, 1, 2)  # [N, 4*Dd, h, w]
        x = F.pixel_shuffle(x, 2)  # [N, Dd, 2h, 2w]: channel 4c + 2i + j -> (c, 2y + i, 2x + j)
        return x.flatten(2).transpose(1, 2)  # [N, K, Dd]

    def place_visible(self, x, ids_keep):
        """The decoder's input: visible token k at unit ids_keep[:, k] with that unit's own position, mask tokens
        with theirs everywhere else. (UM-MAE's code takes positions in sorted unit order instead, which gives about
        three quarters of the tokens another unit's position.) x [N, K, Dd] -> [N, G*G, Dd]."""
        N, K, Dd = x.shape
        full = self.mask_token.to(x.dtype).expand(N, self.decoder_pos_embed.shape[1], Dd)
        full = full.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, Dd), x)  # [N, L, Dd]
        return full + self.decoder_pos_embed

    def forward_decoder(self, latent, ids_keep):
        """Returns predictions [N, G*G, u*u*C] for every unit, (p, q, c) order."""
        x = self.place_visible(self.decoder_tokens(latent), ids_keep)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))

    def forward_loss(self, imgs, pred, mask):
        """Per-unit MSE (norm-pix targets when on), averaged over the masked units. mask [N, G*G], 1 = removed."""
        target = patch_targets(patchify(imgs, self.unit_size), self.norm_pix_loss)
        loss = F.mse_loss(pred, target, reduction='none').sum(dim=-1)  # [N, L]
        return (loss * mask).sum() / (mask.sum().clamp(min=1) * pred.shape[-1])

    def forward(self, imgs, mask_ratio=0.75, ids_keep=None, vis_mask=None, generator=None):
        """Args: imgs [N, C, H, W]; mask_ratio must be 0.75 (uniform masking keeps one unit in four);
            ids_keep [N, K] / vis_mask [N, K] (optional): given masks, for reproducible runs; generator: for the
            random ones.
        Returns: loss, pred [N, G*G, u*u*C], mask [N, G*G] (1 = removed)."""
        if abs(mask_ratio - 0.75) > 1e-6:
            raise ValueError(f'uniform masking removes exactly 75% of the units, got mask_ratio {mask_ratio}')
        N, G = imgs.shape[0], self.unit_grid
        if ids_keep is None:
            ids_keep, mask = masking.uniform_masking(N, (G, G), imgs.device, generator)
        else:
            mask = torch.ones(N, G * G, device=imgs.device).scatter(1, ids_keep, 0.0)
        if vis_mask is None:
            vis_mask = masking.random_masking(N, ids_keep.shape[1], self.vis_mask_ratio, imgs.device, generator)[1]
        pred = self.forward_decoder(self.forward_encoder(imgs, ids_keep, vis_mask), ids_keep)
        return self.forward_loss(imgs, pred.float(), mask), pred, mask


class MaskedAutoencoderSwin(UniformMaskingMAE, SwinTransformer):
    """UM-MAE on Swin: uniform masking (one visible unit per 2x2 block of units), the visible units packed into a
    dense quarter-size map that Swin encodes with each token's original coordinates (position-MLP bias), a
    PixelShuffle decoder back to one token per visible unit, and MSE (norm-pix) on the masked units.

    A unit is the area of one last-but-one-stage token: patch_size·2^(stages-2) px (16 px for Swin-T). Encoder keys
    equal `SwinTransformer`'s (with rel_pos='mlp'); `vis_mask_token`, `mask_token` and `decoder*` are pre-training
    only."""

    def __init__(self, img_size=256, patch_size=4, in_chans=3, embed_dim=96, depths=(2, 2, 6, 2),
                 num_heads=(3, 6, 12, 24), window_size=8, mlp_ratio=4.0, drop_path_rate=0.0, decoder_embed_dim=512,
                 decoder_depth=2, decoder_num_heads=16, norm_pix_loss=True, vis_mask_ratio=0.25):
        super().__init__(img_size, patch_size, in_chans, 0, embed_dim, depths, num_heads, window_size, mlp_ratio,
                         drop_path_rate=drop_path_rate, rel_pos='mlp')
        self.init_um(img_size, patch_size, patch_size * 2 ** (len(depths) - 2), in_chans, embed_dim, mlp_ratio,
                     decoder_embed_dim, decoder_depth, decoder_num_heads, norm_pix_loss, vis_mask_ratio)

    def forward_encoder(self, imgs, ids_keep, vis_mask):
        """Encode the packed visible units.

        Args: imgs [N, C, H, W]; ids_keep [N, K]; vis_mask [N, K] (1 = this visible unit shows `vis_mask_token`).
        Returns the last stage's packed map [N, G/4, G/4, C_last] after `norm`."""
        x, coords = self.embed_visible(imgs, ids_keep, vis_mask, self.patch_embed)
        return self.norm(self.forward_tokens(x, coords, self.patch_embed.grid_size[0]))


class SimMIMSwin(SwinTransformer):
    """SimMIM on Swin: every token is encoded; the block-masked ones show a learned `mask_token` (after the
    patch-embed norm); a 1x1 conv + PixelShuffle predicts the pixels; L1 on the masked pixels, divided by the
    channel count. Encoder keys equal `SwinTransformer`'s."""

    def __init__(self, img_size=192, patch_size=4, in_chans=3, embed_dim=96, depths=(2, 2, 6, 2),
                 num_heads=(3, 6, 12, 24), window_size=6, mlp_ratio=4.0, drop_path_rate=0.0, mask_patch_size=32,
                 rel_pos='table'):
        super().__init__(img_size, patch_size, in_chans, 0, embed_dim, depths, num_heads, window_size, mlp_ratio,
                         drop_path_rate=drop_path_rate, rel_pos=rel_pos)
        if mask_patch_size % patch_size or img_size % mask_patch_size:
            raise ValueError(f'mask_patch_size {mask_patch_size} must divide img_size {img_size} and be a multiple '
                             f'of patch_size {patch_size}')
        self.mask_patch_size = mask_patch_size
        self.stride = patch_size * 2 ** (len(depths) - 1)
        self.mask_token = nn.Parameter(torch.zeros(embed_dim))
        trunc_normal_(self.mask_token, std=0.02)
        self.decoder = nn.Sequential(nn.Conv2d(self.num_features, self.stride ** 2 * in_chans, 1),
                                     nn.PixelShuffle(self.stride))

    def forward(self, imgs, mask_ratio=0.6, mask=None, generator=None):
        """Args: imgs [N, C, H, W]; mask_ratio of the mask patches; mask [N, h*w] (optional, token grid, 1 = masked).
        Returns: loss, reconstruction [N, C, H, W], mask [N, h*w]."""
        N, C, H, W = imgs.shape
        p, s = self.patch_embed.patch_size, self.mask_patch_size
        if mask is None:
            mask = masking.block_masking(N, (H // s, W // s), s // p, mask_ratio, imgs.device, generator)
        x = self.norm(self.forward_tokens(self.embed_masked(imgs, mask)))  # [N, h', w', C_last]
        loss, rec = self.reconstruction_loss(imgs, x, mask)
        return loss, rec, mask

    def embed_masked(self, imgs, mask):
        """Patch embedding with the masked tokens replaced by `mask_token`: imgs [N, C, H, W], mask [N, h*w] ->
        [N, h, w, D]."""
        x = self.patch_embed(imgs)  # [N, h, w, D]
        m = mask.view(*x.shape[:3], 1).to(x.dtype)
        return x * (1 - m) + self.mask_token.to(x.dtype) * m

    def reconstruction_loss(self, imgs, latent, mask):
        """Decode the normed last-stage map latent [N, h', w', C_last] to pixels; L1 on the masked ones / C.
        Returns (loss, reconstruction [N, C, H, W])."""
        N, C, H, W = imgs.shape
        p = self.patch_embed.patch_size
        rec = self.decoder(latent.permute(0, 3, 1, 2))  # [N, C, H, W]
        pix = mask.view(N, 1, H // p, 1, W // p, 1).expand(N, 1, H // p, p, W // p, p).reshape(N, 1, H, W)
        loss = (F.l1_loss(rec.float(), imgs, reduction='none') * pix).sum() / (pix.sum() + 1e-5) / C
        return loss, rec


def _make(cls, preset, kwargs):
    """Merge a factory's preset with the caller's kwargs; the caller wins (so any preset can be overridden)."""
    return cls(**{**preset, **kwargs})


TINY = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
# 32 px demo digits: patch 2 and three stages (16x16 -> 8x8 -> 4x4 tokens); UM units are 4 px, 8x8 of them
DEMO = dict(img_size=32, patch_size=2, embed_dim=48, depths=(2, 2, 2), num_heads=(3, 6, 12))
TEST = dict(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4))


def swin_test(**kwargs):
    """A tiny Swin for unit tests: 32 px, patch 2, three stages of width 16/32/64, window 4, position MLP."""
    return _make(SwinTransformer, dict(**TEST, window_size=4, num_classes=10, rel_pos='mlp'), kwargs)


def swin_demo(**kwargs):
    """The demo-data Swin (fine-tuning/probing the demo UM-MAE and SimMIM): 32 px, patch 2, light 48-d stem, three
    stages, window 8 on the 16x16 map (the same window count as pre-training's window 4 on the packed 8x8 map)."""
    return _make(SwinTransformer, dict(**DEMO, window_size=8, num_classes=10, rel_pos='mlp'), kwargs)


def swin_light_patch4_window7_224(**kwargs):
    """MAE-Lite's light Swin: Swin-T's depths at width 48."""
    return _make(SwinTransformer, dict(embed_dim=48, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)), kwargs)


def swin_tiny_patch4_window7_224(**kwargs):
    return _make(SwinTransformer, dict(**TINY), kwargs)


def swin_tiny_patch4_window16_256(**kwargs):
    """Swin-T as UM-MAE fine-tunes it: 256 px, window 16, position-MLP bias (loads UM-MAE checkpoints as they are)."""
    return _make(SwinTransformer, dict(**TINY, img_size=256, window_size=16, rel_pos='mlp'), kwargs)


def swin_small_patch4_window7_224(**kwargs):
    return _make(SwinTransformer, dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)), kwargs)


def swin_base_patch4_window7_224(**kwargs):
    return _make(SwinTransformer, dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)), kwargs)


def swin_large_patch4_window7_224(**kwargs):
    return _make(SwinTransformer, dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)), kwargs)


def mae_swin_test(**kwargs):
    """A tiny UM-MAE for unit tests: swin_test's encoder with window 4 on the 8x8 packed map, decoder 16-d."""
    return _make(MaskedAutoencoderSwin, dict(**TEST, window_size=4, decoder_embed_dim=16, decoder_depth=1,
                                             decoder_num_heads=2), kwargs)


def mae_swin_demo(**kwargs):
    """The demo UM-MAE: swin_demo's encoder, window 4 on the 8x8 packed map; decoder 64-d, 2 blocks."""
    return _make(MaskedAutoencoderSwin, dict(**DEMO, window_size=4, decoder_embed_dim=64, decoder_depth=2,
                                             decoder_num_heads=4), kwargs)


def mae_swin_tiny_patch4_window8_256(**kwargs):
    """UM-MAE Swin-T: 256 px, 16-px units, window 8 on the packed 32x32 map; decoder 512-d, 2 blocks, 16 heads."""
    return _make(MaskedAutoencoderSwin, dict(**TINY), kwargs)


def simmim_swin_test(**kwargs):
    return _make(SimMIMSwin, dict(**TEST, window_size=4, mask_patch_size=8, rel_pos='mlp'), kwargs)


def simmim_swin_demo(**kwargs):
    """The demo SimMIM: swin_demo's encoder (window 8, position MLP, so swin_demo fine-tunes it), 8-px mask patches."""
    return _make(SimMIMSwin, dict(**DEMO, window_size=8, mask_patch_size=8, rel_pos='mlp'), kwargs)


def simmim_swin_tiny_patch4_window6_192(**kwargs):
    """SimMIM Swin-T as the SimMIM paper pre-trains it: 192 px, window 6, table bias, 32-px mask patches."""
    return _make(SimMIMSwin, dict(**TINY), kwargs)


def simmim_swin_tiny_patch4_window8_256(**kwargs):
    """SimMIM Swin-T at UM-MAE's input (256 px, window 8): the equal-input baseline of the benchmark."""
    return _make(SimMIMSwin, dict(**TINY, img_size=256, window_size=8), kwargs)


def simmim_swin_light_patch4_window7_224(**kwargs):
    """MAE-Lite's SimMIM light Swin: 48-d, 224 px, window 7."""
    return _make(SimMIMSwin, dict(embed_dim=48, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), img_size=224,
                                  window_size=7), kwargs)


def simmim_swin_light_d2_patch4_window7_224(**kwargs):
    """MAE-Lite's D² Swin student: the SimMIM light Swin with one extra (attention-only) last block, 2-2-6-3."""
    return simmim_swin_light_patch4_window7_224(**{'depths': (2, 2, 6, 3), **kwargs})


def simmim_swin_tiny_patch4_window7_224(**kwargs):
    """SimMIM Swin-T at 224 px, window 7: the D² teacher, windowed as the light student."""
    return _make(SimMIMSwin, dict(**TINY, img_size=224, window_size=7), kwargs)


def simmim_swin_test_d2(**kwargs):
    """A tiny D² Swin student for unit tests: simmim_swin_test with one extra last block (2-2-3)."""
    return simmim_swin_test(**{'depths': (2, 2, 3), **kwargs})


def simmim_swin_demo_d2(**kwargs):
    """The demo D² Swin student: simmim_swin_demo with one extra last block (2-2-3)."""
    return simmim_swin_demo(**{'depths': (2, 2, 3), **kwargs})


def simmim_swin_demo_teacher(**kwargs):
    """The demo D² teacher: simmim_swin_demo at twice the width (96-d stem, as Swin-T to the light Swin)."""
    return simmim_swin_demo(**{'embed_dim': 96, **kwargs})


MODELS = {f.__name__: f for f in (
    swin_test, swin_demo, swin_light_patch4_window7_224, swin_tiny_patch4_window7_224, swin_tiny_patch4_window16_256,
    swin_small_patch4_window7_224, swin_base_patch4_window7_224, swin_large_patch4_window7_224, mae_swin_test,
    mae_swin_demo, mae_swin_tiny_patch4_window8_256, simmim_swin_test, simmim_swin_demo,
    simmim_swin_tiny_patch4_window6_192, simmim_swin_tiny_patch4_window8_256, simmim_swin_light_patch4_window7_224,
    simmim_swin_light_d2_patch4_window7_224, simmim_swin_tiny_patch4_window7_224, simmim_swin_test_d2,
    simmim_swin_demo_d2, simmim_swin_demo_teacher)}
ALIASES = {'swin_tiny': 'swin_tiny_patch4_window7_224', 'swin_small': 'swin_small_patch4_window7_224',
           'swin_base': 'swin_base_patch4_window7_224', 'swin_large': 'swin_large_patch4_window7_224',
           'swin_light': 'swin_light_patch4_window7_224', 'swin_tiny_um': 'swin_tiny_patch4_window16_256',
           'mae_swin_tiny': 'mae_swin_tiny_patch4_window8_256',
           'simmim_swin_tiny': 'simmim_swin_tiny_patch4_window6_192',
           'simmim_swin_tiny_256': 'simmim_swin_tiny_patch4_window8_256',
           'simmim_swin_light': 'simmim_swin_light_patch4_window7_224',
           'simmim_swin_light_d2': 'simmim_swin_light_d2_patch4_window7_224',
           'simmim_swin_tiny_224': 'simmim_swin_tiny_patch4_window7_224'}


def has_model(name):
    """True when `name` (or its alias) is a factory of this file."""
    return ALIASES.get(name, name) in MODELS


def create_model(name, **kwargs):
    """Build a Swin / UM-MAE Swin / SimMIM Swin by factory name (or short alias); unknown names raise with the list
    of valid ones."""
    return lookup(name, MODELS, ALIASES)(**kwargs)
