"""Masked autoencoder with a ViT encoder.

References:
  MAE      - He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022 (method, FB layout).
  MAE-Lite - Wang et al., ICML 2023 (Tiny/Small presets with one-block decoders; the 13-block D² student).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import masking
from models_vit import Block, PatchEmbed, init_weights, lookup, run_blocks
from util.pos_embed import get_2d_sincos_pos_embed


def patchify(imgs, p):
    """[N, C, h*p, w*p] -> [N, h*w, p*p*C], channel last within a patch ((p, q, c) order, as the official MAE)."""
    N, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(N, C, h, p, w, p)
    x = torch.einsum('nchpwq->nhwpqc', x)
    return x.reshape(N, h * w, p * p * C)


# `patchify` run eagerly under torch.compile, for a model's first op only (the graph break then costs nothing):
# inductor would otherwise inline this permutation into every reader of the patches as a scalar gather with channel
# stride H*W, and it re-reads them for the target several times (recomputed again in backward); 1-4% of a compiled
# ViT-Tiny step on a 2-core CPU.
patchify_eager = torch.compiler.disable(patchify)


def cpq_to_pqc(t, p, in_chans=3):
    """Reorder the per-pixel rows of a decoder head (`decoder_pred.weight` [p*p*C, D] or its bias) from MAE-priv's
    (c, p, q) patch order to the (p, q, c) order of `patchify` and the official MAE (SPEC §1.2)."""
    return t.reshape(in_chans, p, p, *t.shape[1:]).permute(1, 2, 0, *range(3, t.dim() + 2)).reshape(t.shape)


def unpatchify(x, p, in_chans=3):
    """[N, h*w, p*p*C] -> [N, C, h*p, w*p]; the inverse of `patchify` for a square grid."""
    N, L, _ = x.shape
    h = w = int(L ** 0.5)
    if h * w != L:
        raise ValueError(f'unpatchify needs a square token grid, got {L} tokens')
    x = x.reshape(N, h, w, p, p, in_chans)
    x = torch.einsum('nhwpqc->nchpwq', x)
    return x.reshape(N, in_chans, h * p, w * p)


def patch_targets(patches, norm_pix_loss):
    """Reconstruction targets: raw pixels, or each patch normalised by its own mean and unbiased variance (as the
    official MAE): (t - mean) / sqrt(var + 1e-6)."""
    if not norm_pix_loss:
        return patches
    # the same value as one fused layer_norm, whose variance is the biased one, var * (D-1)/D:
    #   (t - mean) / sqrt(var + 1e-6) = (t - mean) / sqrt(var (D-1)/D + 1e-6 (D-1)/D) * sqrt((D-1)/D)
    # (5x cheaper on CPU than mean, var, sub and div over every pixel)
    D = patches.shape[-1]
    scale = patches.new_full((D,), ((D - 1) / D) ** 0.5)
    return F.layer_norm(patches, (D,), weight=scale, eps=1e-6 * (D - 1) / D)


def decoder_layers(embed, dim, depth, num_heads, mlp_ratio, out_dim, init=init_weights):
    """MAE's decoder after its input projection `embed`: `depth` ViT blocks of width `dim`, a LayerNorm and the
    per-token pixel predictor (dim -> out_dim). `init` is applied to embed, blocks, norm and predictor, in that order.
    Returns (blocks, norm, pred), for the pyramid MAEs (models_swin, models_hiera)."""
    blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
    norm = nn.LayerNorm(dim, eps=1e-6)
    pred = nn.Linear(dim, out_dim)
    for m in (embed, blocks, norm, pred):
        m.apply(init)
    return blocks, norm, pred


class MaskedAutoencoderViT(nn.Module):
    """MAE: the encoder sees only the visible patches; a light decoder reconstructs the masked ones.

    Encoder keys (`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.*`, `norm`) equal the ViT's, so the encoder
    part of a checkpoint loads into `models_vit.VisionTransformer` by name.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0, norm_pix_loss=False,
                 drop_path_rate=0.0, mask_type='random', vis_mask_ratio=0.25):
        super().__init__()
        if mask_type not in ('random', 'uniform'):
            raise ValueError(f"mask_type must be 'random' or 'uniform', got {mask_type!r}")
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        # UM-MAE for ViT (mask_type='uniform'): one visible patch per 2x2 block, and a random vis_mask_ratio of the
        # visible ones shown as the learned vis_mask_token (+ their pos_embed); the token exists only then
        self.mask_type = mask_type
        self.vis_mask_ratio = vis_mask_ratio
        if mask_type == 'uniform':
            self.vis_mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # fixed sin-cos, stored as a frozen parameter so it is part of the state dict (official layout)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, drop_path=dpr[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(decoder_embed_dim, decoder_num_heads, mlp_ratio)
                                             for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)
        self.initialize_weights()

    def initialize_weights(self):
        grid = self.patch_embed.grid_size
        self.pos_embed.data.copy_(get_2d_sincos_pos_embed(self.embed_dim, grid, cls_token=True).unsqueeze(0))
        self.decoder_pos_embed.data.copy_(
            get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid, cls_token=True).unsqueeze(0))
        self.apply(init_weights)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear over the flattened patch
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        if self.mask_type == 'uniform':
            nn.init.normal_(self.vis_mask_token, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {'pos_embed', 'cls_token', 'mask_token', 'decoder_pos_embed', 'vis_mask_token'}

    def patchify(self, imgs):
        return patchify_eager(imgs, self.patch_size)

    def unpatchify(self, x):
        return unpatchify(x, self.patch_size, self.in_chans)

    def embed_visible(self, patches, ids_keep, vis_mask=None):
        """Patch-embed the kept patches, add their position embedding, prepend cls.

        Args: patches [N, L, p*p*C] ((p, q, c) order); ids_keep [N, K]; vis_mask [N, K] (optional, UM-MAE's
            secondary masking: 1 = this kept patch shows `vis_mask_token` + its pos_embed). Returns [N, 1+K, D]."""
        # embedding only the kept patches is the same as embedding all and then dropping, at a quarter of the cost
        x = self.patch_embed.embed_patches(masking.gather_tokens(patches, ids_keep))  # [N, K, D]
        if vis_mask is not None:
            x = torch.where(vis_mask.unsqueeze(-1).bool(), self.vis_mask_token.to(x.dtype), x)  # [N, K, D]
        pos = self.pos_embed[0, 1:].unsqueeze(0).expand(x.shape[0], -1, -1)  # [N, L, D]
        x = x + masking.gather_tokens(pos, ids_keep)  # [N, K, D]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)  # [N, 1, D]
        return torch.cat([cls, x], dim=1)  # [N, 1+K, D]

    def forward_encoder(self, patches, ids_keep, return_layers=(), extras_at=(), vis_mask=None):
        """Encode the kept patches only.

        Args: patches [N, L, p*p*C] (all patches, (p, q, c) order); ids_keep [N, K].
            `return_layers`/`extras_at`: block indices whose outputs / attention extras to hand out (distillation).
            vis_mask [N, K] (optional): UM-MAE's secondary masking, see `embed_visible`.
        Returns: latent [N, 1+K, D] after `norm`; with return_layers or extras_at also (layer outputs, extras).
        """
        x = self.embed_visible(patches, ids_keep, vis_mask)
        x, outs, extras = run_blocks(self.blocks, x, return_layers, extras_at)
        x = self.norm(x)
        if return_layers or extras_at:
            return x, [outs[i] for i in sorted(outs)], extras
        return x

    def forward_decoder(self, latent, ids_restore):
        """Args: latent [N, 1+K, D]; ids_restore [N, L]. Returns predictions [N, L, p*p*C] (cls dropped)."""
        x = self.decoder_embed(latent)  # [N, 1+K, Dd]
        N, K1, Dd = x.shape
        L = ids_restore.shape[1]
        x = torch.cat([x, self.mask_token.expand(N, L + 1 - K1, -1)], dim=1)  # [N, 1+L, Dd], kept tokens first
        # one gather puts every token back in place: cls stays at 0, token j comes from 1 + ids_restore[:, j]
        index = torch.cat([ids_restore.new_zeros(N, 1), ids_restore + 1], dim=1)  # [N, 1+L]
        x = masking.gather_tokens(x, index) + self.decoder_pos_embed  # [N, 1+L, Dd]
        for blk in self.decoder_blocks:
            x = blk(x)
        # drop cls before the head: nothing is predicted for it, and slicing the p*p*C-wide output instead would cost
        # a zero-filled full-size gradient in backward
        return self.decoder_pred(self.decoder_norm(x[:, 1:]))  # [N, L, p*p*C]

    def forward_loss(self, patches, pred, mask):
        """Mean squared error per patch, averaged over the masked patches only.

        Args: patches [N, L, p*p*C] (pixels), pred [N, L, p*p*C], mask [N, L] (1 = removed)."""
        target = patch_targets(patches, self.norm_pix_loss)
        # summed (not averaged) squared error, the 1/(p*p*C) folded into the normaliser: mse_loss is one fused pass
        # forward and backward, and sum's backward is a free broadcast where mean's divides every element
        loss = F.mse_loss(pred, target, reduction='none').sum(dim=-1)  # [N, L]
        return (loss * mask).sum() / (mask.sum().clamp(min=1) * pred.shape[-1])

    def forward(self, imgs, mask_ratio=0.75, noise=None, mask=None, return_ids=False, vis_mask=None):
        """Args:
            imgs [N, C, H, W]; mask_ratio (0 encodes every patch);
            noise [N, L] (optional): decides the mask (smallest kept), for reproducible runs;
            mask [N, L] (optional, 1 = removed, same count per row): use exactly this mask.
            With mask_type='uniform' and neither given, the mask is UM-MAE's uniform one (mask_ratio must be 0.75)
            and a random vis_mask_ratio of the kept patches is secondary-masked; vis_mask [N, K] (optional) gives
            that choice (1 = replaced by vis_mask_token), in the order of the kept patches (ascending index).
        Returns: loss, pred [N, L, p*p*C], mask [N, L]; with return_ids also ids_shuffle [N, L] (so a teacher can see
        the same visible patches).
        """
        patches = self.patchify(imgs)  # [N, L, p*p*C]
        N, L, _ = patches.shape
        if mask is not None:
            noise, mask_ratio = masking.mask_to_noise(mask)
        elif noise is None and self.mask_type == 'uniform':
            if abs(mask_ratio - 0.75) > 1e-6:
                raise ValueError(f'uniform masking removes exactly 75% of the patches, got mask_ratio {mask_ratio}')
            # as noise, the 0/1 mask keeps its visible patches in ascending order (stable sort); it removes exactly
            # 75%, so there is nothing to check (and no host read, as `mask_to_noise` would need)
            noise = masking.uniform_masking(N, self.patch_embed.grid_size, imgs.device)[1]
        elif noise is None:
            noise = masking.random_noise(N, L, device=imgs.device)
        ids_keep, mask, ids_restore, ids_shuffle = masking.masking_from_noise(noise, mask_ratio)
        if self.mask_type == 'uniform' and vis_mask is None:
            vis_mask = masking.random_masking(N, ids_keep.shape[1], self.vis_mask_ratio, imgs.device)[1]  # [N, K]
        latent = self.forward_encoder(patches, ids_keep, vis_mask=vis_mask)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(patches, pred.float(), mask)
        if return_ids:
            return loss, pred, mask, ids_shuffle
        return loss, pred, mask


def _make(preset, kwargs):
    """Merge a factory's preset with the caller's kwargs; the caller wins."""
    return MaskedAutoencoderViT(**{**preset, **kwargs})


def mae_vit_test(**kwargs):
    """A tiny MAE for unit tests: 32 px, patch 8, 2 blocks of width 32, one decoder block of width 16."""
    return _make(dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16,
                      decoder_depth=1, decoder_num_heads=2), kwargs)


