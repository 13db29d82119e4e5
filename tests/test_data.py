"""Tests of companion/data.py on small files written here in the original formats.

No test touches the network: an autouse fixture makes every urllib request
(torchvision's downloads go through it) and torchvision's Google-Drive
download fail, as they would on a machine without internet access.

The loaders check the md5 of CIFAR-10's and CelebA's files (through torchvision)
and of the IMDb and GloVe archives against the published md5s. Tests that read
hand-made files name those files' md5s through the loaders' documented seam
($LOSSGRAD_CHECKSUMS, see companion.data.expected_md5), so the same checks run
and pass; separate tests show that without it the hand-made files are refused
and that with it a damaged file still is.
"""
import json
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from companion import data as D  # noqa: E402
from original_format import (REVIEWS, make_celeba_tree, make_cifar_tree, make_idx_files,  # noqa: E402
                             make_imdb_tree, md5, write_glove_txt, write_original_downloads)

IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
CELEBA_TXT = ("list_eval_partition.txt", "list_attr_celeba.txt", "identity_CelebA.txt",
              "list_bbox_celeba.txt", "list_landmarks_align_celeba.txt")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    def refuse_drive(*args, **kwargs):
        raise RuntimeError("Google Drive disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torchvision.datasets.celeba, "download_file_from_google_drive", refuse_drive)
    monkeypatch.delenv("LOSSGRAD_DATA", raising=False)


# ----------------------------------------------------------------------------- contracts

def assert_classification_images(d, channels, size, dtype):
    for split in ("train", "test"):
        x, y = d[split]
        assert x.dtype == dtype and x.shape[1:] == (channels, size, size)
        assert y.dtype == torch.int64 and y.shape == (x.shape[0],)
        assert 0 <= int(y.min()) and int(y.max()) <= 9
        if dtype == torch.float32:
            assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def assert_celeba_contract(d, size=64):
    for split in ("train", "test"):
        assert d[split].dtype == torch.uint8 and d[split].shape[1:] == (3, size, size)


def assert_imdb_contract(d):
    vocab = d["embeddings"].shape[0]
    assert d["embeddings"].dtype == torch.float32 and d["embeddings"].dim() == 2
    assert torch.all(d["embeddings"][D.PAD_INDEX] == 0)
    for split in ("train", "test"):
        tokens, lengths, labels = d[split]
        assert tokens.dtype == torch.int64 and lengths.dtype == torch.int64 and labels.dtype == torch.float32
        assert tokens.shape[0] == lengths.shape[0] == labels.shape[0]
        assert int(lengths.min()) >= 1 and int(lengths.max()) <= tokens.shape[1]
        assert 0 <= int(tokens.min()) and int(tokens.max()) < vocab
        positions = torch.arange(tokens.shape[1])
        assert torch.all((tokens == D.PAD_INDEX) == (positions >= lengths[:, None]))
        assert set(labels.tolist()) <= {0.0, 1.0}


# ----------------------------------------------------------------------------- MNIST, Fashion-MNIST

def check_idx_roundtrip(d, arrays):
    assert_classification_images(d, 1, 28, torch.float32)
    for split, (x, y) in arrays.items():
        got_x, got_y = d[split]
        assert got_x.shape == (len(x), 1, 28, 28)
        assert torch.equal((got_x[:, 0] * 255).round().to(torch.int64), torch.as_tensor(x, dtype=torch.int64))
        assert torch.equal(got_y, torch.as_tensor(y, dtype=torch.int64))


def test_mnist_reads_gzipped_idx_files(tmp_path):
    arrays = make_idx_files(tmp_path / "MNIST" / "raw")
    check_idx_roundtrip(D.mnist(root=tmp_path, download=False), arrays)


def test_fashion_mnist_reads_idx_from_root_and_from_system_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "FASHION_MNIST_SYSTEM_DIRS", ())
    arrays = make_idx_files(tmp_path / "a" / "FashionMNIST" / "raw", seed=1)
    check_idx_roundtrip(D.fashion_mnist(root=tmp_path / "a", download=False), arrays)

    # An installed copy elsewhere (like Debian's) is found and unpacked into the raw folder.
    system = tmp_path / "system"
    arrays = make_idx_files(system, n_train=7, n_test=3, seed=2)
    monkeypatch.setattr(D, "FASHION_MNIST_SYSTEM_DIRS", (system,))
    check_idx_roundtrip(D.fashion_mnist(root=tmp_path / "b", download=False), arrays)
    assert (tmp_path / "b" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()


def test_data_dir_env_var_is_used_when_root_is_none(tmp_path, monkeypatch):
    arrays = make_idx_files(tmp_path / "MNIST" / "raw", n_train=4, n_test=2)
    monkeypatch.setenv("LOSSGRAD_DATA", str(tmp_path))
    check_idx_roundtrip(D.mnist(download=False), arrays)


@pytest.mark.parametrize("loader, label, folder", [(D.mnist, "MNIST", "MNIST"),
                                                   (D.fashion_mnist, "Fashion-MNIST", "FashionMNIST")])
@pytest.mark.parametrize("download", [False, True])
def test_idx_missing_raises_dataset_unavailable(tmp_path, monkeypatch, loader, label, folder, download):
    monkeypatch.setattr(D, "FASHION_MNIST_SYSTEM_DIRS", ())
    with pytest.raises(D.DatasetUnavailable) as info:
        loader(root=tmp_path, download=download)
    msg = str(info.value)
    assert msg.startswith(label + " is not available")
    assert str(tmp_path / folder / "raw") in msg
    assert all(name in msg for name in IDX_FILES)
    assert "http" in msg and "train-images-idx3-ubyte.gz" in info.value.urls[0]
    assert ("download failed" in msg) == download


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_real_debian_copy(tmp_path):
    d = D.fashion_mnist(root=tmp_path, download=False)
    assert d["train"][0].shape == (60000, 1, 28, 28) and d["test"][0].shape == (10000, 1, 28, 28)
    assert_classification_images(d, 1, 28, torch.float32)
    assert torch.equal(d["train"][1].bincount(), torch.full((10,), 6000))
    assert torch.equal(d["test"][1].bincount(), torch.full((10,), 1000))


# ----------------------------------------------------------------------------- CIFAR-10

def trust(monkeypatch, tmp_path, folder, names):
    """The seam users never set: the md5s of these hand-made files replace the published ones."""
    table = tmp_path / "checksums.json"
    table.write_text(json.dumps({name: md5(folder / name) for name in names}))
    monkeypatch.setenv(D.CHECKSUMS_ENV, str(table))


def trust_cifar_files(monkeypatch, folder):
    cls = torchvision.datasets.CIFAR10
    names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    trust(monkeypatch, folder.parent, folder, names)


def test_cifar10_reads_python_batches(tmp_path, monkeypatch):
    folder, batches = make_cifar_tree(tmp_path)
    trust_cifar_files(monkeypatch, folder)
    d = D.cifar10(root=tmp_path, download=False)
    assert_classification_images(d, 3, 32, torch.uint8)
    train_rows = np.concatenate([batches[f"data_batch_{i}"]["data"] for i in range(1, 6)])
    assert torch.equal(d["train"][0].reshape(len(train_rows), 3072), torch.from_numpy(train_rows))
    assert d["train"][1].tolist() == sum((batches[f"data_batch_{i}"]["labels"] for i in range(1, 6)), [])
    # channel planes: the first 1024 values of a row are the red image
    assert torch.equal(d["test"][0][1, 0].flatten(), torch.from_numpy(batches["test_batch"]["data"][1, :1024]))
    assert d["test"][1].tolist() == batches["test_batch"]["labels"]


def test_cifar10_rejects_files_failing_md5_and_missing_files(tmp_path):
    make_cifar_tree(tmp_path)
    for download in (False, True):
        with pytest.raises(D.DatasetUnavailable) as info:
            D.cifar10(root=tmp_path, download=download)
        msg = str(info.value)
        assert msg.startswith("CIFAR-10 is not available")
        assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in msg
        assert str(tmp_path / "cifar-10-batches-py") in msg
        assert all(name in msg for name in ("data_batch_1", "data_batch_5", "test_batch", "batches.meta"))


def test_cifar10_normalize():
    mean = torch.tensor(D.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(D.CIFAR10_STD).view(1, 3, 1, 1)
    at_mean = (mean * 255).round().to(torch.uint8).expand(2, 3, 4, 4)
    out = D.cifar10_normalize(at_mean)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 4, 4)
    assert out.abs().max() < 0.5 / 255 / min(D.CIFAR10_STD) + 1e-6
    white = D.cifar10_normalize(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
    assert torch.allclose(white, ((1 - mean) / std).expand(1, 3, 2, 2))
    with pytest.raises(TypeError):
        D.cifar10_normalize(torch.zeros(1, 3, 2, 2))


# ----------------------------------------------------------------------------- augmentation

def reference_crop_flip(img, dy, dx, flip, padding):
    h, w = img.shape[-2:]
    out = F.pad(img, (padding,) * 4)[:, dy:dy + h, dx:dx + w]
    return out.flip(-1) if flip else out


def test_augment_crop_flip_shape_dtype_and_determinism():
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    a = D.augment_crop_flip(x, torch.Generator().manual_seed(3))
    b = D.augment_crop_flip(x, torch.Generator().manual_seed(3))
    c = D.augment_crop_flip(x, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError):
        D.augment_crop_flip(x[0], torch.Generator())


def test_augment_flip_really_mirrors_without_padding():
    x = torch.rand(64, 2, 5, 7)
    out = D.augment_crop_flip(x, torch.Generator().manual_seed(0), padding=0)
    same = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    mirrored = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x)])
    assert torch.all(same ^ mirrored)  # each image is either kept or exactly mirrored
    assert 10 < int(mirrored.sum()) < 54  # about half flipped


