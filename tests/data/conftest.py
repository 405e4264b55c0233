import pytest

from jkd.data import load_dataset


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="session")
def embedded(data_dir):
    return load_dataset(data_dir=data_dir)
