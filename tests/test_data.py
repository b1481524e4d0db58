"Tests for skindiff.data: finding data, checksums, safe extraction, image loading and subsets."
import io, tarfile, threading, warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from skindiff.core import ConfigError, SkindiffError
from skindiff import data as sd
from skindiff.data import (DataNotFoundError, ChecksumError, ImageReadError, find_data_root, load_mnist, load_cifar10,
                           safe_extract, image_folder_items, csv_items, load_images, ImageFileDataset, seeded_subset,
                           to_model_range, to_uint8, pad_images, resize_images, MNIST_MD5, EXTRACT_MARKER)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    "Every test gets its own cache directory and no $SKINDIFF_DATA."
    monkeypatch.setenv("SKINDIFF_CACHE", str(tmp_path/"cache"))
    monkeypatch.delenv("SKINDIFF_DATA", raising=False)
    return tmp_path/"cache"


def shared_root(need: str) -> Path:
    "The shared data directory with `need`, or skip the test."
    try: return find_data_root(need=need)
    except DataNotFoundError: pytest.skip(f"shared data with {need} not available")


# --- finding the data --------------------------------------------------------------------------

def test_missing_data_root_lists_places(tmp_path, monkeypatch, private_cache):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataNotFoundError) as ei: find_data_root(need="no-such-dataset-xyz")
    msg = str(ei.value)
    assert "Looked in" in msg and "SKINDIFF_DATA" in msg and "--data" in msg
    assert str(private_cache/"data") in msg                      # the cache
    assert str(tmp_path.parent/"shared"/"data") in msg           # beside the working directory
    assert "download" in msg
    assert isinstance(ei.value, FileNotFoundError) and isinstance(ei.value, SkindiffError)


def test_explicit_missing_root_is_an_error(tmp_path):
    bad = tmp_path/"nowhere"
    with pytest.raises(DataNotFoundError, match="nowhere"): find_data_root(bad)
    with pytest.raises(DataNotFoundError, match="nowhere"): find_data_root(str(bad), need="MNIST/raw")


def test_explicit_root_without_need_does_not_fall_back(tmp_path):
    (tmp_path/"d").mkdir()
    with pytest.raises(DataNotFoundError, match="MNIST/raw"): find_data_root(tmp_path/"d", need="MNIST/raw")
    assert find_data_root(tmp_path/"d") == tmp_path/"d"


def test_env_var_used_and_not_second_guessed(tmp_path, monkeypatch):
    (tmp_path/"d"/"x").mkdir(parents=True)
    monkeypatch.setenv("SKINDIFF_DATA", str(tmp_path/"d"))
    assert find_data_root(need="x") == tmp_path/"d"
    monkeypatch.setenv("SKINDIFF_DATA", str(tmp_path/"missing"))
    with pytest.raises(DataNotFoundError, match="SKINDIFF_DATA"): find_data_root(need="x")
    assert find_data_root(tmp_path/"d", need="x") == tmp_path/"d"  # the explicit argument wins


def test_cache_is_last_resort(tmp_path, monkeypatch, private_cache):
    monkeypatch.chdir(tmp_path)
    (private_cache/"data"/"only-in-cache").mkdir(parents=True)
    assert find_data_root(need="only-in-cache") == private_cache/"data"


# --- MNIST -------------------------------------------------------------------------------------

def test_load_mnist_shared():
    shared_root("MNIST/raw")
    x, y = load_mnist("test")
    assert x.shape == (10_000, 1, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (10_000,) and y.dtype == torch.int64 and set(y.unique().tolist()) == set(range(10))


def test_mnist_bad_split():
    with pytest.raises(ConfigError, match="split"): load_mnist("valid")


def test_mnist_md5_mismatch(tmp_path):
    raw = tmp_path/"fake"/"MNIST"/"raw"; raw.mkdir(parents=True)
    for name in MNIST_MD5: (raw/name).write_bytes(b"not mnist")
    with pytest.raises(ChecksumError) as ei: load_mnist("train", data=tmp_path/"fake")
    msg = str(ei.value)
    assert "md5" in msg and "MNIST" in msg and any(n in msg for n in MNIST_MD5)
    assert any(md5 in msg for md5 in MNIST_MD5.values())


def test_mnist_missing_file(tmp_path):
    raw = tmp_path/"fake"/"MNIST"/"raw"; raw.mkdir(parents=True)
    (raw/"train-images-idx3-ubyte").write_bytes(b"x")
    with pytest.raises(DataNotFoundError, match="t10k-labels-idx1-ubyte"): load_mnist("train", data=tmp_path/"fake")


# --- CIFAR-10 ----------------------------------------------------------------------------------

def test_cifar10_sha_mismatch(tmp_path):
    (tmp_path/"fake"/"cifar10").mkdir(parents=True)
    (tmp_path/"fake"/"cifar10"/"cifar10-jpg.tar.gz").write_bytes(b"nope")
    with pytest.raises(ChecksumError, match="cifar10-jpg.tar.gz"): load_cifar10("test", data=tmp_path/"fake")


def test_cifar10_bad_args():
    with pytest.raises(ConfigError, match="source"): load_cifar10(source="png")
    with pytest.raises(ConfigError, match="split"): load_cifar10(split="val")
    with pytest.raises(ConfigError, match="download"): load_cifar10(source="jpeg", download=True)


def test_cifar10_official_missing_is_clear(tmp_path):
    with pytest.raises(DataNotFoundError): load_cifar10("test", data=tmp_path, source="official")


# --- safe extraction ---------------------------------------------------------------------------

def make_tar(path: Path, files: dict, links: list = ()) -> Path:
    "A .tar.gz with regular `files` (name -> bytes) and `links` as (name, type, target)."
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name); ti.size = len(data); tf.addfile(ti, io.BytesIO(data))
        for name, typ, target in links:
            ti = tarfile.TarInfo(name); ti.type = typ; ti.linkname = target; tf.addfile(ti)
    return path


