# The demo: UperNet on a small ViT (128-d, 6 blocks, patch 8) trained on the embedded digits set of
# seg/demo_data.py (96×96 canvases, 10 classes, background ignored as ADE's 0), 64×64 crops, slide inference
# (crop 64, stride 43 — the 512/341 ratio) on the full 96×96 images. The recipe of the ADE20K config otherwise
# (AdamW, linear warmup then poly) with lr 1e-3 and no layer decay: the demo trains from scratch, so there are no
# pre-trained layers to protect. `python seg/train.py` runs it on a CPU in about 5 minutes.
_base_ = ['upernet_vit_tiny_ade20k_512_160k.py']
data_root = ''  # empty: seg/train.py fills in the demo set, written once to ~/.cache/mim_lite/ade_digits
crop_size = (64, 64)
num_classes = 10
embed_dim = 128
norm_cfg = dict(type='BN', requires_grad=True)  # SyncBN needs CUDA; the demo runs anywhere
max_iters = 400
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(img_size=64, patch_size=8, embed_dim=embed_dim, depth=6, num_heads=4, drop_path_rate=0.0,
                  out_indices=(1, 2, 3, 5)),
    neck=dict(embed_dim=embed_dim, norm_cfg=norm_cfg),
    # avg_non_ignore: average the loss over labelled pixels only; ~90 % of a digits canvas is ignored background,
    # which would otherwise shrink the loss (and the step size) tenfold
    decode_head=dict(in_channels=[embed_dim] * 4, channels=64, num_classes=num_classes, norm_cfg=norm_cfg,
                     loss_decode=dict(avg_non_ignore=True)),
    auxiliary_head=dict(in_channels=embed_dim, channels=32, num_classes=num_classes, norm_cfg=norm_cfg,
                        loss_decode=dict(avg_non_ignore=True)),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(43, 43)))
metainfo = dict(classes=tuple(str(d) for d in range(10)),
                palette=[[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                         [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]])
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(96, 96), ratio_range=(0.75, 1.25), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=8, num_workers=0, persistent_workers=False,
    dataset=dict(type='BaseSegDataset', data_root=data_root, metainfo=metainfo, img_suffix='.jpg',
                 seg_map_suffix='.png', reduce_zero_label=True, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(type='BaseSegDataset', data_root=data_root, metainfo=metainfo, img_suffix='.jpg',
                 seg_map_suffix='.png', reduce_zero_label=True, pipeline=test_pipeline))
test_dataloader = val_dataloader
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(lr=1e-3), paramwise_cfg=dict(layer_decay_rate=1.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=50),
    dict(type='PolyLR', eta_min=0.0, power=1.0, by_epoch=False, begin=50, end=max_iters),
]
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(
    logger=dict(interval=50),
    checkpoint=dict(interval=max_iters, max_keep_ckpts=1),
    visualization=dict(type='SegVisualizationHook', draw=False))
