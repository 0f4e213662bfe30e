"""`dynamicid.batching.HalvingBatches`: what it does not swallow (the halving itself: tests/test_curation_gpu.py)."""

import pytest
import torch

from dynamicid.batching import HalvingBatches


def fake_gpu(most: int, error: Exception):
    """FAKE: a model on a GPU (none here) that raises `error` on batches of more than `most` items."""

    def run(batch):
        if len(batch) > most:
            raise error
        return [item * 10 for item in batch]

    return run


def test_batches_are_halved_down_to_one_item_and_every_item_comes_back_in_order():
    batches = HalvingBatches(16, "items")
    assert batches(fake_gpu(1, torch.cuda.OutOfMemoryError("CUDA out of memory")), list(range(21))) == [
        i * 10 for i in range(21)
    ]
    assert batches.size == 1


def test_out_of_memory_on_one_item_and_other_errors_are_the_callers():
    with pytest.raises(torch.cuda.OutOfMemoryError):
        HalvingBatches(4, "items")(fake_gpu(0, torch.cuda.OutOfMemoryError("CUDA out of memory")), [1, 2, 3])
    batches = HalvingBatches(4, "items")
    with pytest.raises(ValueError, match="odd input"):
        batches(fake_gpu(1, ValueError("odd input")), [1, 2, 3])
    assert batches.size == 4
