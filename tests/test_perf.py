"""Process-level speed settings (util/perf.py) and the fused optimizer (util/optim.py)."""
import argparse
import os
import subprocess
import sys

import torch

from util.optim import adamw

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


FAULTS_PER_STEP = r"""
import resource, sys, torch
import models_mae
from util import perf
if sys.argv[1] == 'keep':
    assert perf.keep_freed_memory() and perf.keep_freed_memory()  # idempotent
torch.manual_seed(0)
model = models_mae.create_model('mae_vit_demo_patch4', img_size=32)
imgs = torch.randn(64, 3, 32, 32)
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(5):
    if i == 2:
        start = faults()
    model(imgs)[0].backward()
print((faults() - start) // 3)
"""


def test_keep_freed_memory_stops_refaulting_activation_buffers():
    """Training steps of the demo MAE (batch 64): with glibc's defaults every step maps its large buffers afresh and
    page-faults them in (about 14k faults a step here); once freed memory is kept, steps reuse it."""
    def faults(mode):
        out = subprocess.run([sys.executable, '-c', FAULTS_PER_STEP, mode], cwd=REPO, capture_output=True,
                             text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.split()[-1])

    default, keep = faults('default'), faults('keep')
    assert keep * 4 < default, (keep, default)


def test_fused_adamw_matches_the_plain_update():
    """util.optim.adamw is fused on CPU and takes the same steps as torch's plain AdamW, decay groups included."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    ref = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    ref.load_state_dict(model.state_dict())
    args = argparse.Namespace(weight_decay=0.05, lr=1e-2, device='cpu')
    opt = adamw(model, args, betas=(0.9, 0.95))
    assert all(g['fused'] for g in opt.param_groups)
    ref_opt = torch.optim.AdamW([{'params': [p for p in ref.parameters() if p.ndim > 1], 'weight_decay': 0.05},
                                 {'params': [p for p in ref.parameters() if p.ndim <= 1], 'weight_decay': 0.0}],
                                lr=1e-2, betas=(0.9, 0.95))
    x = torch.randn(32, 8)
    for _ in range(5):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