def test_augment_crop_really_shifts():
    n, p = 24, 3
    # every pixel value is unique and nonzero, so the padding zeros and any shift are visible
    x = (torch.arange(1, 1 + 2 * 6 * 8, dtype=torch.float32).view(1, 2, 6, 8) * 1.0).repeat(n, 1, 1, 1)
    out = D.augment_crop_flip(x, torch.Generator().manual_seed(1), padding=p)
    found = []
    for img, o in zip(x, out):
        matches = [(dy, dx, fl) for dy in range(2 * p + 1) for dx in range(2 * p + 1) for fl in (False, True)
                   if torch.equal(o, reference_crop_flip(img, dy, dx, fl, p))]
        assert len(matches) == 1
        found.append(matches[0])
    # offsets vary over the batch, vertically and horizontally; both flips occur
    assert len({dy for dy, _, _ in found}) > 2 and len({dx for _, dx, _ in found}) > 2
    assert {fl for _, _, fl in found} == {False, True}


# ----------------------------------------------------------------------------- CelebA

def trust_celeba_files(monkeypatch, folder):
    names = [name for _, _, name in torchvision.datasets.CelebA.file_list if not name.endswith(".zip")]
    trust(monkeypatch, folder.parent, folder, names)


def test_celeba_crop_resize_split_and_cache(tmp_path, monkeypatch):
    folder, levels = make_celeba_tree(tmp_path)
    trust_celeba_files(monkeypatch, folder)
    d = D.celeba(root=tmp_path, download=False)
    assert_celeba_contract(d)
    assert d["train"].shape[0] == 3 and d["test"].shape[0] == 2  # partition 1 (valid) is left out
    # The 140x140 centre crop holds only the grey square: no black border survives.
    for imgs, want in ((d["train"], levels[:3]), (d["test"], levels[4:])):
        for img, level in zip(imgs, want):
            assert abs(img.float().mean().item() - level) < 2
            assert int(img.min()) >= level - 12
    # Second call reads the cached tensors: it works without the images.
    cache_files = list(folder.glob("*.pt"))
    assert len(cache_files) == 1
    for jpg in (folder / "img_align_celeba").iterdir():
        jpg.unlink()
    again = D.celeba(root=tmp_path, download=False)
    assert torch.equal(again["train"], d["train"]) and torch.equal(again["test"], d["test"])


