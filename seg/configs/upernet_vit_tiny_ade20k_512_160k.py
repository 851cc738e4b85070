# UperNet on ViT-Tiny (192-d, 12 blocks, 12 heads as MAE-Lite), ADE20K 512×512, 160k iterations, batch 16
# (8 GPUs x 2), the TinyMIM / UM-MAE recipe: AdamW 1e-4, wd 0.05, layer decay 0.75 (TinyMIM uses 0.8 for its
# Tiny: --cfg-options optim_wrapper.paramwise_cfg.layer_decay_rate=0.8), drop path 0.1, slide inference stride 341.
# Blocks 3/5/7/11 -> ×4/×2/×1/×0.5 (mmseg's Feature2Pyramid: deconv-BN-GELU-deconv, deconv, identity, max-pool).
# Pre-trained weights: seg/train.py --pretrained CKPT (any layout util/pretrained.py reads).
# Reference (papers): TinyMIM ViT-T 44.0 mIoU, TinyMIM*-T 45.0; MAE ViT-B 48.1.
_base_ = ['_base_/ade20k_512.py', '_base_/runtime_160k.py']
norm_cfg = dict(type='SyncBN', requires_grad=True)
embed_dim = 192
model = dict(
    type='EncoderDecoder',
    data_preprocessor=dict(type='SegDataPreProcessor', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                           bgr_to_rgb=True, pad_val=0, seg_pad_val=255, size=(512, 512)),
    backbone=dict(type='MIMViT', img_size=512, patch_size=16, embed_dim=embed_dim, depth=12, num_heads=12,
                  drop_path_rate=0.1, rel_pos_bias=False, out_indices=(3, 5, 7, 11), pretrained=None),
    neck=dict(type='Feature2Pyramid', embed_dim=embed_dim, rescales=[4, 2, 1, 0.5], norm_cfg=norm_cfg),
    decode_head=dict(type='UPerHead', in_channels=[embed_dim] * 4, in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6),
                     channels=512, dropout_ratio=0.1, num_classes=150, norm_cfg=norm_cfg, align_corners=False,
                     loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(type='FCNHead', in_channels=embed_dim, in_index=2, channels=256, num_convs=1,
                        concat_input=False, dropout_ratio=0.1, num_classes=150, norm_cfg=norm_cfg,
                        align_corners=False,
                        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='slide', crop_size=(512, 512), stride=(341, 341)))
