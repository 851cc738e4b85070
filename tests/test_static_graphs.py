"""Every recipe's training forward traces as one graph under torch.compile: no `.item()`, no data-dependent branch
and no data-dependent shape (boolean indexing, nonzero). On a GPU each of those is a host synchronisation every step
and a break in a compiled graph (the whole step can then not be captured as one CUDA graph). `torch._dynamo.explain`
finds them on the CPU; it only traces, so this costs a second or two per model."""
import argparse

import pytest
import torch
import torch._dynamo

import models_hiera
import models_mae
import models_pvt
import models_swin
import models_vit
from main_distill import MAEDistiller, RelationDistiller, SwinD2Distiller
from main_moco import build_moco

pytestmark = pytest.mark.usefixtures('one_thread')


def vit_teacher(**kw):
    return models_vit.vit_test(num_classes=0, embed_dim=48, num_heads=3, **kw).requires_grad_(False).eval()


def moco():
    return build_moco(argparse.Namespace(model='vit_test', input_size=32, drop_path=0.0, moco_dim=8, moco_mlp_dim=16,
                                         moco_t=0.2, stop_grad_conv1=False))


def img(n=2, size=32):
    return torch.randn(n, 3, size, size)


# name: (module factory, inputs factory); the inputs are what each recipe's step passes (masks drawn inside)
RECIPES = {
    'mae_vit': (models_mae.mae_vit_test, lambda: (img(),)),
    'um_mae_vit': (lambda: models_mae.mae_vit_test(mask_type='uniform'), lambda: (img(),)),
    'um_mae_swin': (models_swin.mae_swin_test, lambda: (img(),)),
    'simmim_swin': (models_swin.simmim_swin_test, lambda: (img(),)),
    'um_mae_pvt': (models_pvt.mae_pvt_test, lambda: (img(),)),
    'mae_hiera': (models_hiera.mae_hiera_test, lambda: (img(),)),
    'd_mae': (lambda: MAEDistiller(models_mae.mae_vit_test(), vit_teacher(), [(1, 1)], hidden_pairs=[(1, 1)]),
              lambda: (img(),)),
    'd2_mae': (lambda: MAEDistiller(models_mae.mae_vit_test(depth=3), vit_teacher(depth=4), [(2, 3)], decode_idx=1),
               lambda: (img(),)),
    'tinymim': (lambda: RelationDistiller(models_vit.vit_test(num_classes=0), vit_teacher(depth=3), 2),
                lambda: (torch.randn(2, 2, 3, 32, 32),)),
    'd2_swin': (lambda: SwinD2Distiller(models_swin.simmim_swin_test_d2(),
                                        models_swin.simmim_swin_test(embed_dim=32).requires_grad_(False).eval()),
                lambda: (img(),)),
    'd_mae_hiera': (lambda: models_hiera.HieraDistiller(
                        models_hiera.mae_hiera_test(), models_hiera.create_teacher('hiera_test', num_heads=2).eval()),
                    lambda: (img(),)),
    'moco': (moco, lambda: (img(), img())),
    'deit_finetune': (lambda: models_vit.vit_test(distilled=True), lambda: (img(),)),
}


@pytest.mark.parametrize('name', sorted(RECIPES))
def test_training_forward_is_one_graph(name):
    make_module, make_inputs = RECIPES[name]
    torch.manual_seed(0)
    module = make_module().train()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(module)(*make_inputs())
    reasons = [str(r.reason).splitlines()[0] for r in explained.break_reasons]
    assert explained.graph_break_count == 0 and explained.graph_count == 1, reasons
