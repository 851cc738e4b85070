# UperNet on Swin-T (UM-MAE's ADE20K transfer), 512×512, 160k iterations, batch 16 (8 GPUs x 2): AdamW 1e-4,
# wd 0.05, no layer decay (1.0 for Swin), drop path 0.3, 1500-iteration warmup + poly, slide inference stride 341.
# Window 16 with UM-MAE's position-MLP bias (what UM fine-tunes with; the MLP takes UM checkpoints at any window);
# for timm/Swin table weights use rel_pos='table' (tables are resized from window 7 on loading).
_base_ = ['upernet_vit_tiny_ade20k_512_160k.py']
model = dict(
    backbone=dict(_delete_=True, type='MIMSwin', img_size=512, patch_size=4, embed_dim=96, depths=(2, 2, 6, 2),
                  num_heads=(3, 6, 12, 24), window_size=16, rel_pos='mlp', drop_path_rate=0.3,
                  out_indices=(0, 1, 2, 3), pretrained=None),
    neck=None,
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
optim_wrapper = dict(paramwise_cfg=dict(layer_decay_rate=1.0))
