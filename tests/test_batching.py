import numpy as np

from embindex.text.batching import pad_batch, token_budget_batches


def test_budget_batches_cover_all_rows_once_and_respect_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=500)
    seen = []
    for idx in token_budget_batches(lengths, batch_tokens=1024):
        assert len(idx) * lengths[idx].max() <= 1024 or len(idx) == 1
        seen.extend(idx.tolist())
    assert sorted(seen) == list(range(500))


def test_longest_first_and_oversized_rows_alone():
    batches = list(token_budget_batches([10, 5000, 20], batch_tokens=100))
    assert batches[0].tolist() == [1]
    assert sorted(np.concatenate(batches).tolist()) == [0, 1, 2]


def test_pad_batch_sides():
    ids, mask = pad_batch([np.array([1, 2, 3]), np.array([4])], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_batch([np.array([1, 2, 3]), np.array([4])], pad_id=9, side="left")
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
