"""Seeding and RNG state capture, so a resumed run draws the same random numbers as an uninterrupted one."""
import random

import numpy as np
import torch
import torch.distributed as dist

from util.dist import get_world_size, is_dist


def seed_everything(seed):
    """Seed python, numpy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    """This process's RNG states (torch CPU/CUDA, numpy, python) in weights_only-safe types."""
    np_state = np.random.get_state()
    state = {'torch': torch.get_rng_state(),
             'numpy': {'keys': torch.from_numpy(np_state[1].astype(np.int64)), 'pos': int(np_state[2]),
                       'has_gauss': int(np_state[3]), 'gauss': float(np_state[4])},
             'python': [list(x) if isinstance(x, tuple) else x for x in random.getstate()]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['gauss']))
    p = state['python']
    random.setstate((p[0], tuple(p[1]), p[2]))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def gather_rng_states():
    """Every rank's RNG state, as a list indexed by rank (collective: call on all ranks)."""
    mine = rng_state()
    if not is_dist():
        return [mine]
    states = [None] * get_world_size()
    dist.all_gather_object(states, mine)
    return states