def mae_vit_demo_patch4(**kwargs):
    """The demo-data MAE: 32 px, patch 4, 6 blocks of width 128; decoder 64 wide, 2 blocks."""
    return _make(dict(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4, decoder_embed_dim=64,
                      decoder_depth=2, decoder_num_heads=4), kwargs)


def mae_vit_tiny_patch16(**kwargs):
    """MAE-Lite Tiny: 192-d, 12 blocks, 12 heads; decoder 96-d, 1 block, 3 heads."""
    return _make(dict(patch_size=16, embed_dim=192, depth=12, num_heads=12, decoder_embed_dim=96, decoder_depth=1,
                      decoder_num_heads=3), kwargs)


def mae_vit_tiny_d13_patch16(**kwargs):
    """MAE-Lite D²-MAE student: Tiny with a 13th block whose attention logits are distilled (see main_distill)."""
    return _make(dict(patch_size=16, embed_dim=192, depth=13, num_heads=12, decoder_embed_dim=96, decoder_depth=1,
                      decoder_num_heads=3), kwargs)


def mae_vit_small_patch16(**kwargs):
    """MAE-Lite Small: 384-d, 12 blocks, 12 heads; decoder 192-d, 1 block, 6 heads."""
    return _make(dict(patch_size=16, embed_dim=384, depth=12, num_heads=12, decoder_embed_dim=192, decoder_depth=1,
                      decoder_num_heads=6), kwargs)


