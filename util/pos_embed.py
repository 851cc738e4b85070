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
