"""benchmark.py: the official-style baseline computes what models_mae computes (so the speed comparison is fair),
and the distillation configurations time main_distill's real step with a frozen teacher."""
import torch

import benchmark
import masking
import models_mae


def _cfg(spec):
    args = benchmark.get_args_parser().parse_args(['--model', 'mae_vit_test', '--input_size', '32', '--batch_size',
                                                   '4', '--teacher', 'vit_test', '--device', 'cpu'])
    return benchmark.make_config(args, spec)


def test_baseline_step_equals_ours_given_the_same_noise():
    torch.manual_seed(0)
    mae = models_mae.create_model('mae_vit_test', img_size=32, norm_pix_loss=True)
    imgs = torch.randn(4, 3, 32, 32)
    noise = masking.random_noise(4, mae.patch_embed.num_patches)
    loss, pred, mask = mae(imgs, mask_ratio=0.75, noise=noise)
    b_loss, b_pred, b_mask = benchmark.OfficialStyleMAE(mae)(imgs, mask_ratio=0.75, noise=noise)
    assert torch.equal(mask, b_mask)
    assert torch.allclose(pred, b_pred, atol=1e-5)
    assert torch.allclose(loss, b_loss, atol=1e-6)


def test_distill_bench_trains_the_student_only():
    for impl in ('d_mae', 'd2_mae'):
        bench = benchmark.Bench(_cfg(f'impl={impl}'))
        teacher = bench.net.teacher[0]
        t_before = [p.clone() for p in teacher.parameters()]
        s_before = [p.clone() for p in bench.net.model.parameters()]
        bench.step()
        assert all(torch.equal(a, b) for a, b in zip(t_before, teacher.parameters()))
        assert any(not torch.equal(a, b) for a, b in zip(s_before, bench.net.model.parameters()))
        assert len(bench.net.model.blocks) == len(teacher.blocks) + (impl == 'd2_mae')