def test_celeba_other_size(tmp_path, monkeypatch):
    folder, _ = make_celeba_tree(tmp_path, partitions=(0, 0, 2, 2))
    trust_celeba_files(monkeypatch, folder)
    assert_celeba_contract(D.celeba(root=tmp_path, size=32, download=False), size=32)


@pytest.mark.parametrize("download", [False, True])
def test_celeba_missing_lists_every_file(tmp_path, download):
    with pytest.raises(D.DatasetUnavailable) as info:
        D.celeba(root=tmp_path, download=download)
    msg = str(info.value)
    assert msg.startswith("CelebA is not available")
    assert str(tmp_path / "celeba") in msg and D.CELEBA_PAGE in msg
    assert "img_align_celeba/" in msg and all(name in msg for name in CELEBA_TXT)
    for _, h, name in torchvision.datasets.CelebA.file_list:  # the md5s torchvision will check
        if not name.endswith(".zip"):
            assert h in msg


# ----------------------------------------------------------------------------- IMDb, tokenizer, GloVe



def expected_reviews(split):
    return [(t, 0) for t in REVIEWS[(split, "neg")]] + [(t, 1) for t in REVIEWS[(split, "pos")]]


def test_imdb_reads_tree(tmp_path):
    make_imdb_tree(tmp_path)
    d = D.imdb(root=tmp_path, download=False)
    assert d["train"] == expected_reviews("train") and d["test"] == expected_reviews("test")


