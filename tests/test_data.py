"""Corruption-tolerant data loading (util/data.py) and its accounting through a real training epoch."""
import json
import os

import numpy as np
import pytest
import torch

import main_pretrain
from util.data import SafeImageFolder, collate_skip


def _add_bad_files(data):
    """A corrupt JPEG (random bytes) and a non-image file in class folder 'b'; returns their paths."""
    corrupt = os.path.join(data, 'train', 'b', 'corrupt.jpg')
    with open(corrupt, 'wb') as f:
        f.write(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    notes = os.path.join(data, 'train', 'b', 'notes.txt')
    with open(notes, 'w') as f:
        f.write('not an image\n')
    return corrupt, notes


def test_safe_image_folder_and_collate_skip(image_folder):
    """The non-image is listed in non_images and not indexed; the corrupt image yields None; collate_skip drops it
    and counts it."""
    corrupt, notes = _add_bad_files(image_folder)
    ds = SafeImageFolder(os.path.join(image_folder, 'train'))
    assert ds.non_images == [notes]
    assert len(ds) == 17 and notes not in [p for p, _ in ds.samples]
    bad = [p for p, _ in ds.samples].index(corrupt)
    assert ds[bad] is None
    good = ds[0]
    assert good is not None and good[1] == 0

    import torchvision.transforms as T
    ds.transform = T.ToTensor()
    images, targets, skipped = collate_skip([ds[0], ds[bad], ds[1]])
    assert skipped == 1 and images.shape == (2, 3, 40, 40) and targets.tolist() == [0, 0]
    images, targets, skipped = collate_skip([None, None])
    assert skipped == 2 and images.shape[0] == 0 and targets.shape == (0,)


def test_corrupt_image_is_counted_once_per_epoch(tmp_path, image_folder_factory, pretrain_args):
    """Training over a folder with one corrupt JPEG logs train_skipped_images == 1 in every epoch's log line."""
    data = image_folder_factory(tmp_path / 'data', n_per_class=0)
    image_folder_factory(tmp_path / 'data', n_per_class=8, classes=('a',), seed=1)
    image_folder_factory(tmp_path / 'data', n_per_class=7, classes=('b',), seed=2)
    _add_bad_files(data)  # 16 files = 4 full batches of 4, so the corrupt one is never in a dropped last batch
    out = tmp_path / 'out'
    model = main_pretrain.main(pretrain_args(data, out))
    with open(out / 'log.txt') as f:
        rows = [json.loads(line) for line in f]
    assert [r['train_skipped_images'] for r in rows] == [1, 1]
    assert all(np.isfinite(r['train_loss']) for r in rows)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_demo_dir_that_holds_something_else_is_named(tmp_path, monkeypatch):
    """$MIM_DEMO_DIR pointing at a non-empty folder that is not the demo data: an error naming the folder and what
    to do, not a missing-val/ crash later, and the user's files are left alone."""
    import pytest
    from util.data import demo_root
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'notes.txt').write_text('keep me')
    monkeypatch.setenv('MIM_DEMO_DIR', str(tmp_path / 'mine'))
    with pytest.raises(FileExistsError, match='MIM_DEMO_DIR'):
        demo_root()
    assert os.listdir(tmp_path / 'mine') == ['notes.txt']
    assert sorted(os.listdir(tmp_path)) == ['mine']  # the temporary copy was removed


def test_atomic_folder_publishes_whole_or_not_at_all(tmp_path):
    """The demo sets' writer: a completed block appears at `root` in one rename; a block that raises leaves neither
    `root` nor a temporary folder behind; a `root` that already holds something is left as it was."""
    from util.data import atomic_folder
    root = tmp_path / 'set'
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(str(root)) as tmp:
            open(os.path.join(tmp, 'half.txt'), 'w').close()
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []
    with atomic_folder(str(root)) as tmp:
        open(os.path.join(tmp, 'done.txt'), 'w').close()
    assert os.listdir(root) == ['done.txt']
    with atomic_folder(str(root)) as tmp:
        open(os.path.join(tmp, 'other.txt'), 'w').close()
    assert os.listdir(root) == ['done.txt'] and sorted(os.listdir(tmp_path)) == ['set']