def mae_vit_base_patch16(**kwargs):
    return _make(dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512, decoder_depth=8,
                      decoder_num_heads=16), kwargs)


def mae_vit_large_patch16(**kwargs):
    return _make(dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, decoder_embed_dim=512, decoder_depth=8,
                      decoder_num_heads=16), kwargs)


def mae_vit_huge_patch14(**kwargs):
    return _make(dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, decoder_embed_dim=512, decoder_depth=8,
                      decoder_num_heads=16), kwargs)


MODELS = {f.__name__: f for f in (mae_vit_test, mae_vit_demo_patch4, mae_vit_tiny_patch16, mae_vit_tiny_d13_patch16,
                                  mae_vit_small_patch16, mae_vit_base_patch16, mae_vit_large_patch16,
                                  mae_vit_huge_patch14)}
ALIASES = {'mae_vit_tiny': 'mae_vit_tiny_patch16', 'mae_vit_small': 'mae_vit_small_patch16',
           'mae_vit_base': 'mae_vit_base_patch16', 'mae_vit_large': 'mae_vit_large_patch16',
           'mae_vit_huge': 'mae_vit_huge_patch14', 'mae_vit_tiny_d13': 'mae_vit_tiny_d13_patch16',
           'mae_vit_demo': 'mae_vit_demo_patch4'}


def create_model(name, **kwargs):
    """Build an MAE by factory name (or short alias); unknown names raise with the list of valid ones."""
    return lookup(name, MODELS, ALIASES)(**kwargs)