def test_imdb_extracts_local_archive(tmp_path, monkeypatch):
    make_imdb_tree(tmp_path / "src")
    root = tmp_path / "data"
    root.mkdir()
    archive = root / D.IMDB_ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "aclImdb", arcname="aclImdb")
    trust(monkeypatch, tmp_path, root, [D.IMDB_ARCHIVE])  # stands in for the real archive's md5
    d = D.imdb(root=root, download=False)
    assert d["train"] == expected_reviews("train")


@pytest.mark.parametrize("download", [False, True])
def test_imdb_missing_raises(tmp_path, download):
    with pytest.raises(D.DatasetUnavailable) as info:
        D.imdb(root=tmp_path, download=download)
    msg = str(info.value)
    assert msg.startswith("IMDb is not available") and D.IMDB_URL in msg
    assert str(tmp_path) in msg and "aclImdb" in msg and D.IMDB_MD5 in msg


def test_tokenize():
    assert D.tokenize("It's <br />NOT bad, isn't it?!") == [
        "it", "'s", "not", "bad", ",", "is", "n't", "it", "?", "!"]
    assert D.tokenize("A 'quoted' word<br /><br />and 10/10") == [
        "a", "'", "quoted", "'", "word", "and", "10", "/", "10"]
    assert D.tokenize("") == []


GLOVE_WORDS = ["the", ",", "great", "awful", "movie", "n't", "'s"]


def glove_vectors(dim=50):
    return torch.randn(len(GLOVE_WORDS), dim, generator=torch.Generator().manual_seed(0))


def test_glove_reads_txt_then_cache(tmp_path):
    vecs = glove_vectors()
    txt = tmp_path / "glove" / "glove.6B.50d.txt"
    write_glove_txt(txt, GLOVE_WORDS, vecs)
    words, vectors = D.glove(50, root=tmp_path, download=False)
    assert words == GLOVE_WORDS
    assert vectors.dtype == torch.float32 and torch.allclose(vectors, vecs, atol=1e-6)
    txt.unlink()  # the second call must be served by the cache
    words2, vectors2 = D.glove(50, root=tmp_path, download=False)
    assert words2 == words and torch.equal(vectors2, vectors)


