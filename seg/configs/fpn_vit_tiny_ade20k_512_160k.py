# MAE-Lite's Semantic-FPN on ViT-Tiny, ADE20K 512×512, 160k iterations, batch 16 (8 GPUs x 2): the four maps of
# blocks 3/5/7/11 rescaled ×4/×2/×1/×0.5 and reduced to 48 channels (embed/4), FPN head with 128 channels,
# AdamW 1e-4, wd 0.05, layer decay 0.8, 1500-iteration warmup + poly, slide inference stride 341.
# Reference (paper): MAE-Lite D²-MAE-T 39.0 mIoU, 42.8 with RPE (backbone.rel_pos_bias=True).
_base_ = ['_base_/ade20k_512.py', '_base_/runtime_160k.py']
norm_cfg = dict(type='SyncBN', requires_grad=True)
embed_dim = 192
pyramid = 48
model = dict(
    type='EncoderDecoder',
    data_preprocessor=dict(type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                           bgr_to_rgb=True, pad_val=0, seg_pad_val=255, size=(512, 512)),
    backbone=dict(type='MIMViT', img_size=512, patch_size=16, embed_dim=embed_dim, depth=12, num_heads=12,
                  drop_path_rate=0.1, rel_pos_bias=False, out_indices=(3, 5, 7, 11), pretrained=None),
    neck=dict(type='ScaledFeature2Pyramid', embed_dim=embed_dim, out_channels=pyramid, norm_cfg=norm_cfg),
    decode_head=dict(type='FPNHead', in_channels=[pyramid] * 4, in_index=[0, 1, 2, 3], feature_strides=[4, 8, 16, 32],
                     channels=128, dropout_ratio=0.1, num_classes=150, norm_cfg=norm_cfg, align_corners=False,
                     loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='slide', crop_size=(512, 512), stride=(341, 341)))
optim_wrapper = dict(paramwise_cfg=dict(layer_decay_rate=0.8))
