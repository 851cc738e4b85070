"""Two-process DDP (gloo, CPU) through main_pretrain.main, launched with torchrun."""
import json
import os
import socket
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_ddp_two_ranks_end_with_identical_weights(tmp_path, image_folder):
    """After 2 steps per rank, both ranks hold identical weights that differ from the initial ones; rank 0's
    checkpoint has the unwrapped keys (no 'module.') and an optimizer that took exactly 2 steps."""
    out = tmp_path / 'out'
    out.mkdir()
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port',
           str(_free_port()), os.path.join(HERE, 'ddp_worker.py'), image_folder, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)  # a guard against a hung rendezvous
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    r0, r1 = (torch.load(out / f'rank{r}.pt', weights_only=True) for r in (0, 1))
    init0 = torch.load(out / 'init0.pt', weights_only=True)
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f'{k} differs between ranks'
    changed = [k for k in r0 if not torch.equal(r0[k], init0[k])]
    assert 'blocks.0.attn.qkv.weight' in changed and 'decoder_pred.weight' in changed
    assert 'pos_embed' not in changed  # the fixed sin-cos table stays fixed

    ckpt = torch.load(out / 'run' / 'checkpoint-last.pth', weights_only=True)
    assert list(ckpt['model']) == list(r0) and len(ckpt['rng']) == 2
    assert {float(state['step']) for state in ckpt['optimizer']['state'].values()} == {2.0}  # 8 images per rank / 4
    for k in r0:
        assert torch.equal(ckpt['model'][k], r0[k])
    with open(out / 'run' / 'log.txt') as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 1 and rows[0]['epoch'] == 0
