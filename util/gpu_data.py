"""Decode images on the training device and crop/resize them there: the input pipeline for a GPU that the CPU
workers cannot keep fed (MAE-Tiny on one H100 wants thousands of images a second; PIL decoding + RandomResizedCrop
gives a few hundred per CPU core).

The workers only read file bytes (`EncodedImageFolder`); `DeviceDecodeLoader` wraps the DataLoader, decodes each
batch of JPEGs in one call (nvJPEG on CUDA; libjpeg on CPU, where it serves tests and CPU debugging) and applies
MAE's RandomResizedCrop + flip + normalise on the device (`DeviceRandomResizedCrop`). `choose_decode` picks between
this and the CPU pipeline from measured rates.

References: torchvision.io.decode_jpeg (batched GPU decoding); MAE / MAE-Lite pre-training crops (RandomResizedCrop
scale (0.08 or 0.2, 1), random or bicubic interpolation, flip).
"""
import logging
import random
import time

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file
from torchvision.transforms import RandomResizedCrop

from util.data import SafeImageFolder

log = logging.getLogger(__name__)


class EncodedImageFolder(SafeImageFolder):
    """A SafeImageFolder whose items are (file bytes as a uint8 tensor [B], target): decoding is left to the
    device. A file that cannot be read is None, dropped and counted by `collate_encoded`."""

    def __getitem__(self, index):
        path, target = self.samples[index]
        try:
            return read_file(path), target
        except (OSError, RuntimeError) as e:
            log.warning(f'skipping unreadable image {path}: {type(e).__name__}: {e}')
            return None


def collate_encoded(batch):
    """(list of encoded images, targets [N], n_skipped) from a batch of EncodedImageFolder items."""
    kept = [b for b in batch if b is not None]
    return [b[0] for b in kept], torch.tensor([b[1] for b in kept], dtype=torch.long), len(batch) - len(kept)


def decode_batch(data, device):
    """Decode encoded images to RGB uint8 [3, H, W] tensors on `device`.

    All JPEGs go through one batched decode_jpeg call; if that fails (a corrupt file, or a PNG among them), each
    image is decoded on its own, non-JPEGs on the CPU. Images that cannot be decoded come back as None.
    (torchvision 0.29 marks its decoders deprecated in favour of TorchCodec; this is the one place to swap.)"""
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        pass
    out = []
    for d in data:
        try:
            out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            try:
                out.append(decode_image(d, mode=ImageReadMode.RGB).to(device))
            except RuntimeError as e:
                log.warning(f'skipping an image that cannot be decoded: {e}')
                out.append(None)
    return out


class DeviceRandomResizedCrop:
    """RandomResizedCrop + horizontal flip + normalise on uint8 [3, H, W] images already on the device; returns a
    float batch [N, 3, size, size]. Crop boxes follow torchvision's sampling (the same `get_params`);
    `interpolation='random'` picks bilinear or bicubic per image (MAE-Lite, timm's 'random'); resizing is
    antialiased, like PIL's."""

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation='random', flip=0.5,
                 mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
        if interpolation not in ('random', 'bilinear', 'bicubic'):
            raise ValueError(f"interpolation must be random, bilinear or bicubic, got {interpolation!r}")
        self.size, self.scale, self.ratio = size, list(scale), list(ratio)
        self.interpolation, self.flip = interpolation, flip
        self.mean, self.std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def resize(self, img, box, mode, flip):
        """One image: crop `box` (top, left, height, width), resize to size x size, flip; float [1, 3, S, S] in 0..1."""
        i, j, h, w = box
        crop = img[None, :, i:i + h, j:j + w].float()  # [1, 3, h, w]
        out = F.interpolate(crop, size=(self.size, self.size), mode=mode, align_corners=False, antialias=True)
        out = out.clamp_(0, 255).round_() / 255  # PIL resizes in uint8: round, as it does
        return out.flip(-1) if flip else out

    def __call__(self, imgs):
        out = []
        for img in imgs:
            box = RandomResizedCrop.get_params(img, self.scale, self.ratio)
            mode = random.choice(('bilinear', 'bicubic')) if self.interpolation == 'random' else self.interpolation
            out.append(self.resize(img, box, mode, torch.rand(()) < self.flip))
        x = torch.cat(out)  # [N, 3, S, S]
        if self.mean.device != x.device:  # moved once, not per batch
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        return (x - self.mean) / self.std


