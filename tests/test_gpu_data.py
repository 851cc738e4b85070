"""util/gpu_data.py: the decode-on-device input pipeline, run here on the CPU (the same code runs with a CUDA device:
only decode_jpeg's backend changes)."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import main_pretrain
from util import gpu_data
from util.data import SafeImageFolder, build_loader

pytestmark = pytest.mark.usefixtures('one_thread')
COLOURS = {'red': (220, 30, 30), 'blue': (30, 30, 220)}


def photo(size=(96, 72), seed=0):
    """A smooth, photo-like RGB image (JPEG-friendly)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]] / 16.0
    a, b, c = rng.uniform(0.5, 2, 3)
    img = np.stack([np.sin(a * x + b * y), np.cos(b * x - c * y), np.sin(c * x) * np.cos(a * y)], -1)
    return Image.fromarray(((img + 1) * 127.5).astype(np.uint8))


def colour_folder(root, n=4, corrupt=True):
    """root/train/{red,blue}/*.jpg of flat colours (the label is readable from the pixels), one PNG, one corrupt JPEG."""
    for c, rgb in COLOURS.items():
        d = os.path.join(root, 'train', c)
        os.makedirs(d, exist_ok=True)
        for i in range(n):
            Image.new('RGB', (40 + 8 * i, 36), rgb).save(os.path.join(d, f'{i}.jpg'), quality=95)
    Image.new('RGB', (40, 40), COLOURS['blue']).save(os.path.join(root, 'train', 'blue', 'png.png'))
    if corrupt:
        with open(os.path.join(root, 'train', 'red', 'corrupt.jpg'), 'wb') as f:
            f.write(b'\xff\xd8\xff\xe0 not really a jpeg')
    return os.path.join(root, 'train')


def test_device_crop_matches_pil_resize_of_the_same_box(tmp_path):
    """Given the same box, the device path (decode_jpeg + antialiased interpolate) gives PIL's pixels to JPEG-decoder
    and rounding noise, for bilinear and bicubic, and flips when asked."""
    path = tmp_path / 'p.jpg'
    photo().save(path, quality=95)
    img = gpu_data.decode_batch([gpu_data.read_file(str(path))], 'cpu')[0]  # [3, 72, 96]
    pil = Image.open(path).convert('RGB')
    crop = gpu_data.DeviceRandomResizedCrop(32)
    box = (5, 10, 50, 60)  # top, left, height, width
    for mode, pil_mode in (('bilinear', Image.BILINEAR), ('bicubic', Image.BICUBIC)):
        ours = crop.resize(img, box, mode, flip=False)[0]
        ref = transforms.functional.to_tensor(pil.crop((10, 5, 70, 55)).resize((32, 32), pil_mode))
        assert (ours - ref).abs().mean() < 0.01, mode
        assert (ours - ref).abs().max() < 0.1, mode
    assert torch.equal(crop.resize(img, box, 'bilinear', flip=True), crop.resize(img, box, 'bilinear', False).flip(-1))


def test_device_crop_boxes_follow_the_scale_range():
    """scale (1, 1) with the image's own aspect ratio is the whole image; the output is normalised like the CPU
    transform (ImageNet mean/std) and has the requested size."""
    img = torch.full((3, 30, 40), 255, dtype=torch.uint8)
    crop = gpu_data.DeviceRandomResizedCrop(16, scale=(1, 1), ratio=(4 / 3, 4 / 3), interpolation='bilinear')
    out = crop([img, img])
    assert out.shape == (2, 3, 16, 16)
    expected = (1 - crop.mean) / crop.std  # white after normalisation, per channel
    assert torch.allclose(out, expected.expand_as(out), atol=1e-5)
    with pytest.raises(ValueError, match='interpolation'):
        gpu_data.DeviceRandomResizedCrop(16, interpolation='nearest')


def test_device_loader_keeps_labels_with_their_images_and_counts_undecodable(tmp_path):
    """Every yielded image's colour matches its label; the PNG is decoded through the fallback; the corrupt JPEG
    is dropped and counted."""
    root = colour_folder(str(tmp_path))
    dataset = gpu_data.EncodedImageFolder(root)
    loader = build_loader(dataset, 5, 0, False, train=False, collate_fn=gpu_data.collate_encoded)
    crop = gpu_data.DeviceRandomResizedCrop(8, scale=(0.5, 1), mean=(0, 0, 0), std=(1, 1, 1))
    seen = skipped = 0
    for images, targets, n_bad in gpu_data.DeviceDecodeLoader(loader, crop, 'cpu'):
        skipped += n_bad
        seen += len(images)
        red = images[:, 0].mean(dim=(1, 2)) > images[:, 2].mean(dim=(1, 2))  # [N]
        assert torch.equal(red, targets == dataset.class_to_idx['red'])
    assert (seen, skipped) == (len(dataset) - 1, 1)


def test_auto_decode_choice():
    assert gpu_data.choose_decode('auto', 'cpu', 10, 1000) == 'cpu'  # never the device path on a CPU
    assert gpu_data.choose_decode('auto', 'cuda', 800, 1000) == 'gpu'  # the workers cannot keep up
    assert gpu_data.choose_decode('auto', 'cuda', 5000, 1000) == 'cpu'
    assert gpu_data.choose_decode('gpu', 'cpu', 5000, 1000) == 'gpu'  # asked for explicitly


def test_cpu_pipeline_rate_is_positive_and_counts_images(tmp_path):
    root = colour_folder(str(tmp_path), corrupt=False)
    rate = gpu_data.cpu_pipeline_rate(SafeImageFolder(root, transforms.ToTensor()), n=4)
    assert 0 < rate < 1e6


def test_pretrain_with_device_decoding(tmp_path, pretrain_args):
    """main_pretrain --decode gpu (on the CPU here): trains two epochs with a falling loss and counts the corrupt
    image as skipped."""
    for i in range(16):
        d = tmp_path / 'data' / 'train' / str(i % 2)
        d.mkdir(parents=True, exist_ok=True)
        photo((48, 40), seed=i).save(d / f'{i}.jpg', quality=90)
    with open(tmp_path / 'data' / 'train' / '0' / 'bad.jpg', 'wb') as f:
        f.write(b'\xff\xd8garbage')
    out = tmp_path / 'out'
    main_pretrain.main(pretrain_args(tmp_path / 'data', out, '--decode', 'gpu', '--epochs', '3', '--blr', '1e-2'))
    with open(out / 'log.txt') as f:
        log = [json.loads(line) for line in f]
    assert len(log) == 3
    assert log[-1]['train_loss'] < log[0]['train_loss']
    assert sum(e['train_skipped_images'] for e in log) >= 1
