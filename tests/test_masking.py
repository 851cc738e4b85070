"""Masking invariants (masking.py) and the fixed 2-D sin-cos position embedding (util/pos_embed.py)."""
import math

import pytest
import torch

import masking
from util.pos_embed import get_2d_sincos_pos_embed


@pytest.mark.parametrize('L, ratio, keep', [(196, 0.75, 49), (196, 0.5, 98), (16, 0.75, 4), (49, 0.0, 49),
                                            (10, 0.25, 7)])
def test_random_masking_invariants(L, ratio, keep):
    """keep = int(L(1-r)); ids_restore inverts ids_shuffle; each row removes L-keep tokens; kept ids have mask 0."""
    N = 4
    g = torch.Generator().manual_seed(0)
    ids_keep, mask, ids_restore, ids_shuffle = masking.random_masking(N, L, ratio, generator=g)
    assert keep == int(L * (1 - ratio))
    assert ids_keep.shape == (N, keep) and mask.shape == (N, L)
    arange = torch.arange(L).expand(N, L)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), arange)
    assert torch.equal(torch.gather(ids_restore, 1, ids_shuffle), arange)
    assert torch.equal(ids_keep, ids_shuffle[:, :keep])
    assert torch.equal(mask.sum(dim=1), torch.full((N,), float(L - keep)))
    assert (torch.gather(mask, 1, ids_keep) == 0).all()
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_masking_keeps_smallest_noise():
    """The kept tokens are the ones with the smallest noise."""
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    ids_keep, mask, _, _ = masking.masking_from_noise(noise, 0.5)
    assert ids_keep.tolist() == [[1, 3]]
    assert mask.tolist() == [[1.0, 0.0, 1.0, 0.0]]


def test_masking_is_deterministic_under_a_generator():
    """Same generator seed -> same mask; another seed -> another mask."""
    def mask_for(seed):
        return masking.random_masking(8, 196, 0.75, generator=torch.Generator().manual_seed(seed))[1]
    assert torch.equal(mask_for(3), mask_for(3))
    assert not torch.equal(mask_for(3), mask_for(4))


def test_masking_is_per_sample_by_default_and_shared_on_request():
    """Default masks differ between samples; shared=True gives every sample the same mask."""
    g = torch.Generator().manual_seed(0)
    per_sample = masking.random_masking(8, 64, 0.75, generator=g)[1]
    assert not all(torch.equal(per_sample[0], row) for row in per_sample[1:])
    shared = masking.random_masking(8, 64, 0.75, generator=g, shared=True)
    for t in (shared[0], shared[1], shared[2]):  # ids_keep, mask, ids_restore
        assert (t == t[:1]).all()


@pytest.mark.parametrize('L', [7, 10, 49, 196])
def test_mask_to_noise_reproduces_every_mask(L):
    """For every removal count, a given mask survives mask_to_noise -> masking_from_noise exactly (also where
    L * (1 - ratio) is not exactly representable in floating point)."""
    N = 3
    g = torch.Generator().manual_seed(L)
    for removed in range(L + 1):
        mask = torch.zeros(N, L)
        for n in range(N):
            mask[n, torch.randperm(L, generator=g)[:removed]] = 1
        noise, ratio = masking.mask_to_noise(mask)
        ids_keep, got, _, _ = masking.masking_from_noise(noise, ratio)
        assert torch.equal(got, mask), f'L={L}, removed={removed}'
        assert ids_keep.shape[1] == L - removed


def test_mask_to_noise_rejects_uneven_rows():
    """Rows that remove different numbers of tokens cannot form one batch: ValueError."""
    with pytest.raises(ValueError):
        masking.mask_to_noise(torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))


def test_gather_tokens():
    """gather_tokens picks x[n, ids[n, k]] for every n, k."""
    x = torch.randn(2, 5, 3)
    ids = torch.tensor([[4, 0], [2, 2]])
    out = masking.gather_tokens(x, ids)
    assert out.shape == (2, 2, 3)
    for n in range(2):
        for k in range(2):
            assert torch.equal(out[n, k], x[n, ids[n, k]])


# ---------------------------------------------------------------------------------------------------------------
# position embedding

@pytest.mark.parametrize('cls_token', [False, True])
def test_pos_embed_shape_and_cls_row(cls_token):
    """[(1 if cls) + h*w, D] float32; the cls row is all zeros."""
    emb = get_2d_sincos_pos_embed(16, 4, cls_token=cls_token)
    assert emb.shape == (int(cls_token) + 16, 16) and emb.dtype == torch.float32
    if cls_token:
        assert (emb[0] == 0).all()
    assert get_2d_sincos_pos_embed(16, (2, 3)).shape == (6, 16)


def test_pos_embed_halves_encode_column_then_row():
    """First D/2 channels depend on the column only, last D/2 on the row only (official MAE layout)."""
    D, g = 32, 5
    emb = get_2d_sincos_pos_embed(D, g).reshape(g, g, D)  # [row, col, D]
    first, second = emb[..., :D // 2], emb[..., D // 2:]
    assert torch.equal(first, first[:1].expand_as(first))  # constant along rows
    assert not torch.equal(first, first[:, :1].expand_as(first))  # varies along columns
    assert torch.equal(second, second[:, :1].expand_as(second))  # constant along columns
    assert not torch.equal(second, second[:1].expand_as(second))  # varies along rows


def test_pos_embed_values_match_formula():
    """emb[1 + r*w + c] = [sin(c ω) | cos(c ω) | sin(r ω) | cos(r ω)], ω_k = 1/10000^(k/(D/4))."""
    D, g = 16, 4
    emb = get_2d_sincos_pos_embed(D, g, cls_token=True)
    q = D // 4
    for r, c, k in [(2, 3, 1), (3, 1, 3), (1, 2, 0)]:
        row = emb[1 + r * g + c]
        omega = 1.0 / 10000 ** (k / q)
        assert row[k].item() == pytest.approx(math.sin(c * omega), abs=1e-6)
        assert row[q + k].item() == pytest.approx(math.cos(c * omega), abs=1e-6)
        assert row[2 * q + k].item() == pytest.approx(math.sin(r * omega), abs=1e-6)
        assert row[3 * q + k].item() == pytest.approx(math.cos(r * omega), abs=1e-6)