def test_glove_reads_member_of_zip(tmp_path, monkeypatch):
    vecs = glove_vectors(dim=100)
    write_glove_txt(tmp_path / "src" / "glove.6B.100d.txt", GLOVE_WORDS, vecs)
    (tmp_path / "glove").mkdir()
    with zipfile.ZipFile(tmp_path / "glove" / "glove.6B.zip", "w") as zf:
        zf.write(tmp_path / "src" / "glove.6B.100d.txt", "glove.6B.100d.txt")
    trust(monkeypatch, tmp_path, tmp_path / "glove", [D.GLOVE_ARCHIVE])
    words, vectors = D.glove(100, root=tmp_path, download=False)
    assert words == GLOVE_WORDS and torch.allclose(vectors, vecs, atol=1e-6)


def test_glove_errors(tmp_path):
    for download in (False, True):
        with pytest.raises(D.DatasetUnavailable) as info:
            D.glove(100, root=tmp_path, download=download)
        msg = str(info.value)
        assert msg.startswith("GloVe 6B is not available") and D.GLOVE_URLS[0] in msg
        assert str(tmp_path / "glove") in msg and "glove.6B.100d.txt" in msg
    with pytest.raises(ValueError, match="dims"):
        D.glove(64, root=tmp_path)
    bad = tmp_path / "glove" / "glove.6B.50d.txt"
    bad.parent.mkdir(exist_ok=True)
    bad.write_text("the 0.1 0.2\n")
    with pytest.raises(ValueError, match="line 1"):
        D.glove(50, root=tmp_path, download=False)


def test_glove_vocab_and_imdb_tensors():
    vecs = glove_vectors()
    emb = D.glove_vocab(GLOVE_WORDS, vecs)
    assert emb.shape == (len(GLOVE_WORDS) + 2, 50)
    assert torch.all(emb[D.PAD_INDEX] == 0)
    assert torch.allclose(emb[D.UNK_INDEX], vecs.mean(0))
    assert torch.equal(emb[2:], vecs)

    data = [("The movie, the MOVIE!", 1), ("", 0), ("isn't great", 1)]
    tokens, lengths, labels = D.imdb_tensors(data, GLOVE_WORDS, max_len=4)
    idx = {w: i + 2 for i, w in enumerate(GLOVE_WORDS)}
    # first review: the movie , the | movie ! cut off (first max_len tokens kept)
    assert tokens[0].tolist() == [idx["the"], idx["movie"], idx[","], idx["the"]]
    assert tokens[1].tolist() == [D.UNK_INDEX, 0, 0, 0]  # empty review -> one unknown token
    assert tokens[2].tolist() == [D.UNK_INDEX, idx["n't"], idx["great"], 0]  # "is" is not in the vocabulary
    assert lengths.tolist() == [4, 1, 3]
    assert labels.dtype == torch.float32 and labels.tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError):
        D.imdb_tensors(data, GLOVE_WORDS, max_len=0)


def test_load_imdb_real_profile_on_local_files(tmp_path):
    make_imdb_tree(tmp_path)
    write_glove_txt(tmp_path / "glove" / "glove.6B.50d.txt", GLOVE_WORDS, glove_vectors())
    d = D.load("imdb", "quick", root=tmp_path, dim=50, max_len=6, download=False)
    assert_imdb_contract(d)
    assert d["embeddings"].shape == (len(GLOVE_WORDS) + 2, 50) and d["words"] == GLOVE_WORDS
    assert d["train"][0].shape == (5, 6) and d["train"][2].tolist() == [0, 0, 1, 1, 1]


# ----------------------------------------------------------------------------- load() and synthetic stand-ins

def test_load_validates_name_and_profile():
    with pytest.raises(ValueError, match="mnist, fashion_mnist, cifar10, celeba, imdb"):
        D.load("svhn", "smoke")
    with pytest.raises(ValueError, match="smoke, quick, paper"):
        D.load("mnist", "full")