def assert_nothing_written(tmp_path: Path, allowed: set):
    assert {p.name for p in tmp_path.iterdir()} <= allowed, sorted(p.name for p in tmp_path.iterdir())


@pytest.mark.parametrize("files,links,what", [
    ({"ok.txt": b"1", "../evil": b"x"}, [], "'..'"),
    ({"ok.txt": b"1", "a/../../evil": b"x"}, [], "'..'"),
    ({"ok.txt": b"1", "/tmp/skindiff-evil-abs": b"x"}, [], "absolute"),
    ({"ok.txt": b"1"}, [("link", tarfile.SYMTYPE, "/etc/passwd")], "symbolic link"),
    ({"ok.txt": b"1"}, [("hard", tarfile.LNKTYPE, "ok.txt")], "hard link"),
    ({"ok.txt": b"1"}, [("fifo", tarfile.FIFOTYPE, "")], "device or FIFO"),
])
def test_safe_extract_refuses(tmp_path, private_cache, files, links, what):
    tar = make_tar(tmp_path/"bad.tar.gz", files, links)
    with pytest.raises(SkindiffError) as ei: safe_extract(tar, tmp_path/"out")
    msg = str(ei.value)
    assert what in msg and "bad.tar.gz" in msg
    bad_name = next(iter([n for n in files if n != "ok.txt"] + [l[0] for l in links]))
    assert repr(bad_name) in msg                                   # names the member
    assert_nothing_written(tmp_path, {"bad.tar.gz", "cache"})      # no dest, no temp dir, no evil
    assert not (tmp_path.parent/"evil").exists() and not Path("/tmp/skindiff-evil-abs").exists()


def test_safe_extract_once(tmp_path, monkeypatch):
    tar = make_tar(tmp_path/"good.tar.gz", {"a/1.txt": b"one", "b/2.txt": b"two"})
    dest = safe_extract(tar, tmp_path/"out")
    assert (dest/"a"/"1.txt").read_bytes() == b"one" and (dest/"b"/"2.txt").read_bytes() == b"two"
    assert (dest/EXTRACT_MARKER).is_file()
    def boom(*a, **k): raise AssertionError("re-extracted")
    monkeypatch.setattr(sd.tarfile, "open", boom)
    assert safe_extract(tar, tmp_path/"out") == dest               # second call: no tarfile.open at all
    assert_nothing_written(tmp_path, {"good.tar.gz", "out", "cache"})


def test_safe_extract_replaces_partial_tree(tmp_path):
    tar = make_tar(tmp_path/"good.tar.gz", {"a.txt": b"new"})
    (tmp_path/"out").mkdir(); (tmp_path/"out"/"stale.txt").write_text("half-done")   # no marker
    dest = safe_extract(tar, tmp_path/"out")
    assert (dest/"a.txt").read_bytes() == b"new" and not (dest/"stale.txt").exists()
    assert_nothing_written(tmp_path, {"good.tar.gz", "out", "cache"})


def test_safe_extract_concurrent(tmp_path):
    tar = make_tar(tmp_path/"good.tar.gz", {f"d/{i}.txt": str(i).encode() for i in range(200)})
    errors = []
    def work():
        try: safe_extract(tar, tmp_path/"out")
        except Exception as e: errors.append(e)
    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert not errors
    assert len(list((tmp_path/"out"/"d").iterdir())) == 200
    assert_nothing_written(tmp_path, {"good.tar.gz", "out", "cache"})


# --- generic image loading ---------------------------------------------------------------------

@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path/"imgs"
    for c in ("b_class", "a_class"): (root/c).mkdir(parents=True)
    Image.new("RGB", (40, 30), (255, 0, 0)).save(root/"a_class"/"1.jpg")
    Image.new("L", (20, 20), 100).save(root/"a_class"/"2.png")
    Image.new("RGBA", (24, 24), (0, 0, 255, 255)).save(root/"b_class"/"3.png")
    (root/"b_class"/"corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0garbage")
    (root/"b_class"/"notes.txt").write_text("ignored")
    return root


def test_image_folder_items(folder):
    items, classes = image_folder_items(folder)
    assert classes == ["a_class", "b_class"]
    assert [(p.name, y) for p, y in items] == [("1.jpg", 0), ("2.png", 0), ("3.png", 1), ("corrupt.jpg", 1)]


