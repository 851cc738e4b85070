"""DeiT-style distillation in main_finetune.py: the distilled ViT (dist token, second head, averaged at inference),
the hard/soft losses against their formulas, loading to and from plain ViTs, and 2-epoch runs on demo data."""
import math
import os

import pytest
import torch

import main_finetune
import models_mae
import models_vit
from main_finetune import distillation_loss
from test_finetune import read_log
from test_moco import demo_subset
from util.checkpoint import load_file
from util.pretrained import load_pretrained

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.mark.parametrize('pool', ['avg', 'token'])
def test_distilled_vit_trains_both_heads_and_averages_them_at_inference(pool):
    torch.manual_seed(0)
    model = models_vit.vit_test(distilled=True, global_pool=pool)
    x = torch.randn(3, 3, 32, 32)
    cls_logits, dist_logits = model(x)  # training: the two heads apart
    assert cls_logits.shape == dist_logits.shape == (3, 10) and not torch.allclose(cls_logits, dist_logits)
    (cls_logits.logsumexp(1) + dist_logits.logsumexp(1)).sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert model.pos_embed.shape == (1, 2 + 16, 32)  # cls, dist, 4x4 patches
    # inference: the mean of the two heads, each computed from its own token by hand
    model.eval()
    tokens = model.forward_features(x)  # [N, 2+L, D]
    feat = tokens[:, 2:].mean(1) if pool == 'avg' else tokens[:, 0]
    by_hand = (model.head(model.fc_norm(feat)) + model.head_dist(model.fc_norm(tokens[:, 1]))) / 2
    assert torch.allclose(model(x), by_hand, atol=1e-6)
    assert torch.allclose(model(x), (cls_logits + dist_logits) / 2, atol=1e-5)  # no dropout: same tokens
    with pytest.raises(ValueError, match='rel_pos_bias'):
        models_vit.vit_test(distilled=True, rel_pos_bias=True)


def test_hard_and_soft_losses_equal_their_formulas():
    base = torch.tensor(0.7)
    dist = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    teacher = torch.tensor([[0.0, 3.0, 1.0], [4.0, 0.0, 1.0]])  # argmax 1 and 0
    # hard: CE with the teacher's argmax = mean of -log softmax(dist)[argmax]
    ce = -(math.log(math.exp(0.0) / (math.exp(2.0) + 1 + math.exp(-1.0)))
           + math.log(math.exp(0.5) / (math.exp(0.5) + math.exp(1.5) + 1))) / 2
    loss, term = distillation_loss(base, dist, teacher, 'hard', 0.3, 1.0)
    assert term.item() == pytest.approx(ce, rel=1e-6)
    assert loss.item() == pytest.approx(0.7 * 0.7 + 0.3 * ce, rel=1e-6)
    # soft: sum of KL(teacher || student) at temperature tau, times tau² / numel
    tau = 2.0
    p_t, log_p_s = (teacher / tau).softmax(1), (dist / tau).log_softmax(1)
    kl = (p_t * (p_t.log() - log_p_s)).sum() * tau ** 2 / dist.numel()
    loss, term = distillation_loss(base, dist, teacher, 'soft', 0.5, tau)
    assert term.item() == pytest.approx(kl.item(), rel=1e-5) and loss.item() == pytest.approx(0.35 + 0.5 * kl.item())
    assert distillation_loss(base, teacher, teacher, 'soft', 1.0, tau)[0].abs() < 1e-6  # nothing left to learn


def test_loading_to_and_from_a_distilled_vit():
    torch.manual_seed(0)
    mae = models_mae.mae_vit_test()
    student = models_vit.vit_test(distilled=True, global_pool='avg')
    info = load_pretrained(student, mae.state_dict())
    assert set(info['missing']) == {'fc_norm.weight', 'fc_norm.bias', 'head.weight', 'head.bias', 'head_dist.weight',
                                    'head_dist.bias'}
    assert torch.equal(student.dist_token, mae.cls_token)  # DeiT token starts from cls, as its position row
    assert torch.equal(student.pos_embed[:, 1], mae.pos_embed[:, 0]) and torch.equal(student.pos_embed[:, 2:],
                                                                                       mae.pos_embed[:, 1:])
    assert 0 < student.head_dist.weight.std() < 1e-4  # re-initialised like the head
    # a distilled fine-tuned checkpoint into a plain ViT (linear probe, k-NN, a teacher): nothing missing
    plain = models_vit.vit_test(global_pool='avg')
    info = load_pretrained(plain, {'model': student.state_dict()})
    assert info['missing'] == [] and info['unexpected'] == []
    assert torch.equal(plain.pos_embed[:, 0], student.pos_embed[:, 0])
    assert torch.equal(plain.pos_embed[:, 1:], student.pos_embed[:, 2:])
    assert torch.equal(plain.head.weight, student.head.weight)


def test_distillation_runs_two_epochs_with_a_finetuned_teacher(demo_dir, tmp_path):
    root = demo_subset(tmp_path / 'digits')

    def run(out, *more):
        os.makedirs(out, exist_ok=True)
        return main_finetune.main(main_finetune.get_args_parser().parse_args([
            '--data_path', root, '--model', 'vit_test', '--input_size', '32', '--crop_pct', '1', '--aa', 'none',
            '--hflip', '0', '--min_crop_scale', '0.5', '--batch_size', '16', '--blr', '5e-3', '--warmup_epochs', '1',
            '--num_workers', '0', '--device', 'cpu', '--print_freq', '100', '--output_dir', str(out), *more]))

    teacher_dir = tmp_path / 'teacher'
    run(teacher_dir, '--epochs', '2')
    teacher_path = os.path.join(teacher_dir, 'checkpoint-best.pth')
    out = tmp_path / 'student'
    # mixup: the base loss takes the soft targets, the teacher the mixed images
    result = run(out, '--epochs', '2', '--distillation_type', 'hard', '--teacher_model', 'vit_test',
                 '--teacher_path', teacher_path, '--mixup', '0.2')
    logs = read_log(out)
    assert [r['epoch'] for r in logs] == [0, 1]
    assert logs[1]['train_loss'] < logs[0]['train_loss']
    assert logs[1]['train_loss_distill'] < logs[0]['train_loss_distill']
    assert all(math.isfinite(r['train_loss_cls']) for r in logs)
    sd = load_file(os.path.join(out, 'checkpoint-last.pth'))['model']
    # the student alone is saved (no teacher keys)
    assert set(sd) == set(models_vit.vit_test(distilled=True, global_pool='avg', num_classes=10).state_dict())
    # --eval rebuilds the distilled model from the checkpoint alone and reproduces the logged accuracy
    ev = run(tmp_path / 'ev', '--eval', '--resume', os.path.join(out, 'checkpoint-last.pth'))
    assert ev['acc1'] == pytest.approx(result['acc1'], abs=1e-4)
    with pytest.raises(ValueError, match='--teacher_path'):
        run(tmp_path / 'bad', '--epochs', '1', '--distillation_type', 'soft', '--teacher_model', 'vit_test')
