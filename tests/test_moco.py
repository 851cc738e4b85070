"""main_moco.py (MoCo v3): gradients, the symmetric loss, the momentum encoder and its schedule, checkpoints that
load downstream, and a 2-epoch run on the demo data through main(args)."""
import argparse
import math
import os
import shutil
import socket

import pytest
import torch
import torch.nn.functional as F

import main_moco
import models_vit
from main_moco import build_moco, contrastive_loss, moco_momentum
from test_finetune import read_log
from util.checkpoint import load_file
from util.data import demo_root
from util.pretrained import load_pretrained

pytestmark = pytest.mark.usefixtures('one_thread')


def tiny_moco(**kw):
    torch.manual_seed(0)
    args = argparse.Namespace(model='vit_test', input_size=32, drop_path=0.0, moco_dim=8, moco_mlp_dim=16,
                              moco_t=0.2, stop_grad_conv1=False)
    vars(args).update(kw)
    return build_moco(args)


def test_every_trainable_parameter_gets_a_gradient_and_the_momentum_encoder_none():
    model = tiny_moco()
    loss = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith('predictor.') for n in trainable) and any(n.startswith('projector.') for n in trainable)
    for n, p in trainable.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    momentum = [(n, p) for n, p in model.named_parameters() if n.startswith('momentum_')]
    assert momentum and all(not p.requires_grad and p.grad is None for _, p in momentum)
    # MoCo v3's fixed sin-cos position embedding is not trained; --stop_grad_conv1 also freezes the patch projection
    assert not model.base_encoder.pos_embed.requires_grad and model.base_encoder.patch_embed.proj.weight.requires_grad
    frozen = tiny_moco(stop_grad_conv1=True)
    assert not any(p.requires_grad for p in frozen.base_encoder.patch_embed.parameters())
    # the projector ends in a BN without affine parameters, the predictor in a plain Linear
    assert not model.projector[-1].affine and isinstance(model.predictor[-1], torch.nn.Linear)


def test_loss_is_the_symmetrised_infonce_times_2t():
    model = tiny_moco()
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    loss = model(x1, x2)
    assert torch.allclose(loss, model(x2, x1), atol=1e-6)  # symmetric in the two views

    def by_hand(q, k, T=0.2):  # CrossEntropy(q·kᵀ/T, arange) x 2T on L2-normalised vectors
        logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).t() / T
        return -(logits.log_softmax(dim=1).diagonal()).mean() * 2 * T

    q1, q2 = (model.predictor(model.projector(model.base_encoder(x))) for x in (x1, x2))
    k1, k2 = (model.momentum_projector(model.momentum_encoder(x)) for x in (x1, x2))
    assert torch.allclose(loss, by_hand(q1, k2) + by_hand(q2, k1), atol=1e-5)
    assert torch.allclose(contrastive_loss(q1, k2, 0.2), by_hand(q1, k2), atol=1e-6)
    assert not torch.allclose(by_hand(q1, k2), by_hand(q1, k1))  # the pairing matters: the check can fail


def _two_rank_loss(rank, port, q, k, out):
    """Rank 0 holds 3 of the 5 query/key pairs, rank 1 the other 2: keys are gathered, positives offset."""
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.distributed.init_process_group('gloo', rank=rank, world_size=2)
    part = slice(0, 3) if rank == 0 else slice(3, 5)
    torch.save(contrastive_loss(q[part], k[part], 0.2), os.path.join(out, f'loss{rank}.pt'))
    torch.distributed.destroy_process_group()


def test_keys_are_gathered_across_ranks(tmp_path):
    """Two gloo processes with unequal batches give the single-process loss of the whole batch (weighted by size)."""
    torch.manual_seed(0)
    q, k = torch.randn(5, 8), torch.randn(5, 8)
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_two_rank_loss, args=(port, q, k, str(tmp_path)), nprocs=2)
    l0, l1 = (torch.load(tmp_path / f'loss{r}.pt') for r in (0, 1))
    assert torch.allclose((3 * l0 + 2 * l1) / 5, contrastive_loss(q, k, 0.2), atol=1e-6)
    assert not torch.allclose(l0, contrastive_loss(q[:3], k[:3], 0.2))  # rank 0 did see rank 1's keys


