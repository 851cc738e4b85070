"""Mask R-CNN (torchvision) around the ViTDet backbone (or a Swin + FPN one), with ViTDet's heads: 2-conv RPN,
4conv1fc box head and 4-conv mask head with LayerNorm, anchors on 5 levels, RoIAlign on 4.

References:
  Mask R-CNN - He, Gkioxari, Dollár, Girshick, ICCV 2017 (torchvision.models.detection.MaskRCNN is the engine).
  ViTDet     - Li et al., ECCV 2022, and detectron2's common/models/mask_rcnn_vitdet.py (head shapes, LN in heads,
               square padding so train and test see the same token grid).
"""
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm2d
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

import models_swin
from det.backbone import build_vitdet_backbone
from det.backbone_swin import build_swin_fpn_backbone


class SquarePadTransform(GeneralizedRCNNTransform):
    """torchvision's pre-processing with ViTDet's test-time geometry: resize so the longer side is `size`,
    normalise, then pad every image bottom/right to one size x size square (zeros after normalisation = the mean
    colour). With absolute position embeddings the backbone then sees the same token grid at test time as in LSJ
    training, where images already arrive as size x size squares (their resize is a no-op)."""

    def __init__(self, size, image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD, size_divisible=32):
        super().__init__(min_size=size, max_size=size, image_mean=list(image_mean), image_std=list(image_std),
                         size_divisible=size_divisible)
        self.size = size

    def batch_images(self, images, size_divisible=32):
        side = max([self.size] + [max(im.shape[-2:]) for im in images])
        side = -(-side // size_divisible) * size_divisible
        batch = images[0].new_zeros(len(images), images[0].shape[0], side, side)  # [N, C, S, S]
        for im, out in zip(images, batch):
            out[:, :im.shape[-2], :im.shape[-1]].copy_(im)
        return batch


def mask_rcnn_vitdet(num_classes, input_size=640, model='vit_tiny_patch16', pretrain_img_size=224, window_size=14,
                     global_blocks=None, drop_path_rate=0.0, act_checkpoint=False, fpn_dim=256, box_fc_dim=1024,
                     anchor_sizes=(32, 64, 128, 256, 512), rois_per_image=512, rpn_post_nms_train=1000,
                     rpn_post_nms_test=1000, detections_per_img=100, **vit_kwargs):
    """torchvision MaskRCNN with a ViTDet backbone. `num_classes` excludes the background. Defaults are ViTDet's
    (RPN: pre-NMS 2000 train / 1000 test, post-NMS 1000; 512 sampled RoIs per image; score threshold 0.05).
    A models_swin factory name gives the Swin + FPN backbone instead (det/backbone_swin.py; window_size and
    global_blocks are ViT-only: a Swin keeps its factory's windows)."""
    if models_swin.has_model(model):
        backbone = build_swin_fpn_backbone(model, pretrain_img_size, drop_path_rate, act_checkpoint, fpn_dim,
                                           **vit_kwargs)
    else:
        backbone = build_vitdet_backbone(model, pretrain_img_size, window_size, global_blocks, drop_path_rate,
                                         act_checkpoint, fpn_dim, **vit_kwargs)
    levels = backbone.names  # p2..p5 for RoIAlign; the RPN also sees 'pool'
    anchors = AnchorGenerator(sizes=tuple((s,) for s in anchor_sizes), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    model = MaskRCNN(
        backbone, num_classes=None,
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(fpn_dim, anchors.num_anchors_per_location()[0], conv_depth=2),
        rpn_pre_nms_top_n_train=2 * rpn_post_nms_train, rpn_post_nms_top_n_train=rpn_post_nms_train,
        rpn_pre_nms_top_n_test=rpn_post_nms_test, rpn_post_nms_top_n_test=rpn_post_nms_test,
        box_roi_pool=MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=0),
        box_head=FastRCNNConvFCHead((fpn_dim, 7, 7), [fpn_dim] * 4, [box_fc_dim], norm_layer=LayerNorm2d),
        box_predictor=FastRCNNPredictor(box_fc_dim, num_classes + 1),
        box_batch_size_per_image=rois_per_image, box_detections_per_img=detections_per_img,
        mask_roi_pool=MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=0),
        mask_head=MaskRCNNHeads(fpn_dim, [fpn_dim] * 4, 1, norm_layer=LayerNorm2d),
        mask_predictor=MaskRCNNPredictor(fpn_dim, fpn_dim, num_classes + 1))
    model.transform = SquarePadTransform(input_size)
    return model


def layer_id_det(name, num_layers, depths=None):
    """Layer id for layer-wise lr decay over the whole detector (as detectron2's get_vit_lr_decay_rate):
    backbone.net pos_embed / patch_embed -> 0, backbone.net.blocks.i -> i + 1, everything else (pyramid, RPN,
    heads) -> num_layers (lr scale 1). A Swin backbone (its stage `depths` given) gets util/lr_decay's stage-aware
    ids: patch_embed -> 0, block b of stage s -> sum(depths[:s]) + b + 1."""
    from util.lr_decay import layer_id_swin, layer_id_vit
    prefix = 'backbone.net.'
    if not name.startswith(prefix):
        return num_layers
    name = name[len(prefix):]
    return layer_id_vit(name, num_layers) if depths is None else layer_id_swin(name, num_layers, depths)


def count_parameters(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)

