"""Shared fixtures: the repo root on sys.path, tiny synthetic ImageFolders, a private demo-data folder."""
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def make_image_folder(root, n_per_class=8, classes=('a', 'b'), size=40, seed=0):
    """Write `n_per_class` random RGB PNGs per class under root/train/<class>/; returns root."""
    rng = np.random.default_rng(seed)
    for c in classes:
        d = os.path.join(root, 'train', c)
        os.makedirs(d, exist_ok=True)
        for i in range(n_per_class):
            pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(d, f'{i:03d}.png'))
    return str(root)


@pytest.fixture(scope='session')
def image_folder_factory():
    """make_image_folder, for fixtures wider than one test."""
    return make_image_folder


@pytest.fixture
def image_folder(tmp_path):
    """A 16-image, 2-class ImageFolder of random 40 px PNGs at tmp_path/data/train."""
    return make_image_folder(tmp_path / 'data')


@pytest.fixture
def demo_dir(tmp_path, monkeypatch):
    """Point $MIM_DEMO_DIR at a fresh temporary folder so the demo data never touches the user's cache."""
    path = str(tmp_path / 'demo_digits')
    monkeypatch.setenv('MIM_DEMO_DIR', path)
    return path


@pytest.fixture(scope='session')
def pretrain_args():
    """Build main_pretrain args for a tiny CPU run: pretrain_args(data_path, output_dir, *more_flags)."""
    import main_pretrain

    def make(data_path, output_dir, *more):
        return main_pretrain.get_args_parser().parse_args([
            '--data_path', str(data_path), '--output_dir', str(output_dir), '--model', 'mae_vit_test',
            '--input_size', '32', '--batch_size', '4', '--epochs', '2', '--warmup_epochs', '1', '--num_workers', '0',
            '--device', 'cpu', '--print_freq', '100', *more])
    return make


@pytest.fixture(scope='module')  # module scope: set before the module's other fixtures build models
def one_thread():
    """Tiny models run fastest on one intra-op thread; a second one only spins, badly so on a shared machine.
    Modules opt in with `pytestmark = pytest.mark.usefixtures('one_thread')`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
