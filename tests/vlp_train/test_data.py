"""The loader's .npy reader: np.load's result for any header, its cache, and refusals."""
import io

import numpy as np
import pytest

from vlp_train.data import load_npy


def npy(array, **kwargs) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("array", [
    np.random.default_rng(0).standard_normal((36, 2048)).astype(np.float16),
    np.zeros((0, 4), np.float16),
    np.asfortranarray(np.arange(15.0).reshape(3, 5)),
    np.arange(7, dtype=">i4"),
])
def test_load_npy_equals_np_load_twice(array):
    data = npy(array)
    for _ in range(2):  # the second read takes the cached header
        loaded = load_npy(data)
        assert loaded.dtype == array.dtype and loaded.shape == array.shape
        np.testing.assert_array_equal(loaded, np.load(io.BytesIO(data), allow_pickle=False))


def test_load_npy_refuses_pickles_truncation_and_other_files():
    with pytest.raises(ValueError, match="object arrays"):
        load_npy(npy(np.array([1, "x"], dtype=object), allow_pickle=True))
    with pytest.raises(ValueError, match="smaller"):
        load_npy(npy(np.zeros((36, 2048), np.float16))[:-10])
    with pytest.raises(ValueError, match="not a .npy"):
        load_npy(b"PK\x03\x04 a zip, not an array")
