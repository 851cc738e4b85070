"""Token masking for masked image modeling: pure tensor functions, reproducible with a torch.Generator.

References:
  MAE      - He et al., CVPR 2022 (per-sample random masking by argsort of uniform noise).
  MAE-priv - batch-shared masking (one permutation for the whole batch), offered as an option.
"""
import torch


def random_noise(N, L, device=None, generator=None, shared=False):
    """Uniform noise that decides which tokens are kept (smallest first).

    Args: N batch, L tokens; `shared=True` draws one row and repeats it (batch-shared masking, MAE-priv).
    Returns: [N, L] float noise in [0, 1).
    """
    if shared:
        return torch.rand(1, L, device=device, generator=generator).expand(N, L)
    return torch.rand(N, L, device=device, generator=generator)


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
    len_keep = int(L * (1 - mask_ratio) + 1e-9)  # the epsilon only absorbs float rounding (e.g. 1 - 0.7 = 0.29999)
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
