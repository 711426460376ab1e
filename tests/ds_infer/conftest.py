"""ds_infer tests run their tiny models on one intra-op thread: with several threads, every small op
waits at an OpenMP barrier, which on a shared machine costs more than the op itself."""

import torch

torch.set_num_threads(1)