@pytest.mark.parametrize("name", D.DATASETS)
def test_load_real_profile_raises_when_missing(tmp_path, monkeypatch, name):
    monkeypatch.setattr(D, "FASHION_MNIST_SYSTEM_DIRS", ())
    with pytest.raises(D.DatasetUnavailable):
        D.load(name, "paper", root=tmp_path, download=False)


def check_contract(name, d):
    if name in ("mnist", "fashion_mnist"):
        assert_classification_images(d, 1, 28, torch.float32)
    elif name == "cifar10":
        assert_classification_images(d, 3, 32, torch.uint8)
    elif name == "celeba":
        assert_celeba_contract(d)
    else:
        assert_imdb_contract(d)


def flat_tensors(d):
    out = []
    for key in ("train", "test", "embeddings"):
        value = d.get(key)
        out += list(value) if isinstance(value, tuple) else [] if value is None else [value]
    return out


@pytest.mark.parametrize("name", D.DATASETS)
def test_smoke_profile_contract_and_determinism(name):
    a = D.load(name, "smoke", n_train=64, n_test=32)
    check_contract(name, a)
    first = a["train"][0] if isinstance(a["train"], tuple) else a["train"]
    assert first.shape[0] == 64
    b = D.load(name, "smoke", n_train=64, n_test=32)
    c = D.load(name, "smoke", n_train=64, n_test=32, seed=1)
    assert all(torch.equal(u, v) for u, v in zip(flat_tensors(a), flat_tensors(b)))
    assert not all(torch.equal(u, v) for u, v in zip(flat_tensors(a), flat_tensors(c)))


