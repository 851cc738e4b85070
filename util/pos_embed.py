"""Fixed 2-D sine-cosine position embeddings in the official MAE channel layout.

References:
  MAE - He et al., CVPR 2022 (layout: first half of the channels encodes the column, second half the row).
  Transformer - Vaswani et al., NeurIPS 2017 (1-D sin-cos).
"""
import torch


def get_1d_sincos_pos_embed(embed_dim, pos):
    """Args: embed_dim (even), pos [M] positions. Returns [M, embed_dim] = [sin(pos·ω) | cos(pos·ω)],
    ω_k = 1 / 10000^(k / (embed_dim/2)), k = 0..embed_dim/2-1."""
    if embed_dim % 2:
        raise ValueError(f'embed_dim must be even, got {embed_dim}')
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega  # [D/2]
    out = pos.double().reshape(-1, 1) * omega.reshape(1, -1)  # [M, D/2]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # [M, D]


def get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    """2-D sin-cos embedding for a grid_size x grid_size (or (h, w)) grid, rows in raster order.

    The first embed_dim/2 channels encode the column index, the last embed_dim/2 the row index (MAE layout).
    Args: embed_dim divisible by 4; cls_token adds a leading zero row.
    Returns: [(1 if cls_token) + h*w, embed_dim] float32.
    """
    if embed_dim % 4:
        raise ValueError(f'embed_dim must be divisible by 4, got {embed_dim}')
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing='ij')  # [gh, gw] each
    emb = torch.cat([get_1d_sincos_pos_embed(embed_dim // 2, cols.flatten()),
                     get_1d_sincos_pos_embed(embed_dim // 2, rows.flatten())], dim=1)  # [gh*gw, D]
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def interpolate_pos_embed(pos_embed, new_grid, num_prefix=1):
    """Resize a stored position embedding to a new patch grid by bicubic interpolation, keeping its layout.

    Args:
        pos_embed: [1, num_prefix + h*w, D] (or [1, h*w, D] with num_prefix=0); the grid must be square.
        new_grid: (H, W) of the target model.
        num_prefix: leading rows (cls) kept as they are.
    Returns: [1, num_prefix + H*W, D]; the input itself when the grid already matches.
    """
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    n = grid.shape[1]
    old = int(round(n ** 0.5))
    if old * old != n:
        raise ValueError(f'pos_embed has {n} grid rows, not a square grid')
    if (old, old) == tuple(new_grid):
        return pos_embed
    D = grid.shape[-1]
    grid = grid.reshape(1, old, old, D).permute(0, 3, 1, 2).float()  # [1, D, h, w]
    grid = torch.nn.functional.interpolate(grid, size=tuple(new_grid), mode='bicubic', align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], D).to(pos_embed.dtype)  # [1, H*W, D]
    return torch.cat([prefix, grid], dim=1)
