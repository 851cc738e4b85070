"""Pure tensor functions behind main_analyze.py: MAE reconstruction un-normalisation, attention distance and
entropy, minibatch CKA with the unbiased HSIC, attention rollout, and reading log.txt files.

References:
  MAE       - He et al., CVPR 2022 (norm-pix targets: each patch normalised by its own mean and unbiased variance).
  mae-pytorch#40 - un-normalising with the ground-truth patch statistics flatters the reconstruction ("oracle").
  MAE-Lite  - Wang et al., ICML 2023 (attention distance / entropy per head, layer-wise CKA between models).
  CKA       - Kornblith et al., "Similarity of Neural Network Representations Revisited", ICML 2019;
              Nguyen et al., "Do Wide and Deep Networks Learn the Same Things?", ICLR 2021 (minibatch CKA with the
              unbiased HSIC of Song et al., JMLR 2012, their eq. 3).
  Rollout   - Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020; MAE-priv's variant with head
              fusion and discarding the weakest attentions.
"""
import json
import math

import torch

NORM_PIX_EPS = 1e-6  # the norm-pix target's epsilon (models_mae.patch_targets)


# ------------------------------------------------------------------------------------------------- reconstruction

def patch_stats(patches, eps=NORM_PIX_EPS):
    """Per-patch statistics of the norm-pix target: mean and sqrt(unbiased var + eps) over all p*p*C values.

    Args: patches [N, L, P]. Returns: mean [N, L, 1], std [N, L, 1].
    """
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, unbiased=True, keepdim=True) + eps).sqrt()
    return mean, std


def estimate_patch_stats(mean, std, mask, grid, sigma=1.0):
    """Statistics of every patch estimated from the visible ones only (what a deployed model could know).

    A masked patch gets the average of the visible patches' mean and std, weighted by exp(-d^2 / (2 sigma^2)) with
    d the grid distance in patches (so its nearest visible neighbours dominate); a visible patch keeps its own.
    Args: mean, std [N, L, 1] (from `patch_stats`); mask [N, L] (1 = removed); grid (h, w) with h*w = L;
        sigma in patches.
    Returns: mean, std [N, L, 1].
    """
    N, L, _ = mean.shape
    if bool((mask.sum(dim=1) >= L).any()):
        raise ValueError('cannot estimate patch statistics: an image has no visible patch')
    d2 = grid_distances(*grid, unit=1.0, device=mean.device).pow(2)  # [L, L], squared grid distance
    logits = (-d2 / (2 * sigma ** 2)).to(mean.dtype).expand(N, L, L)  # [N, L(target), L(source)]
    weights = logits.masked_fill(mask[:, None, :].bool(), float('-inf')).softmax(dim=-1)  # visible sources only
    est_mean = weights @ mean  # [N, L, 1]
    est_std = weights @ std  # [N, L, 1]
    keep = ~mask.bool()[..., None]  # [N, L, 1]
    return torch.where(keep, mean, est_mean), torch.where(keep, std, est_std)


def unnormalize_prediction(pred, patches, mask, grid, mode):
    """Turn an MAE prediction into pixel patches.

    Args:
        pred [N, L, P]: the decoder output; patches [N, L, P]: the input pixels patchified the same way;
        mask [N, L] (1 = removed); grid (h, w) token grid.
        mode: 'pixels' (the model predicts pixels: returned as is), 'oracle' (norm-pix: un-normalise with the
            ground-truth statistics of each patch, which the model never saw for masked patches — flattering) or
            'estimated' (norm-pix: statistics of masked patches estimated from the visible ones,
            `estimate_patch_stats`).
    Returns: [N, L, P] pixel patches.
    """
    if mode == 'pixels':
        return pred
    mean, std = patch_stats(patches)
    if mode == 'estimated':
        mean, std = estimate_patch_stats(mean, std, mask, grid)
    elif mode != 'oracle':
        raise ValueError(f"mode must be 'pixels', 'oracle' or 'estimated', got {mode!r}")
    return pred * std + mean


def paste_visible(pred, patches, mask):
    """The reconstruction with the visible patches replaced by the input, exactly (no arithmetic on them).

    Args: pred, patches [N, L, P]; mask [N, L] (1 = removed). Returns [N, L, P]."""
    return torch.where(mask.bool()[..., None], pred, patches)


