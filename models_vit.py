"""Vision Transformer encoders with timm-identical state-dict keys.

References:
  ViT   - Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021.
  DeiT  - Touvron et al., "Training data-efficient image transformers", ICML 2021 (Tiny/Small sizes).
  MAE   - He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022 (GAP + fc_norm layout).
  MAE-Lite - Wang et al., "A Closer Look at Self-Supervised Lightweight Vision Transformers", ICML 2023
          (Tiny with 12 heads).
  timm  - Wightman, pytorch-image-models (key names, so checkpoints load both ways).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    The fast path is `F.scaled_dot_product_attention`. Passing a dict as `extras` takes the explicit path and fills it
    with what distillation and analysis need: 'logits' (scaled pre-softmax q·kᵀ/√d, [N, H, L, L]) and 'q', 'k', 'v'
    ([N, H, L, d_head]).

    MAE-Lite's RPE variant (BEiT style): `qv_bias=True` keeps separate `q_bias`/`v_bias` (k bias fixed at 0) and
    `rel_pos_grid=(h, w)` adds a learned per-head bias from `relative_position_bias_table`, [(2h-1)(2w-1)+3, H],
    zero-initialised, to the scaled logits (the last three rows: cls->token, token->cls, cls->cls).
    """

    def __init__(self, dim, num_heads=8, qkv_bias=True, attn_drop=0.0, proj_drop=0.0, head_dim=None, qv_bias=False,
                 rel_pos_grid=None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        inner = self.num_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, inner * 3, bias=qkv_bias and not qv_bias)
        self.q_bias = nn.Parameter(torch.zeros(inner)) if qv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(inner)) if qv_bias else None
        self.rel_pos_grid = rel_pos_grid
        if rel_pos_grid is not None:
            index = relative_position_index(*rel_pos_grid)
            self.relative_position_bias_table = nn.Parameter(torch.zeros(int(index.max()) + 1, num_heads))
            self.register_buffer('relative_position_index', index, persistent=False)
        else:
            self.relative_position_bias_table = None
        self.attn_drop = attn_drop
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def qkv_heads(self, x):
        """[N, L, D] -> q, k, v, each [N, H, L, d_head]."""
        N, L, _ = x.shape
        if self.q_bias is None:
            qkv = self.qkv(x)
        else:
            qkv = F.linear(x, self.qkv.weight, torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias]))
        qkv = qkv.view(N, L, 3, self.num_heads, self.head_dim)  # [N, L, 3, H, d]
        # unbinding dim 2 (not a permuted dim 0) lets backward stack the q/k/v grads straight into qkv's layout:
        # one copy instead of a stack plus a reshape copy
        return tuple(t.transpose(1, 2) for t in qkv.unbind(2))  # each [N, H, L, d]

    def forward(self, x, extras=None):
        N, L, _ = x.shape
        q, k, v = self.qkv_heads(x)  # each [N, H, L, d]
        drop = self.attn_drop if self.training else 0.0
        bias = None if self.relative_position_bias_table is None else self.rel_pos_bias(L).to(q.dtype)  # [H, L, L]
        if extras is None:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop)  # [N, H, L, d]
        else:
            logits = (q * self.scale) @ k.transpose(-2, -1)  # [N, H, L, L]
            if bias is not None:
                logits = logits + bias
            extras.update(logits=logits, q=q, k=k, v=v)
            attn = F.dropout(logits.softmax(dim=-1), drop, self.training)
            x = attn @ v  # [N, H, L, d]
        x = x.transpose(1, 2).reshape(N, L, -1)  # [N, L, H*d]
        return self.proj_drop(self.proj(x))

    def rel_pos_bias(self, L):
        """The relative position bias for a sequence of L = 1 + h*w tokens, [H, L, L]."""
        index = self.relative_position_index
        if index.shape[0] != L:
            raise ValueError(f'relative position bias built for {index.shape[0]} tokens, input has {L}')
        return self.relative_position_bias_table[index.view(-1)].view(L, L, -1).permute(2, 0, 1)


def set_block_heads(model, block_heads):
    """Give blocks their own head count: block_heads is [(block index, heads), ...] (TinyMIM's last block takes the
    teacher's). The block's attention is rebuilt with head dim = width // heads, as main_distill builds it, and the
    same options (fresh weights: load a checkpoint afterwards). Returns the pairs that changed something."""
    changed = []
    for i, heads in block_heads:
        old = model.blocks[i].attn
        if old.num_heads == heads:
            continue
        dim = old.proj.out_features
        model.blocks[i].attn = Attention(dim, heads, qkv_bias=old.qkv.bias is not None or old.q_bias is not None,
                                         attn_drop=old.attn_drop, proj_drop=old.proj_drop.p, head_dim=dim // heads,
                                         qv_bias=old.q_bias is not None,
                                         rel_pos_grid=old.rel_pos_grid).to(old.proj.weight.device)
        changed.append((i, heads))
    return changed