def test_momentum_schedule_and_update():
    assert moco_momentum(0.0, 0.99) == pytest.approx(0.99) and moco_momentum(1.0, 0.99) == pytest.approx(1.0)
    assert moco_momentum(0.5, 0.99) == pytest.approx(0.995)
    values = [moco_momentum(t / 10, 0.99) for t in range(11)]
    assert all(a < b for a, b in zip(values, values[1:]))
    model = tiny_moco()
    with torch.no_grad():
        for p in model.base_encoder.parameters():
            p.add_(1.0)
    key_before = model.momentum_encoder.blocks[0].attn.qkv.weight.clone()
    query = model.base_encoder.blocks[0].attn.qkv.weight
    model.update_momentum(0.9)
    assert torch.allclose(model.momentum_encoder.blocks[0].attn.qkv.weight, 0.9 * key_before + 0.1 * query)
    after = model.momentum_encoder.blocks[0].attn.qkv.weight.clone()
    model.update_momentum(1.0)  # the end of training: the key encoder stops moving
    assert torch.equal(model.momentum_encoder.blocks[0].attn.qkv.weight, after)


def test_moco_checkpoint_loads_into_a_plain_vit():
    model = tiny_moco()
    with torch.no_grad():  # make the momentum copy differ from the query encoder
        for p in model.momentum_encoder.parameters():
            p.mul_(0.5)
    vit = models_vit.vit_test(global_pool='token')
    info = load_pretrained(vit, {'model': model.state_dict(), 'epoch': 0})
    assert info['missing'] == ['head.weight', 'head.bias'] and info['unexpected'] == []
    for k, v in model.base_encoder.state_dict().items():
        assert torch.equal(vit.state_dict()[k], v), k  # the query encoder, not the momentum copy


def demo_subset(root, n_train=12, n_val=4):
    """The first images of every class of the demo digits (materialised in the `demo_dir` fixture's folder) as a
    small train/ + val/ ImageFolder at `root`: real demo data, few enough for a test of seconds."""
    src = demo_root()
    for split, n in (('train', n_train), ('val', n_val)):
        for c in sorted(os.listdir(os.path.join(src, split))):
            os.makedirs(os.path.join(root, split, c))
            for f in sorted(os.listdir(os.path.join(src, split, c)))[:n]:
                shutil.copy(os.path.join(src, split, c, f), os.path.join(root, split, c, f))
    return str(root)


def test_demo_run_two_epochs(demo_dir, tmp_path):
    out = tmp_path / 'moco'
    args = main_moco.get_args_parser().parse_args([
        '--data_path', demo_subset(tmp_path / 'digits', n_train=24), '--input_size', '32', '--model', 'vit_test',
        '--epochs', '2', '--warmup_epochs', '1', '--batch_size', '24', '--blr', '5e-3', '--min_crop_scale', '0.3',
        '--moco_dim', '16',
        '--moco_mlp_dim', '32', '--num_workers', '0', '--device', 'cpu', '--output_dir', str(out),
        '--print_freq', '100'])
    model = main_moco.main(args)
    logs = read_log(out)
    assert [r['epoch'] for r in logs] == [0, 1]
    assert logs[1]['train_loss'] < logs[0]['train_loss'] and all(math.isfinite(r['train_loss']) for r in logs)
    # the momentum follows the cosine per optimizer step: half-way after epoch 0, 1 at the end
    assert logs[0]['train_moco_m'] == pytest.approx(moco_momentum(0.5, 0.99))
    assert logs[1]['train_moco_m'] == pytest.approx(1.0)
    ckpt = load_file(os.path.join(out, 'checkpoint-last.pth'))
    assert isinstance(ckpt['args'], dict) and ckpt['epoch'] == 1
    assert any(k.startswith('momentum_encoder.') for k in ckpt['model'])
    assert not any(k.startswith(('module.', '_orig_mod.')) for k in ckpt['model'])
    encoder = load_file(os.path.join(out, 'checkpoint-encoder.pth'))['model']
    for k, v in model.base_encoder.state_dict().items():
        assert torch.equal(encoder[k], v), k
    # both files fine-tune: the encoder and the full MoCo checkpoint give the same plain ViT
    a, b = models_vit.vit_test(global_pool='avg'), models_vit.vit_test(global_pool='avg')
    assert load_pretrained(a, os.path.join(out, 'checkpoint-encoder.pth'))['missing'] == \
        ['fc_norm.weight', 'fc_norm.bias', 'head.weight', 'head.bias']
    load_pretrained(b, os.path.join(out, 'checkpoint-last.pth'))
    assert torch.equal(a.blocks[1].mlp.fc2.weight, b.blocks[1].mlp.fc2.weight)
    assert torch.equal(a.pos_embed, model.base_encoder.pos_embed)
