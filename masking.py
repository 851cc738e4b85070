"""Token masking for masked image modeling: pure tensor functions, reproducible with a torch.Generator.

References:
  MAE      - He et al., CVPR 2022 (per-sample random masking by argsort of uniform noise).
  MAE-priv - batch-shared masking (one permutation for the whole batch), offered as an option.
  UM-MAE   - Li et al., 2022 (uniform sampling: one visible unit per 2x2 block; secondary masking; packing).
  SimMIM   - Xie et al., CVPR 2022 (block masking on a coarse grid of mask patches).
"""
import math

import torch


def random_noise(N, L, device=None, generator=None, shared=False):
    """Uniform noise that decides which tokens are kept (smallest first).

    Args: N batch, L tokens; `shared=True` draws one row and repeats it (batch-shared masking, MAE-priv).
    Returns: [N, L] float noise in [0, 1).
    """
    if shared:
        return torch.rand(1, L, device=device, generator=generator).expand(N, L)
    return torch.rand(N, L, device=device, generator=generator)


def num_keep(L, mask_ratio):
    """How many of L tokens a mask ratio keeps: int(L * (1 - mask_ratio)), float rounding absorbed (1 - 0.7 =
    0.29999...). A Python int, known before any tensor exists: the shapes of a masked step are static."""
    return int(L * (1 - mask_ratio) + 1e-9)


def masking_from_noise(noise, mask_ratio):
    """Per-sample masking decided by `noise`: the `int(L * (1 - mask_ratio))` tokens with the smallest noise are kept.

    Args:
        noise: [N, L]; ties are broken by position (stable sort), so a 0/1 mask passed as noise is honoured exactly.
        mask_ratio: fraction of tokens removed.
    Returns:
        ids_keep [N, K] (kept token indices, in shuffled order), mask [N, L] (1 = removed, 0 = kept, in the original
        order), ids_restore [N, L] (inverse permutation of ids_shuffle), ids_shuffle [N, L].
    """
    N, L = noise.shape
    len_keep = num_keep(L, mask_ratio)
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)  # [N, L], kept tokens first
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # [N, L]
    ids_keep = ids_shuffle[:, :len_keep]  # [N, K]
    mask = torch.ones(N, L, device=noise.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # back to the original token order
    return ids_keep, mask, ids_restore, ids_shuffle


def random_masking(N, L, mask_ratio, device=None, generator=None, shared=False):
    """Random masking (MAE); `shared=True` gives every sample the same mask. Returns as `masking_from_noise`."""
    return masking_from_noise(random_noise(N, L, device, generator, shared), mask_ratio)


def mask_to_noise(mask):
    """Turn a given binary mask [N, L] (1 = removed, same count per row) into noise that reproduces it exactly.

    Returns (noise [N, L], mask_ratio)."""
    removed = mask.sum(dim=1)
    if not torch.all(removed == removed[0]):
        raise ValueError('every row of an external mask must remove the same number of tokens')
    return mask.float(), removed[0].item() / mask.shape[1]


def gather_tokens(x, ids):
    """Select tokens: x [N, L, D], ids [N, K] -> [N, K, D]."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def uniform_masking(N, grid, device=None, generator=None):
    """UM-MAE uniform sampling: the unit grid is split into 2x2 blocks and in every block exactly one unit is kept,
    its position drawn independently and uniformly (25% visible; the mask ratio is always 0.75).

    Args: N batch; grid (gh, gw) units, both even.
    Returns: ids_keep [N, K] (K = gh*gw/4) the kept unit indices in block-row-major order (entry k is the unit of
        block (k // (gw/2), k % (gw/2))), which is the order UM's packed map holds them in; mask [N, gh*gw] (1 =
        removed, 0 = kept, unit order).
    """
    gh, gw = grid
    if gh % 2 or gw % 2:
        raise ValueError(f'uniform masking needs an even unit grid, got {gh}x{gw}')
    choice = torch.randint(0, 4, (N, gh // 2, gw // 2), device=device, generator=generator)  # [N, gh/2, gw/2]
    rows = 2 * torch.arange(gh // 2, device=device).view(1, -1, 1) + choice // 2  # [N, gh/2, gw/2]
    cols = 2 * torch.arange(gw // 2, device=device).view(1, 1, -1) + choice % 2
    ids_keep = (rows * gw + cols).flatten(1)  # [N, K]
    mask = torch.ones(N, gh * gw, device=device).scatter(1, ids_keep, 0.0)
    return ids_keep, mask


def packed_coords(ids_keep, grid, unit_tokens):
    """Original token coordinates of UM-MAE's packed map: visible unit k (block-row-major, see `uniform_masking`)
    occupies block position k of a (gh/2 x gw/2)-unit map, i.e. a t x t patch of tokens (t = unit_tokens).

    Args: ids_keep [N, K]; grid (gh, gw) units; unit_tokens t.
    Returns: [N, gh/2*t, gw/2*t, 2] long, the (row, col) each packed token had in the full (gh*t x gw*t) token grid.
    """
    gh, gw = grid
    N, t = ids_keep.shape[0], unit_tokens
    a = torch.arange(t, device=ids_keep.device)
    rows = (ids_keep // gw).view(N, gh // 2, gw // 2, 1, 1) * t + a.view(1, 1, 1, t, 1)  # [N, bh, bw, t, 1]
    cols = (ids_keep % gw).view(N, gh // 2, gw // 2, 1, 1) * t + a.view(1, 1, 1, 1, t)  # [N, bh, bw, 1, t]
    coords = torch.stack(torch.broadcast_tensors(rows, cols), dim=-1)  # [N, bh, bw, t, t, 2]
    return coords.transpose(2, 3).reshape(N, gh // 2 * t, gw // 2 * t, 2)  # [N, bh*t, bw*t, 2]


def block_masking(N, grid, scale, mask_ratio, device=None, generator=None):
    """SimMIM block masking: ceil(mask_ratio * gh*gw) random cells of a coarse grid of mask patches are masked, then
    every cell is upsampled to scale x scale tokens.

    Args: N batch; grid (gh, gw) mask patches; scale tokens per mask-patch side; mask_ratio.
    Returns: mask [N, gh*scale * gw*scale] float on the token grid, row-major (1 = masked).
    """
    gh, gw = grid
    count = math.ceil(gh * gw * mask_ratio - 1e-9)  # the epsilon only absorbs float rounding
    ids = torch.argsort(torch.rand(N, gh * gw, device=device, generator=generator), dim=1)[:, :count]  # [N, count]
    coarse = torch.zeros(N, gh * gw, device=device).scatter(1, ids, 1.0).view(N, gh, 1, gw, 1)
    return coarse.expand(N, gh, scale, gw, scale).reshape(N, gh * scale * gw * scale)