def fit_logistic(x_train, y_train, classes, steps=200):
    torch.manual_seed(0)
    model = torch.nn.Linear(x_train.shape[1], classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        out = model(x_train)
        loss = (F.cross_entropy(out, y_train) if classes > 1
                else F.binary_cross_entropy_with_logits(out.squeeze(1), y_train))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_synthetic_images_are_learnable(name):
    d = D.load(name, "smoke")
    if name == "cifar10":  # 4x4 average pooling keeps the (8x8-smooth) class patterns, cuts the cost
        def prep(x):
            return F.avg_pool2d(D.cifar10_normalize(x), 4).flatten(1)
    else:
        def prep(x):
            return x.flatten(1)
    model, losses = fit_logistic(prep(d["train"][0]), d["train"][1], 10)
    accuracy = (model(prep(d["test"][0])).argmax(1) == d["test"][1]).float().mean().item()
    assert losses[-1] < 0.5 * losses[0]
    assert accuracy > 0.6  # chance is 0.1


def test_synthetic_imdb_is_learnable():
    d = D.synthetic_imdb()
    emb = d["embeddings"]

    def mean_embedding(tokens, lengths):
        return emb[tokens].sum(1) / lengths[:, None]

    model, losses = fit_logistic(mean_embedding(*d["train"][:2]), d["train"][2], 1)
    logits = model(mean_embedding(*d["test"][:2])).squeeze(1)
    accuracy = ((logits > 0).float() == d["test"][2]).float().mean().item()
    assert losses[-1] < 0.5 * losses[0] and accuracy > 0.8  # chance is about 0.5
    assert 0.3 < d["train"][2].mean().item() < 0.7


def test_synthetic_celeba_is_low_dimensional():
    d = D.synthetic_celeba(latent_dim=8)
    x = d["train"].flatten(1).float() / 255
    x = x - x.mean(0)
    energy = torch.linalg.eigvalsh(x @ x.T).flip(0)  # squared singular values of the centred data
    top = (energy[:8].sum() / energy.sum()).item()
    assert top > 0.8  # i.i.d. pixel noise of this size would give about 8/256
    assert x.std().item() > 0.05  # and the images are not flat


# ----------------------------------------------------------------------------- the original downloads, md5 seam

@pytest.fixture
def downloads(tmp_path):
    """A data folder holding every data set as downloaded (tests/original_format.py) and its checksums JSON."""
    checksums = write_original_downloads(tmp_path / "data", n_images=16)
    return tmp_path / "data", checksums


REAL_CONTRACT = {"mnist": 16, "fashion_mnist": 16, "cifar10": 40, "celeba": 8, "imdb": 16}


@pytest.mark.parametrize("name", D.DATASETS)
def test_every_loader_reads_the_original_downloads_through_the_checksum_seam(downloads, monkeypatch, name):
    root, checksums = downloads
    monkeypatch.setattr(D, "FASHION_MNIST_SYSTEM_DIRS", ())
    monkeypatch.setenv(D.CHECKSUMS_ENV, str(checksums))
    monkeypatch.setattr(D, "_WARNED_SUBSTITUTES", set())
    if name in ("cifar10", "celeba", "imdb"):  # md5-checked: the seam says these are not the published data
        with pytest.warns(UserWarning, match="not the published data"):
            d = D.load(name, "paper", root=root)  # download=True, as the notebooks call it: local files used
    else:
        d = D.load(name, "paper", root=root)
    check_contract(name, d)
    first = d["train"][0] if isinstance(d["train"], tuple) else d["train"]
    assert first.shape[0] == REAL_CONTRACT[name]
    if name == "imdb":
        assert d["embeddings"].shape == (13 + 2, 100)  # GloVe 100-d, as the paper's model


@pytest.mark.parametrize("name", ["cifar10", "celeba", "imdb"])
def test_original_downloads_are_refused_against_the_published_md5s(downloads, name):
    root, _ = downloads  # no $LOSSGRAD_CHECKSUMS: what users have
    with pytest.raises(D.DatasetUnavailable, match="md5"):
        D.load(name, "paper", root=root)


@pytest.mark.parametrize("relative, dataset", [
    ("cifar-10-python.tar.gz", "cifar10"), ("aclImdb_v1.tar.gz", "imdb"), ("glove/glove.6B.zip", "imdb"),
    ("celeba/list_eval_partition.txt", "celeba"), ("celeba/list_attr_celeba.txt", "celeba"),
])
@pytest.mark.parametrize("download", [False, True])
def test_a_damaged_file_with_its_real_name_is_refused_with_a_clear_error(downloads, monkeypatch, relative,
                                                                          dataset, download):
    root, checksums = downloads
    monkeypatch.setenv(D.CHECKSUMS_ENV, str(checksums))
    path = root / relative
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte: same name, same size
    path.write_bytes(bytes(raw))
    with pytest.raises(D.DatasetUnavailable) as info:
        D.load(dataset, "paper", root=root, download=download)
    assert f"{path} fail" in str(info.value) and "md5" in str(info.value)


def test_a_damaged_cifar_batch_is_refused_after_extraction(downloads, monkeypatch):
    root, checksums = downloads
    monkeypatch.setenv(D.CHECKSUMS_ENV, str(checksums))
    D.cifar10(root=root)  # extracts the archive
    batch = root / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:-1] + b"\0")
    (root / "cifar-10-python.tar.gz").unlink()  # so that it cannot be extracted again
    with pytest.raises(D.DatasetUnavailable) as info:
        D.cifar10(root=root, download=False)
    assert f"{batch} fails its md5 check" in str(info.value)


def test_the_checksum_seam_refuses_unknown_names_and_unreadable_files(tmp_path, monkeypatch):
    table = tmp_path / "sums.json"
    table.write_text(json.dumps({"data_batch_9": "0" * 32}))
    monkeypatch.setenv(D.CHECKSUMS_ENV, str(table))
    with pytest.raises(ValueError, match="no loader checks: \\['data_batch_9'\\]"):
        D.expected_md5("data_batch_1")
    monkeypatch.setenv(D.CHECKSUMS_ENV, str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="not a readable JSON"):
        D.expected_md5("data_batch_1")
    monkeypatch.delenv(D.CHECKSUMS_ENV)
    assert D.expected_md5("data_batch_1") == dict(torchvision.datasets.CIFAR10.train_list)["data_batch_1"]
