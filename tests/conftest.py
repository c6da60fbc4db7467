import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture
def image_corpus(tmp_path):
    """Shards glob of a tiny corpus whose samples carry their images (tests/image_corpus.py)."""
    from tests.image_corpus import write_image_corpus
    return write_image_corpus(str(tmp_path / "image-corpus"))
