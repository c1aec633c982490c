"""Worker CPU settings: thread count and denormals flushed to zero."""

import torch

from align_rl.cpu import configure_worker


def test_configure_worker_sets_threads_and_flushes_denormals():
    before = torch.get_num_threads()
    try:
        assert configure_worker(0) == 1 and torch.get_num_threads() == 1
        assert float(torch.tensor([1e-39]) * 1.0) == 0.0  # a denormal float32, flushed
        torch.set_flush_denormal(False)
        assert float(torch.tensor([1e-39]) * 1.0) > 0.0  # torch's default keeps it
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(before)