def test_corrupt_jpeg_raises_naming_file(folder):
    items, _ = image_folder_items(folder)
    with pytest.raises(ImageReadError) as ei: load_images(items, size=8, progress=False)
    assert "corrupt.jpg" in str(ei.value) and ei.value.path.name == "corrupt.jpg"


def test_corrupt_jpeg_skipped_and_counted(folder):
    items, _ = image_folder_items(folder)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        x, y, skipped = load_images(items, size=8, on_error="skip", progress=False)
    assert [p.name for p in skipped] == ["corrupt.jpg"]
    assert x.shape == (3, 3, 8, 8) and x.dtype == torch.uint8 and y.tolist() == [0, 0, 1]
    assert len(w) == 1 and "skipped 1" in str(w[0].message)


def test_load_images_modes_and_fit(folder):
    items, _ = image_folder_items(folder)
    x, _, _ = load_images(items[:3], size=10, fit="pad", progress=False)
    assert x[0, :, 0, 5].tolist() == [0, 0, 0]                     # padding bar on the 4:3 red image
    assert x[0, 0, 5, 5] > 200 and x[1].unique().numel() == 1      # red centre; grey became RGB
    assert x[2, 2, 5, 5] > 200 and x[2, 0, 5, 5] < 50              # RGBA blue → RGB
    with pytest.raises(ConfigError, match="size="): load_images(items[:3], progress=False)  # mixed sizes
    with pytest.raises(ConfigError, match="on_error"): load_images(items, on_error="ignore")


def test_dataset_names_file(folder):
    items, classes = image_folder_items(folder)
    ds = ImageFileDataset(items, size=12, classes=classes)
    x, y = ds[0]
    assert x.shape == (3, 12, 12) and x.dtype == torch.uint8 and y == 0
    with pytest.raises(ImageReadError, match="corrupt.jpg"): ds[3]


def test_csv_items(tmp_path, folder):
    csv = tmp_path/"meta.csv"
    dirs = [folder/"a_class", folder/"b_class"]
    csv.write_text("image,dx\n1.jpg,a_class\n3.png,b_class\n")
    items, classes = csv_items(csv, "image", "dx", dirs)
    assert classes == ["a_class", "b_class"] and [(p.name, y) for p, y in items] == [("1.jpg", 0), ("3.png", 1)]
    items, classes = csv_items(csv, "image", "dx", dirs, classes=["b_class", "a_class", "c"])
    assert [y for _, y in items] == [1, 0]
    with pytest.raises(ConfigError, match="'label'"): csv_items(csv, "image", "label", dirs)
    with pytest.raises(ConfigError, match="not in classes"): csv_items(csv, "image", "dx", dirs, classes=["a_class"])
    csv.write_text("image,dx\n1,a_class\n")
    with pytest.raises(DataNotFoundError, match="1.bmp"): csv_items(csv, "image", "dx", dirs, suffix=".bmp")


# --- transforms and subsets --------------------------------------------------------------------

def test_ranges_round_trip():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    f = to_model_range(x)
    assert f.min() == -1 and f.max() == 1 and torch.equal(to_uint8(f), x)
    assert to_uint8(torch.tensor([-2.0, 2.0])).tolist() == [0, 255]
    with pytest.raises(ConfigError): to_model_range(f)


def test_pad_and_resize():
    x = torch.full((2, 1, 28, 28), 255, dtype=torch.uint8)
    p = pad_images(x, 2)
    assert p.shape == (2, 1, 32, 32) and p[0, 0, 0, 0] == 0 and p[0, 0, 2, 2] == 255
    r = resize_images(p, 16)
    assert r.shape == (2, 1, 16, 16) and r.dtype == torch.uint8
    assert resize_images(to_model_range(p), (8, 8)).dtype == torch.float32


def test_seeded_subset_deterministic():
    a = seeded_subset(1000, 100, seed=3)
    assert torch.equal(a, seeded_subset(1000, 100, seed=3)) and not torch.equal(a, seeded_subset(1000, 100, seed=4))
    assert a.dtype == torch.int64 and len(a.unique()) == 100 and torch.equal(a, a.sort().values)
    torch.manual_seed(0); b = seeded_subset(1000, 100, seed=3); torch.manual_seed(1)
    assert torch.equal(a, b)                                         # independent of the global RNG
    assert torch.equal(seeded_subset(5, None, seed=0), torch.arange(5))


def test_seeded_subset_stratified():
    labels = torch.tensor([0]*700 + [1]*200 + [2]*90 + [3]*10)
    idx = seeded_subset(1000, 100, seed=0, labels=labels)
    assert torch.bincount(labels[idx]).tolist() == [70, 20, 9, 1]
    assert torch.equal(idx, seeded_subset(1000, 100, seed=0, labels=labels))
    idx = seeded_subset(1000, 7, seed=1, labels=labels)
    assert len(idx) == 7 and len(idx.unique()) == 7


def test_seeded_subset_errors():
    with pytest.raises(ConfigError, match="n_total"): seeded_subset(10, 11, seed=0)
    with pytest.raises(ConfigError, match="labels"): seeded_subset(10, 5, seed=0, labels=[0, 1])