def relative_position_index(h, w):
    """BEiT relative-position index for cls + an h x w grid, [1+h*w, 1+h*w]: patch pairs map to
    (Δh + h-1)·(2w-1) + (Δw + w-1); then cls->token, token->cls and cls->cls get the three last entries."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
    coords = torch.stack([rows.flatten(), cols.flatten()])  # [2, h*w]
    rel = coords[:, :, None] - coords[:, None, :]  # [2, h*w, h*w]
    patch_index = (rel[0] + h - 1) * (2 * w - 1) + (rel[1] + w - 1)  # [h*w, h*w]
    n = (2 * h - 1) * (2 * w - 1)
    index = torch.zeros(h * w + 1, h * w + 1, dtype=torch.long)
    index[1:, 1:] = patch_index
    index[0, 1:] = n  # cls -> token
    index[1:, 0] = n + 1  # token -> cls
    index[0, 0] = n + 2  # cls -> cls
    return index


class LayerScale(nn.Module):
    """Per-channel residual scale (CaiT); key `ls1.gamma` as in timm."""

    def __init__(self, dim, init_values):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim, hidden, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), x + mlp(norm2(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop=0.0, attn_drop=0.0, drop_path=0.0,
                 init_values=None, norm_layer=None, head_dim=None, attn_kwargs=None):
        super().__init__()
        norm_layer = norm_layer or _default_norm
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop,
                              head_dim=head_dim, **(attn_kwargs or {}))
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x, extras=None):
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), extras)))
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        return x


def run_blocks(blocks, x, return_layers=(), extras_at=()):
    """Run `blocks` in order. Returns (x, {i: output of block i for i in return_layers},
    {i: attention extras ('logits', 'q', 'k', 'v') of block i for i in extras_at})."""
    outs, extras = {}, {}
    for i, blk in enumerate(blocks):
        e = {} if i in extras_at else None
        x = blk(x, e)
        if e is not None:
            extras[i] = e
        if i in return_layers:
            outs[i] = x
    return x, outs, extras


def _default_norm(dim):
    return nn.LayerNorm(dim, eps=1e-6)


class PatchEmbed(nn.Module):
    """Image to patch tokens with a stride-p convolution (key `patch_embed.proj`, as in timm)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [N, C, h, w] -> [N, h*w, D]

    def embed_patches(self, patches):
        """Embed already-patchified pixels in (p, q, c) order, e.g. only the visible ones of an MAE batch.

        Equal to `forward` on the same pixels, but costs nothing for the patches that were dropped.
        Args: patches [N, L, p*p*C] in (p, q, c) order. Returns [N, L, D].
        """
        w = self.proj.weight.permute(0, 2, 3, 1).flatten(1)  # [D, C, p, q] -> [D, p*q*C], matching (p, q, c)
        return F.linear(patches, w, self.proj.bias)