class DeviceDecodeLoader:
    """Wraps a DataLoader over an EncodedImageFolder (collate_encoded): yields (images on `device` [N, 3, S, S],
    targets, n_skipped) like the CPU pipeline, with images that fail to decode dropped and counted."""

    def __init__(self, loader, transform, device):
        self.loader, self.transform, self.device = loader, transform, torch.device(device)
        self.sampler = loader.sampler

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for data, targets, n_bad in self.loader:
            imgs = decode_batch(data, self.device)
            ok = [i for i, img in enumerate(imgs) if img is not None]
            if not ok:
                yield torch.empty(0), torch.empty(0, dtype=torch.long), n_bad + len(imgs)
                continue
            yield self.transform([imgs[i] for i in ok]), targets[ok], n_bad + len(imgs) - len(ok)


def images_per_second(fn, n_items, min_seconds=0.5):
    """Rate at which `fn()` (which handles `n_items` images) runs, over repeated calls for at least min_seconds."""
    fn()  # warm-up: first-call costs (file cache, CUDA context, nvJPEG handles)
    calls, start = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - start < min_seconds:
        fn()
        calls += 1
    return calls * n_items / (time.perf_counter() - start)


def cpu_pipeline_rate(dataset, n=32):
    """Images per second of one CPU worker: decode + transform `n` images of `dataset` in this process."""
    idx = list(range(min(n, len(dataset))))
    return images_per_second(lambda: [dataset[i] for i in idx], len(idx))


def choose_decode(decode, device, workers_rate, model_rate, margin=1.2):
    """'cpu' or 'gpu' for --decode. 'auto' decodes on the GPU when the CPU workers (`workers_rate` images/s in all)
    cannot feed the model (`model_rate` images/s) with `margin` to spare; it never picks the GPU path on a CPU."""
    if decode != 'auto':
        return decode
    if torch.device(device).type != 'cuda':
        return 'cpu'
    return 'gpu' if workers_rate < margin * model_rate else 'cpu'


def _synchronize(device):
    if torch.device(device).type != 'cpu':
        torch.accelerator.synchronize()


def model_rate(model, args):
    """Images per second of forward + backward of a pre-training `model` (its output's first item is the loss) on a
    random batch of the run's shape, under the run's autocast; gradients are cleared afterwards."""
    from util.engine import autocast
    x = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=args.device)

    def run():
        with autocast(args):
            loss = model(x)[0]
        loss.backward()
        _synchronize(args.device)

    rate = images_per_second(run, args.batch_size, min_seconds=1.0)
    model.zero_grad(set_to_none=True)
    return rate


def pretrain_loader(args, dataset, loader, model):
    """The pre-training loader for --decode: the CPU `loader` as built, or a DeviceDecodeLoader over the same files
    (same sampler seed and sharding) that decodes and crops on args.device. 'auto' measures both sides first."""
    if args.decode == 'cpu' or (args.decode == 'auto' and torch.device(args.device).type != 'cuda'):
        return loader
    if args.decode == 'auto':
        workers = cpu_pipeline_rate(dataset) * max(args.num_workers, 1)
        need = model_rate(model, args)
        args.decode = choose_decode('auto', args.device, workers, need)
        log.info(f'--decode auto: {max(args.num_workers, 1)} CPU workers give ~{workers:.0f} img/s, the model takes '
                 f'~{need:.0f} img/s: decoding on the {"GPU" if args.decode == "gpu" else "CPU"}')
        if args.decode == 'cpu':
            return loader
    from util.data import build_loader
    encoded = EncodedImageFolder(dataset.root)
    inner = build_loader(encoded, args.batch_size, args.num_workers, args.pin_mem, train=True, seed=args.seed,
                         collate_fn=collate_encoded)
    crop = DeviceRandomResizedCrop(args.input_size, (args.min_crop_scale, 1.0), interpolation=args.interpolation)
    return DeviceDecodeLoader(inner, crop, args.device)
