"""Shared fixtures: a data folder holding every data set in its original download format."""
import pytest

from original_format import write_original_downloads


@pytest.fixture(scope="session")
def original_format_data(tmp_path_factory):
    """``(data folder, checksums JSON)``: tiny MNIST, Fashion-MNIST, CIFAR-10, IMDb, GloVe 100-d and CelebA files
    as downloaded (tests/original_format.py), and the md5s of those files for ``$LOSSGRAD_CHECKSUMS``."""
    root = tmp_path_factory.mktemp("data")
    return root, write_original_downloads(root)