def init_weights(module):
    """Training-from-scratch init of MAE/MAE-Lite: xavier-uniform Linear, LayerNorm (1, 0)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class VisionTransformer(nn.Module):
    """ViT for classification. `global_pool='avg'` averages patch tokens then applies `fc_norm` (no `norm`, the MAE
    fine-tuning layout); `'token'` takes the cls token after `norm`.

    `rel_pos_bias=True` is MAE-Lite's RPE fine-tuning model: a BEiT-style relative position bias in every block and
    separate q/v biases (`qv_bias`, on by default with RPE); the absolute position embedding stays.
    `init_values` turns on LayerScale (older MAE-Lite RPE checkpoints carry it as gamma_1/gamma_2).
    `distilled=True` is DeiT's model: a `dist_token` after cls (with its own position row) and its own classifier
    `head_dist` (on the dist token after `norm`, or after `fc_norm` with 'avg' pooling); training returns
    (cls_logits, dist_logits), evaluation their average."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, global_pool='token', embed_dim=768,
                 depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0,
                 drop_path_rate=0.0, init_values=None, rel_pos_bias=False, qv_bias=None, distilled=False):
        super().__init__()
        if global_pool not in ('avg', 'token'):
            raise ValueError(f"global_pool must be 'avg' or 'token', got {global_pool!r}")
        if distilled and rel_pos_bias:
            raise ValueError('distilled=True and rel_pos_bias=True do not combine: the relative position table has '
                             'rows for one prefix (cls) token only')
        self.global_pool = global_pool
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        self.num_prefix_tokens = 2 if distilled else 1
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + self.num_prefix_tokens, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth grows linearly with depth
        attn_kwargs = dict(qv_bias=rel_pos_bias if qv_bias is None else qv_bias,
                           rel_pos_grid=self.patch_embed.grid_size if rel_pos_bias else None)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i], init_values,
                  attn_kwargs=attn_kwargs)
            for i in range(depth)])
        use_fc_norm = global_pool == 'avg'
        self.norm = nn.Identity() if use_fc_norm else _default_norm(embed_dim)
        self.fc_norm = _default_norm(embed_dim) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head_dist = None  # DeiT's classifier on the distillation token
        if distilled:
            self.head_dist = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        self.apply(init_weights)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a Linear over the flattened patch
        nn.init.normal_(self.cls_token, std=0.02)
        if distilled:
            nn.init.normal_(self.dist_token, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {'pos_embed', 'cls_token', 'dist_token'}

    def embed(self, x, ids_keep=None):
        """Patch-embed, add position embedding, optionally keep only `ids_keep` [N, K] patches, prepend cls (and the
        dist token when distilled). Returns [N, P+L, D] (or [N, P+K, D]), P = num_prefix_tokens."""
        P = self.num_prefix_tokens
        x = self.patch_embed(x) + self.pos_embed[:, P:]  # [N, L, D]
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [N, K, D]
        prefix = self.cls_token if self.dist_token is None else torch.cat([self.cls_token, self.dist_token], dim=1)
        prefix = (prefix + self.pos_embed[:, :P]).expand(x.shape[0], -1, -1)  # [N, P, D]
        return self.pos_drop(torch.cat([prefix, x], dim=1))

    def forward_features(self, x, return_layers=(), extras_at=(), ids_keep=None):
        """Tokens after the last block (and `norm`), [N, 1+L, D].

        `return_layers`: block indices whose outputs to return as a list alongside ([N, 1+L, D] each, in index
        order); `extras_at`: block indices whose attention logits/q/k/v to return (a dict per index).
        With either given, returns (tokens, layer_outputs, extras).
        `ids_keep` [N, K]: encode only these patches (+ cls), e.g. a teacher shown a student's visible patches."""
        x, outs, extras = run_blocks(self.blocks, self.embed(x, ids_keep), return_layers, extras_at)
        x = self.norm(x)
        if return_layers or extras_at:
            return x, [outs[i] for i in sorted(outs)], extras
        return x

    def pool(self, x):
        """[N, P+L, D] -> [N, D] as `global_pool` says (fc_norm applied for 'avg')."""
        if self.global_pool == 'avg':
            return self.fc_norm(x[:, self.num_prefix_tokens:].mean(dim=1))
        return x[:, 0]

    def forward_head(self, x):
        logits = self.head(self.head_drop(self.pool(x)))
        if self.dist_token is None:
            return logits
        dist_logits = self.head_dist(self.head_drop(self.fc_norm(x[:, 1])))  # fc_norm is Identity for 'token'
        if self.training:
            return logits, dist_logits
        return (logits + dist_logits) / 2  # DeiT: both heads vote at inference

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _make(preset, kwargs):
    """Merge a factory's preset with the caller's kwargs; the caller wins (so any preset can be overridden)."""
    return VisionTransformer(**{**preset, **kwargs})


def vit_test(**kwargs):
    """A tiny ViT for unit tests: 32 px, patch 8, 2 blocks of width 32."""
    return _make(dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10), kwargs)


def vit_demo_patch4(**kwargs):
    """The demo-data ViT: 32 px, patch 4 (64 tokens), 6 blocks of width 128."""
    return _make(dict(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4, num_classes=10), kwargs)


def vit_tiny_patch16(**kwargs):
    """ViT-Tiny with MAE-Lite's 12 heads (DeiT-Tiny has 3: pass num_heads=3)."""
    return _make(dict(patch_size=16, embed_dim=192, depth=12, num_heads=12), kwargs)


def vit_small_patch16(**kwargs):
    """ViT-Small with MAE-Lite's 12 heads (DeiT-Small has 6: pass num_heads=6)."""
    return _make(dict(patch_size=16, embed_dim=384, depth=12, num_heads=12), kwargs)


def vit_base_patch16(**kwargs):
    return _make(dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), kwargs)


def vit_large_patch16(**kwargs):
    return _make(dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16), kwargs)


def vit_huge_patch14(**kwargs):
    return _make(dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16), kwargs)


MODELS = {f.__name__: f for f in (vit_test, vit_demo_patch4, vit_tiny_patch16, vit_small_patch16, vit_base_patch16,
                                  vit_large_patch16, vit_huge_patch14)}
ALIASES = {'vit_tiny': 'vit_tiny_patch16', 'vit_small': 'vit_small_patch16', 'vit_base': 'vit_base_patch16',
           'vit_large': 'vit_large_patch16', 'vit_huge': 'vit_huge_patch14', 'vit_demo': 'vit_demo_patch4'}


def create_model(name, **kwargs):
    """Build a ViT by factory name (or short alias); unknown names raise with the list of valid ones."""
    return lookup(name, MODELS, ALIASES)(**kwargs)


def lookup(name, models, aliases):
    """The factory called `name` (or its alias) in `models`; a ValueError listing the valid names otherwise."""
    name = aliases.get(name, name)
    if name not in models:
        valid = ', '.join(sorted(models) + sorted(aliases))
        raise ValueError(f'unknown model {name!r}; valid names: {valid}')
    return models[name]