# ------------------------------------------------------------------------------------------------- attention stats

def grid_distances(h, w, unit=1.0, device=None):
    """Euclidean distances between the centres of an h x w token grid, times `unit` (pixels per token).

    Returns [h*w, h*w], row-major token order (the ViT's)."""
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing='ij')
    pos = torch.stack([rows.flatten(), cols.flatten()], dim=1).double()  # [h*w, 2]
    return torch.cdist(pos, pos) * unit  # [h*w, h*w]


def attention_distance_entropy(logits, grid, unit, num_prefix=1, eps=1e-6):
    """Mean attention distance and entropy per image and head (MAE-Lite).

    The cls (prefix) rows and columns of the pre-softmax logits are dropped and the rest re-softmaxed over the patch
    keys, so each patch query's attention is a distribution over patches only.
    Args:
        logits: [N, H, L, L] scaled pre-softmax logits with `num_prefix` leading prefix tokens (L = num_prefix + h*w).
        grid: (h, w) patch grid; unit: pixels per grid step (the patch size; 14 reproduces MAE-Lite's plots).
    Returns: distance [N, H] in pixels, sum_j a_ij * ||pos_i - pos_j|| averaged over queries i;
        entropy [N, H] in nats, -sum_j a_ij * log(a_ij + eps) averaged over queries i. Both float64.
    """
    h, w = grid
    if logits.shape[-1] != num_prefix + h * w:
        raise ValueError(f'logits have {logits.shape[-1]} tokens, expected {num_prefix} + {h}x{w}')
    attn = logits[..., num_prefix:, num_prefix:].double().softmax(dim=-1)  # [N, H, hw, hw]
    entropy = -(attn * (attn + eps).log()).sum(dim=-1)  # [N, H, hw]
    dist = grid_distances(h, w, unit, device=logits.device)  # [hw, hw]
    distance = (attn * dist).sum(dim=-1)  # [N, H, hw]
    return distance.mean(dim=-1), entropy.mean(dim=-1)


# ------------------------------------------------------------------------------------------------- CKA

def linear_gram(x):
    """Linear-kernel Gram matrix of flattened features: x [n, ...] -> x x^T [n, n] in float64."""
    x = x.reshape(x.shape[0], -1).double()  # [n, F]
    return x @ x.T


def unbiased_hsic(K, L):
    """Unbiased HSIC estimator (Song et al. 2012; Nguyen et al. 2021 eq. 3) of two n x n Gram matrices, n > 3:

        1/(n(n-3)) [ tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1 ]

    with K~, L~ the Gram matrices with zeroed diagonals. Args: K, L [n, n]. Returns a 0-d tensor."""
    n = K.shape[0]
    if n < 4:
        raise ValueError(f'the unbiased HSIC needs at least 4 samples, got {n}')
    K = K.clone().fill_diagonal_(0)
    L = L.clone().fill_diagonal_(0)
    trace = (K * L.T).sum()  # tr(K L)
    sums = K.sum() * L.sum() / ((n - 1) * (n - 2))
    cross = 2 * (K.sum(dim=0) @ L.sum(dim=1)) / (n - 2)  # 1^T K L 1
    return (trace + sums - cross) / (n * (n - 3))


class MinibatchCKA:
    """Linear CKA between every pair of representations of two models, accumulated over minibatches:
    CKA(i, j) = mean_b HSIC(K_i, L_j) / sqrt(mean_b HSIC(K_i, K_i) * mean_b HSIC(L_j, L_j)), with the unbiased HSIC of
    each minibatch b (Nguyen et al. 2021). The same images must go through both models in the same order."""

    def __init__(self, n_a, n_b):
        self.xy = torch.zeros(n_a, n_b, dtype=torch.float64)
        self.xx = torch.zeros(n_a, dtype=torch.float64)
        self.yy = torch.zeros(n_b, dtype=torch.float64)
        self.batches = 0

    def update(self, feats_a, feats_b):
        """Args: feats_a, feats_b: lists of n_a / n_b tensors [B, ...] (one per depth) for the same B images."""
        grams_a = [linear_gram(f).cpu() for f in feats_a]
        grams_b = [linear_gram(f).cpu() for f in feats_b]
        for i, K in enumerate(grams_a):
            self.xx[i] += unbiased_hsic(K, K)
            for j, L in enumerate(grams_b):
                self.xy[i, j] += unbiased_hsic(K, L)
        for j, L in enumerate(grams_b):
            self.yy[j] += unbiased_hsic(L, L)
        self.batches += 1

    def compute(self):
        """[n_a, n_b] CKA matrix (the 1/batches factors cancel)."""
        if self.batches == 0:
            raise ValueError('no minibatch was accumulated')
        return self.xy / (self.xx[:, None] * self.yy[None, :]).sqrt()


