"""COCO detection transfer: ViTDet backbone on torchvision's Mask R-CNN, COCO evaluation, detectron2 export."""
