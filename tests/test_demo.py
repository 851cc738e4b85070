"""`python main_pretrain.py` with no --data_path: the embedded digits demo, as a user runs it."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_pretraining_learns(tmp_path, demo_dir):
    """3 demo epochs materialise the digits under $MIM_DEMO_DIR, write checkpoint-last.pth and a log.txt whose
    train_loss falls from the first to the last epoch."""
    out = tmp_path / 'out'
    cmd = [sys.executable, 'main_pretrain.py', '--epochs', '3', '--output_dir', str(out), '--num_workers', '0']
    # one intra-op thread: barely slower on an idle 2-core machine, several times faster on a busy one
    env = {**os.environ, 'MIM_DEMO_DIR': demo_dir, 'OMP_NUM_THREADS': '1'}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)  # generous: a guard against hangs, not a speed check
    assert proc.returncode == 0, proc.stderr[-3000:]

    n_train = sum(len(files) for _, _, files in os.walk(os.path.join(demo_dir, 'train')))
    n_val = sum(len(files) for _, _, files in os.walk(os.path.join(demo_dir, 'val')))
    assert (n_train, n_val) == (1437, 360)
    assert sorted(os.listdir(os.path.join(demo_dir, 'train'))) == [str(d) for d in range(10)]

    assert (out / 'checkpoint-last.pth').is_file()
    with open(out / 'log.txt') as f:
        rows = [json.loads(line) for line in f]
    assert [r['epoch'] for r in rows] == [0, 1, 2]
    assert rows[-1]['train_loss'] < rows[0]['train_loss']