# ------------------------------------------------------------------------------------------------- rollout

def fuse_heads(attn, head_fusion):
    """[N, H, L, L] -> [N, L, L] by 'mean', 'max' or 'min' over heads."""
    if head_fusion == 'mean':
        return attn.mean(dim=1)
    if head_fusion == 'max':
        return attn.amax(dim=1)
    if head_fusion == 'min':
        return attn.amin(dim=1)
    raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', got {head_fusion!r}")


def discard_weakest(attn, ratio, num_prefix=1):
    """Zero the int(ratio * n_patches) smallest patch entries of every row; the prefix (cls) columns are kept.

    Args: attn [N, L, L]. Returns [N, L, L]."""
    n_patch = attn.shape[-1] - num_prefix
    k = int(ratio * n_patch)
    if k <= 0:
        return attn
    patch = attn[..., num_prefix:]  # [N, L, n_patch]
    idx = patch.topk(k, dim=-1, largest=False).indices  # [N, L, k]
    patch = patch.scatter(-1, idx, 0.0)
    return torch.cat([attn[..., :num_prefix], patch], dim=-1)


def attention_rollout(attentions, head_fusion='mean', discard_ratio=0.9, num_prefix=1):
    """Attention rollout (MAE-priv variant): per block, fuse heads, discard the weakest entries of each row (not
    the cls column), add the identity for the residual path, (A + I) / 2, row-normalise, and multiply through the
    blocks: R = A_last ... A_1.

    Args: attentions: list over blocks of post-softmax attention [N, H, L, L], first block first.
    Returns: R [N, L, L] (row i: how much token i at the output draws on each input token).
    """
    N, _, L, _ = attentions[0].shape
    eye = torch.eye(L, dtype=torch.float64, device=attentions[0].device)
    result = eye.expand(N, L, L)
    for attn in attentions:
        a = discard_weakest(fuse_heads(attn.double(), head_fusion), discard_ratio, num_prefix)  # [N, L, L]
        a = (a + eye) / 2
        a = a / a.sum(dim=-1, keepdim=True)
        result = a @ result  # later blocks act on what the earlier ones produced
    return result


def rollout_map(rollout, grid, num_prefix=1):
    """The cls row of a rollout over the patches, as a distribution on the patch grid.

    Args: rollout [N, L, L]; grid (h, w). Returns [N, h, w] summing to 1 per image (uniform when the cls token draws
    nothing from any patch, e.g. identity attentions: nothing to highlight)."""
    cls_row = rollout[:, 0, num_prefix:]  # [N, h*w]
    total = cls_row.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(cls_row, 1.0 / cls_row.shape[-1])
    cls_row = torch.where(total > 0, cls_row / total.clamp(min=1e-300), uniform)
    return cls_row.reshape(-1, *grid)  # [N, h, w]


# ------------------------------------------------------------------------------------------------- curves

def read_log(path):
    """The JSON lines of a log.txt (one dict per epoch). Lines that are not JSON objects are skipped."""
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def curve_series(rows):
    """{key: (epochs, values)} for every numeric key of log rows that carry an 'epoch' (non-finite values kept as
    NaN so a diverged run still plots). Keys without an epoch (e.g. a one-off k-NN line) are left out."""
    series = {}
    for row in rows:
        if 'epoch' not in row:
            continue
        for k, v in row.items():
            if k in ('epoch', 'n_parameters') or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            xs, ys = series.setdefault(k, ([], []))
            xs.append(row['epoch'])
            ys.append(float(v) if math.isfinite(v) else float('nan'))
    return series
