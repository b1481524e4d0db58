"Tests for skindiff.skin: loaders for five layouts, label vocabulary, lesion-grouped splits, tensor cache, bad input."
import hashlib, json, shutil, warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from skindiff.core import ConfigError, SkindiffError
from skindiff.data import DataNotFoundError, ImageReadError, find_data_root
from skindiff import skin
from skindiff.skin import (SKIN_CLASSES, ISIC2018_COLUMNS, SkinDataError, ImageModeWarning, label_indices, read_ham10000,
                           read_isic2018, read_imagefolder, read_ph2, read_skin_table, detect_format, load_dermamnist,
                           lesion_split, lesion_folds, dermamnist_split, split_leakage, skin_split, save_split_csv, read_split_csv,
                           skin_tensors, decoded_images)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SKINDIFF_CACHE", str(tmp_path/"cache"))
    monkeypatch.delenv("SKINDIFF_DATA", raising=False)
    return tmp_path/"cache"


def shared(name: str) -> Path:
    try: return find_data_root(need=name)/name
    except DataNotFoundError: pytest.skip(f"shared data {name} not available")


@pytest.fixture(scope="module")
def ham():
    return read_ham10000(shared("ham10000"))


def small_ham(tmp_path, ham, per_class: int = 2, lesions_with_two: int = 2) -> Path:
    "A tiny official-layout HAM10000 copy (a few images per class, some lesions with two images) under tmp_path."
    multi = ham[ham.lesion_id.duplicated(keep=False)]
    pick_l = multi.lesion_id.drop_duplicates().iloc[:lesions_with_two]
    rows = pd.concat([ham[ham.lesion_id.isin(pick_l)]] + [ham[ham.label == c].iloc[:per_class] for c in SKIN_CLASSES])
    rows = rows.drop_duplicates("image_id")
    root = tmp_path/"ham"
    for i, r in enumerate(rows.itertuples()):
        d = root/skin.HAM10000_IMAGE_DIRS[i % 2]; d.mkdir(parents=True, exist_ok=True)
        shutil.copy(r.path, d/f"{r.image_id}.jpg")
    rows[["lesion_id", "image_id", "label", "dx_type", "age", "sex", "localization", "dataset"]].rename(
        columns={"label": "dx"}).to_csv(root/skin.HAM10000_METADATA, index=False)
    return root


# --- vocabulary ---------------------------------------------------------------------------------

def test_vocabulary_and_clinical_names():
    t = skin.class_table()
    assert list(t.label) == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"] and t.label_idx.tolist() == list(range(7))
    assert t.clinical_name.str.len().min() > 5 and set(t.label[t.malignant]) == {"akiec", "bcc", "mel"}
    assert label_indices(["MEL", "vasc "]).tolist() == [4, 6]
    with pytest.raises(ConfigError, match=r"akiec.*'scc' ×2"): label_indices(["nv", "scc", "scc"], "x.csv")


# --- the five layouts ---------------------------------------------------------------------------

def test_shared_ham10000_table(ham):
    assert len(ham) == 10015 and ham.lesion_id.nunique() == 7470
    assert list(ham.columns[:5]) == ["image_id", "lesion_id", "label", "label_idx", "path"]
    assert (ham.label_idx == ham.label.map({c: i for i, c in enumerate(SKIN_CLASSES)})).all()
    assert ham.image_id.is_monotonic_increasing and all(Path(p).is_file() for p in ham.path.iloc[::1000])


def test_ham10000_fixture_and_detect(tmp_path, ham):
    root = small_ham(tmp_path, ham)
    t = read_skin_table(root)
    assert detect_format(root) == "ham10000" and set(t.label) == set(SKIN_CLASSES)
    assert t.lesion_id.duplicated().any()


def test_missing_image_named(tmp_path, ham):
    root = small_ham(tmp_path, ham)
    victim = next((root/skin.HAM10000_IMAGE_DIRS[0]).iterdir())
    victim.unlink()
    with pytest.raises(DataNotFoundError, match=victim.stem) as ei: read_ham10000(root)
    assert "1 of" in str(ei.value)


def test_label_outside_vocabulary(tmp_path, ham):
    root = small_ham(tmp_path, ham)
    m = pd.read_csv(root/skin.HAM10000_METADATA); m.loc[0, "dx"] = "melanoma_in_situ"; m.to_csv(root/skin.HAM10000_METADATA, index=False)
    with pytest.raises(ConfigError, match="HAM10000_metadata.csv: 1 label.*outside the vocabulary.*melanoma_in_situ"): read_ham10000(root)


def test_csv_from_another_dataset(tmp_path, ham):
    root = small_ham(tmp_path, ham)
    shutil.copy(shared("ph2")/"metadata.csv", root/skin.HAM10000_METADATA)   # PH2's metadata where HAM10000's belongs
    with pytest.raises(SkinDataError, match=r"lacks .*lesion_id.*look like the PH2 metadata"): read_ham10000(root)
    gt = pd.DataFrame({"image": ["ISIC_1"], **{c: [1.0 if c == "MEL" else 0.0] for c in ISIC2018_COLUMNS}})
    gt.to_csv(root/skin.HAM10000_METADATA, index=False)
    with pytest.raises(SkinDataError, match="ISIC 2018 Task 3 ground truth"): read_ham10000(root)
    isic19 = pd.DataFrame({c: [0.0] for c in ["image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]})
    (tmp_path/"gt").mkdir(); isic19.to_csv(tmp_path/"gt"/"ISIC_2019_Training_GroundTruth.csv", index=False)
    with pytest.raises(SkinDataError, match="ISIC 2019"): read_isic2018(tmp_path/"gt")


def make_isic2018(tmp_path, ham, groupings: bool = True) -> tuple[Path, pd.DataFrame]:
    sub = pd.concat([ham[ham.label == c].iloc[:2] for c in SKIN_CLASSES])
    root = tmp_path/"isic"; inp = root/"ISIC2018_Task3_Training_Input"; inp.mkdir(parents=True)
    for r in sub.itertuples(): shutil.copy(r.path, inp/f"{r.image_id}.jpg")
    gtd = root/"ISIC2018_Task3_Training_GroundTruth"; gtd.mkdir()
    gt = pd.DataFrame({"image": sub.image_id, **{c: (sub.label == c.lower()).astype(float) for c in ISIC2018_COLUMNS}})
    gt.to_csv(gtd/"ISIC2018_Task3_Training_GroundTruth.csv", index=False)
    if groupings:
        pd.DataFrame({"image": sub.image_id, "lesion_id": sub.lesion_id, "diagnosis_confirm_type": sub.dx_type}).to_csv(
            root/skin.ISIC2018_LESION_GROUPINGS, index=False)
    return root, sub


def test_isic2018_layout(tmp_path, ham):
    root, sub = make_isic2018(tmp_path, ham)
    t = read_skin_table(root)
    assert detect_format(root) == "isic2018"
    ref = sub.sort_values("image_id").reset_index(drop=True)
    assert t.image_id.tolist() == ref.image_id.tolist() and t.label.tolist() == ref.label.tolist()
    assert t.lesion_id.tolist() == ref.lesion_id.tolist()          # from the lesion groupings file
    val = root/"ISIC2018_Task3_Validation_GroundTruth"; val.mkdir()   # a second part, whose images the groupings do not name
    vsub = ham[~ham.image_id.isin(sub.image_id)].groupby("label").head(1)
    for r in vsub.itertuples(): shutil.copy(r.path, root/"ISIC2018_Task3_Training_Input"/f"{r.image_id}.jpg")
    pd.DataFrame({"image": vsub.image_id, **{c: (vsub.label == c.lower()).astype(float) for c in ISIC2018_COLUMNS}}).to_csv(
        val/"ISIC2018_Task3_Validation_GroundTruth.csv", index=False)
    v = read_isic2018(root, part="Validation")
    assert sorted(v.image_id) == sorted(vsub.image_id) and (v.lesion_id == v.image_id).all()   # one lesion per image
    assert read_isic2018(root, part="Training").lesion_id.tolist() == ref.lesion_id.tolist()
    with pytest.raises(SkinDataError, match="has no lesion_id for 7 image"):             # named explicitly: must cover the part
        read_isic2018(root, part="Validation", lesion_groupings=root/skin.ISIC2018_LESION_GROUPINGS)
    g = pd.read_csv(root/skin.ISIC2018_LESION_GROUPINGS); g.iloc[1:].to_csv(root/skin.ISIC2018_LESION_GROUPINGS, index=False)
    with pytest.raises(SkinDataError, match="has no lesion_id for 1 image"): read_isic2018(root, part="Training")
    shutil.rmtree(val)
    (root/skin.ISIC2018_LESION_GROUPINGS).unlink()
    assert (read_isic2018(root).lesion_id == ref.image_id).all()    # no groupings: each image its own lesion
    gtp = root/"ISIC2018_Task3_Training_GroundTruth"/"ISIC2018_Task3_Training_GroundTruth.csv"
    gt = pd.read_csv(gtp); gt.loc[3, "NV"] = 1.0; gt.to_csv(gtp, index=False)
    with pytest.raises(SkinDataError, match=f"not one-hot.*{gt.image[3] if gt.loc[3, ISIC2018_COLUMNS].sum() > 1 else ''}"):
        read_isic2018(root)


def test_imagefolder_layout(tmp_path, ham):
    root = tmp_path/"folder"
    for c in ("mel", "NV"):
        (root/c).mkdir(parents=True)
        for r in ham[ham.label == c.lower()].iloc[:3].itertuples(): shutil.copy(r.path, root/c/f"{r.image_id}.jpg")
    t = read_skin_table(root)
    assert detect_format(root) == "imagefolder" and t.label.value_counts().to_dict() == {"mel": 3, "nv": 3}
    (root/"melanoma").mkdir()
    with pytest.raises(ConfigError, match="melanoma"): read_imagefolder(root)


def test_ph2(tmp_path):
    t = read_ph2(shared("ph2"))
    assert len(t) == 200 and t.label.value_counts().to_dict() == {"nv": 160, "mel": 40}
    assert detect_format(shared("ph2")) == "ph2" and (t.lesion_id == t.image_id).all()


PH2_HEADER = ("|| Name || Histological Diagnosis || Clinical Diagnosis || Asymmetry | Pigment Network | Dots/Globules | "
              "Streaks | Regression Areas | Blue-Whitish Veil || Colors ||")


def official_ph2(dest: Path, cases: dict[str, str], header: str = PH2_HEADER, row: str = "|| {id} || {hist} || {code} || "
                 "0 | T | A | A | A | A || 4 5 ||", images: bool = True) -> Path:
    "The official PH2 archive's layout (PH2Dataset/: PH2_dataset.txt + per-case BMPs) for `cases` {IMDnnn: code}."
    top = dest/"PH2Dataset"; top.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in cases if images else ():
        d = top/skin.PH2_IMAGES/i/f"{i}_Dermoscopic_Image"; d.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(d/f"{i}.bmp")
        (top/skin.PH2_IMAGES/i/f"{i}_lesion").mkdir()
        Image.fromarray(np.zeros((30, 40), np.uint8)).save(top/skin.PH2_IMAGES/i/f"{i}_lesion"/f"{i}_lesion.bmp")
    rows = [row.format(id=i, code=c, hist="Melanoma" if c == "2" else "") for i, c in cases.items()]
    (top/skin.PH2_TABLE).write_text("\n".join([header, *rows, "", "Legend:", "Clinical Diagnosis:",
                                                "  0 - Common Nevus;", "  1 - Atypical Nevus;", "  2 - Melanoma."]) + "\n")
    return dest


def test_ph2_official_release(tmp_path):
    root = official_ph2(tmp_path/"ph2", {"IMD002": "1", "IMD003": "0", "IMD058": "2"})
    assert detect_format(root) == "ph2" and detect_format(root/"PH2Dataset") == "ph2"
    for r in (root, root/"PH2Dataset"):                   # the archive as unpacked, or its folder
        t = read_skin_table(r)
        assert t.image_id.tolist() == ["IMD002", "IMD003", "IMD058"]
        assert t.label.tolist() == ["nv", "nv", "mel"] and (t.lesion_id == t.image_id).all()
        assert t.ph2_class.tolist() == ["atypical_nevus", "common_nevus", "melanoma"]
        assert t.histological_diagnosis.tolist() == ["", "", "Melanoma"]
        assert all(Path(p).parent.name == f"{i}_Dermoscopic_Image" for i, p in zip(t.image_id, t.path))   # not the masks
    x, y = skin_tensors(t, None, 16, dataset="ph2")
    assert x.shape == (3, 3, 16, 16) and y.tolist() == [SKIN_CLASSES.index(c) for c in ("nv", "nv", "mel")]


def test_ph2_official_header_order_and_errors(tmp_path):
    # columns are found by the header's names, not by position
    hdr = "|| Clinical Diagnosis || Name || Histological Diagnosis || Colors ||"
    root = official_ph2(tmp_path/"a", {"IMD010": "2", "IMD011": "0"}, header=hdr, row="|| {code} || {id} || {hist} || 4 ||")
    assert read_ph2(root).label.tolist() == ["mel", "nv"]
    with pytest.raises(SkinDataError, match=r"line 3: the clinical diagnosis of IMD021 is '3'"):
        read_ph2(official_ph2(tmp_path/"b", {"IMD020": "0", "IMD021": "3"}))
    with pytest.raises(DataNotFoundError, match=r"2 of 2 image\(s\) named in .*PH2_dataset.txt have no file"):
        read_ph2(official_ph2(tmp_path/"c", {"IMD030": "0", "IMD031": "1"}, images=False))
    (tmp_path/"d").mkdir(); (tmp_path/"d"/skin.PH2_TABLE).write_text("Legend only\n|| Name || Clinical Diagnosis ||\n")
    with pytest.raises(SkinDataError, match="has no PH2 case rows"): read_ph2(tmp_path/"d")
    (tmp_path/"e").mkdir()
    with pytest.raises(DataNotFoundError, match=r"neither metadata.csv .* nor the official release's PH2_dataset.txt"):
        read_ph2(tmp_path/"e")
    two = tmp_path/"f"; official_ph2(two/"x", {"IMD040": "0"}); official_ph2(two/"y", {"IMD041": "0"})
    (two/"x"/"PH2Dataset").rename(two/"PH2Dataset"); (two/"y"/"PH2Dataset").rename(two/"PH2Dataset_copy")
    with pytest.raises(ConfigError, match="several PH2 releases"): read_ph2(two)


def make_npz(path, n=(5, 2, 3), hw=28, gray=False):
    rng = np.random.default_rng(0); arrays = {}
    for s, k in zip(skin.DERMAMNIST_SPLITS, n):
        arrays[f"{s}_images"] = rng.integers(0, 256, (k, hw, hw) if gray else (k, hw, hw, 3), dtype=np.uint8)
        arrays[f"{s}_labels"] = rng.integers(0, 7, (k, 1), dtype=np.uint8)
    np.savez(path, **arrays)
    return arrays


def test_dermamnist_npz(tmp_path):
    a = make_npz(tmp_path/"dermamnist.npz")
    x, y = load_dermamnist(tmp_path/"dermamnist.npz", "val")
    assert x.shape == (2, 3, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert torch.equal(x, torch.from_numpy(a["val_images"]).permute(0, 3, 1, 2)) and y.tolist() == a["val_labels"][:, 0].tolist()
    x64, _ = load_dermamnist(tmp_path/"dermamnist.npz", "test", size=64)
    assert x64.shape == (3, 3, 64, 64)
    assert detect_format(tmp_path/"dermamnist.npz") == "dermamnist"
    np.savez(tmp_path/"other.npz", x_train=np.zeros((2, 28, 28, 3), np.uint8))
    with pytest.raises(SkinDataError, match="not a MedMNIST .npz.*train_images"): load_dermamnist(tmp_path/"other.npz")
    make_npz(tmp_path/"gray.npz", gray=True)
    with pytest.warns(ImageModeWarning, match="grayscale"): xg, _ = load_dermamnist(tmp_path/"gray.npz")
    assert xg.shape == (5, 3, 28, 28)


# --- splits -------------------------------------------------------------------------------------

def test_lesion_split_has_no_shared_lesion(ham):
    s = lesion_split(ham, seed=0)
    owners = s.groupby("lesion_id").split.nunique()
    assert owners.max() == 1, "a lesion_id appears in two splits"
    sets = {k: set(s.lesion_id[s.split == k]) for k in skin.SPLIT_NAMES}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert split_leakage(s) == {**split_leakage(s), "val_images_leaked": 0, "test_images_leaked": 0}
    tab = pd.crosstab(s.label, s.split, normalize="index")       # stratified: every class near 70/15/15
    assert (abs(tab["train"] - 0.7) < 0.03).all() and (abs(tab["test"] - 0.15) < 0.03).all()
    assert s.split.equals(lesion_split(ham, seed=0).split) and not s.split.equals(lesion_split(ham, seed=1).split)
    with pytest.raises(ConfigError, match="fractions"): lesion_split(ham, (0.5, 0.5, 0.5))

def test_lesion_split_is_the_published_one(ham):
    "The seed-0 split of the 10,015 images is the one every reported result used (a refactor must not move a lesion)."
    s = lesion_split(ham, seed=0).sort_values("image_id")
    assert hashlib.sha256(",".join(s.split).encode()).hexdigest()[:16] == "d0700b840b37d144"

def test_lesion_folds(ham):
    val = lesion_split(ham, seed=0).query("split == 'val'")
    for k in (2, 3):
        f = lesion_folds(val, k, seed=0)
        assert f.dtype == np.int64 and f.shape == (len(val),) and set(f) == set(range(k))
        assert pd.Series(f).groupby(val.lesion_id.to_numpy()).nunique().max() == 1, "a lesion in two folds"
        assert (abs(np.bincount(f)/len(f) - 1/k) < 0.01).all()
        assert (lesion_folds(val, k, seed=0) == f).all() and not (lesion_folds(val, k, seed=1) == f).all()
    with pytest.raises(ConfigError, match="k=1"): lesion_folds(val, 1)
    with pytest.raises(ConfigError, match="k=True"): lesion_folds(val, True)
    with pytest.raises(ConfigError, match="lacks column"): lesion_folds(val.drop(columns="lesion_id"), 2)
    with pytest.raises(ConfigError, match="only 2 lesion"): lesion_folds(val[val.lesion_id.isin(val.lesion_id.unique()[:2])], 3)


def test_dermamnist_split_and_leakage(ham):
    info = shared("ham10000")/skin.DERMAMNIST_SPLIT_INFO
    d = dermamnist_split(ham, info)
    assert d.groupby("split").size().to_dict() == {"train": 7007, "val": 1003, "test": 2005}
    assert (d[d.split == "test"].dermamnist_index.to_numpy() == np.arange(2005)).all()   # npz order
    raw = pd.read_csv(info); m = d.merge(raw, on="image_id")
    assert (m.split_x == m.split_y).all()
    leak = split_leakage(d)
    assert leak["test_images_leaked"] == 693 and leak["test_lesions_leaked"] == 641


def test_skin_split_and_csv_roundtrip(tmp_path):
    out = tmp_path/"splits"/"lesion.csv"
    s = skin_split(seed=3, out=out)
    assert list(s.columns[:5]) == ["image_id", "lesion_id", "label", "label_idx", "path"] and "split" in s
    r = read_split_csv(out)
    assert r.image_id.tolist() == s.image_id.tolist() and r.split.tolist() == s.split.tolist()
    assert r.label_idx.dtype == np.int64 and not list(out.parent.glob(".*tmp"))
    d = skin_split(scheme="dermamnist")
    assert d.split.value_counts().to_dict() == {"train": 7007, "test": 2005, "val": 1003}
    with pytest.raises(ConfigError, match="scheme"): skin_split(scheme="random")


# --- decoded tensor cache -----------------------------------------------------------------------

def test_tensor_cache(tmp_path, ham, private_cache, monkeypatch):
    sub = lesion_split(ham.iloc[::500], seed=0)
    x, y = skin_tensors(sub, "train", size=28)
    tr = sub[sub.split == "train"]
    assert x.shape == (len(tr), 3, 28, 28) and x.dtype == torch.uint8 and y.tolist() == tr.label_idx.tolist()
    files = sorted((private_cache/"skin").iterdir())
    assert [f.suffix for f in files] == [".json", ".npy"]
    monkeypatch.setattr(skin, "read_image", lambda p: (_ for _ in ()).throw(AssertionError("decoded again")))
    x2, _ = skin_tensors(sub, "train", size=28)                        # served from the cache
    xt, _ = skin_tensors(sub, "test", size=28)                         # other split, same cache file
    assert torch.equal(x, x2) and len(list((private_cache/"skin").iterdir())) == 2
    ref = np.asarray(Image.open(tr.path.iloc[0]).convert("RGB").crop((25, 0, 175, 150)).resize((28, 28), Image.Resampling.BICUBIC))
    assert np.abs(x[0].permute(1, 2, 0).numpy().astype(int) - ref).max() <= 1   # centre square crop, then resize
    with pytest.raises(ConfigError, match="size"): skin_tensors(sub, "train", size=0)


def test_corrupt_jpeg_named_and_nothing_written(tmp_path, ham, private_cache):
    root = small_ham(tmp_path, ham, per_class=1, lesions_with_two=0)
    bad = next((root/skin.HAM10000_IMAGE_DIRS[1]).iterdir())
    bad.write_bytes(bad.read_bytes()[:300])                            # truncated JPEG
    t = read_ham10000(root)
    with pytest.raises(ImageReadError, match=bad.name): skin_tensors(t, None, 32)
    assert not (private_cache/"skin").exists() or not list((private_cache/"skin").iterdir())
    with pytest.warns(UserWarning, match=f"skipped 1 unreadable.*{bad.name}"): x, y = skin_tensors(t, None, 32, on_error="skip")
    assert len(x) == len(t) - 1 == len(y)
    with pytest.raises(ImageReadError, match=bad.name): skin_tensors(t, None, 32)   # raise mode still refuses it


def test_grayscale_and_rgba_converted_once(tmp_path, ham):
    root = small_ham(tmp_path, ham, per_class=1, lesions_with_two=0)
    files = sorted((root/skin.HAM10000_IMAGE_DIRS[0]).iterdir())
    Image.open(files[0]).convert("L").save(files[0], "JPEG")
    Image.open(files[1]).convert("RGBA").save(files[1].with_suffix(".png")); files[1].unlink()
    t = read_ham10000(root)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        x, _ = skin_tensors(t, None, 16)
        skin_tensors(t, None, 16)                                      # cached: no second message
    msgs = [str(m.message) for m in w if issubclass(m.category, ImageModeWarning)]
    assert len(msgs) == 1 and "2 non-RGB" in msgs[0] and "L: 1" in msgs[0] and "RGBA: 1" in msgs[0]
    assert x.shape[1] == 3


# --- downloads against a local server -----------------------------------------------------------

import hashlib, http.server, io, tarfile, threading, zipfile
from skindiff.data import ChecksumError
from skindiff.skin import RemoteFile, DownloadError, fetch_dataset, download_ham10000, download_dermamnist, DOWNLOAD_MANIFEST


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict = {}
    hits: list = []
    def do_GET(self):
        path = self.path.split("?")[0]
        self.hits.append(path)
        if path not in self.files: self.send_error(404); return
        body = self.files[path]
        cut = path.startswith("/cut/")
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body[:len(body)//2] if cut else body)
        if cut: self.wfile.flush(); self.close_connection = True
    def log_message(self, *a): pass


@pytest.fixture
def server():
    _Handler.files, _Handler.hits = {}, []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}", _Handler
    srv.shutdown(); srv.server_close()


def _tar(files: dict) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name); ti.size = len(data); tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _zip(files: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items(): z.writestr(name, data)
    return buf.getvalue()


def _no_staging(parent: Path, name: str):
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")], "staging files were left behind"


def _no_leftovers(parent: Path, name: str):
    assert not (parent/name).exists(), "a failed download left the dataset folder"
    _no_staging(parent, name)


def test_download_correct_archive(tmp_path, server, ham):
    url, h = server
    imgs = {f"mel/{r.image_id}.jpg": Path(r.path).read_bytes() for r in ham[ham.label == "mel"].iloc[:2].itertuples()}
    imgs.update({f"nv/{r.image_id}.jpg": Path(r.path).read_bytes() for r in ham[ham.label == "nv"].iloc[:2].itertuples()})
    body = _tar(imgs); h.files["/skin.tar.gz"] = body
    rf = RemoteFile(url + "/skin.tar.gz", "skin.tar.gz", size=len(body), sha256=hashlib.sha256(body).hexdigest(), extract=True)
    dest = fetch_dataset([rf], tmp_path/"data"/"skinfolder")
    t = read_imagefolder(dest/"skin")
    assert t.label.value_counts().to_dict() == {"mel": 2, "nv": 2} and (dest/DOWNLOAD_MANIFEST).is_file()
    fetch_dataset([rf], tmp_path/"data"/"skinfolder")
    assert h.hits == ["/skin.tar.gz"], "a complete download must not be fetched again"
    assert [p.name for p in (tmp_path/"data").iterdir()] == ["skinfolder"]


def test_download_never_replaces_a_users_folder(tmp_path, server):
    url, h = server
    body = _zip({"x.txt": b"new"}); h.files["/x.zip"] = body
    rf = RemoteFile(url + "/x.zip", "x.zip", size=len(body), sha256=hashlib.sha256(body).hexdigest(), extract=True)
    mine = tmp_path/"data"/"mine"; mine.mkdir(parents=True); (mine/"notes.txt").write_text("my own copy")
    with pytest.raises(ConfigError, match=r"mine already exists and is not a complete download.*nothing was changed"):
        fetch_dataset([rf], mine)
    assert h.hits == [] and [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine/"notes.txt").read_text() == "my own copy"
    _no_staging(tmp_path/"data", "mine")
    empty = tmp_path/"data"/"empty"; empty.mkdir()                   # an empty folder is no one's data: filled
    assert (fetch_dataset([rf], empty)/"x"/"x.txt").read_bytes() == b"new"


def test_download_wrong_checksum(tmp_path, server):
    url, h = server
    h.files["/a.zip"] = _zip({"a/x.txt": b"hello"})
    rf = RemoteFile(url + "/a.zip", "a.zip", md5="0"*32, extract=True)
    (tmp_path/"data").mkdir()
    with pytest.raises(ChecksumError, match="a.zip.*md5 is .*expected 0000"): fetch_dataset([rf], tmp_path/"data"/"a")
    _no_leftovers(tmp_path/"data", "a")


def test_download_interrupted(tmp_path, server):
    url, h = server
    good = _zip({"x.txt": b"x"*100_000})
    h.files["/ok.zip"] = good; h.files["/cut/b.zip"] = _zip({"y.txt": bytes(range(256))*1000})
    files = [RemoteFile(url + "/ok.zip", "ok.zip", extract=True), RemoteFile(url + "/cut/b.zip", "b.zip", extract=True)]
    (tmp_path/"data").mkdir()
    with pytest.raises(DownloadError, match=r"interrupted|failed after"): fetch_dataset(files, tmp_path/"data"/"b")
    _no_leftovers(tmp_path/"data", "b")   # the first, good archive was extracted in staging only


def test_unsafe_zip_refused(tmp_path, server):
    url, h = server
    h.files["/evil.zip"] = _zip({"../evil.txt": b"boom"})
    (tmp_path/"data").mkdir()
    with pytest.raises(SkindiffError, match=r"refusing.*'\.\.'"):
        fetch_dataset([RemoteFile(url + "/evil.zip", "evil.zip", extract=True)], tmp_path/"data"/"e")
    assert not (tmp_path/"evil.txt").exists() and not (tmp_path/"data"/"evil.txt").exists()
    _no_leftovers(tmp_path/"data", "e")


def test_unpinned_file_is_pinned(tmp_path, server, private_cache):
    url, h = server
    h.files["/gt.csv"] = b"image,MEL\n"
    rf = RemoteFile(url + "/gt.csv", "gt.csv")
    with pytest.warns(UserWarning, match="pinned"): fetch_dataset([rf], tmp_path/"one")
    h.files["/gt.csv"] = b"image,MEL,NV\n"                              # the server now serves a different file
    with pytest.raises(ChecksumError, match="pinned"): fetch_dataset([rf], tmp_path/"two")
    assert not (tmp_path/"two").exists()


def test_download_ham10000_from_dataverse(tmp_path, server, ham):
    "The whole path: Dataverse API (sizes, md5) → two image zips + metadata → the official layout → read_ham10000."
    url, h = server
    sub = pd.concat([ham[ham.label == c].iloc[:1] for c in SKIN_CLASSES])
    parts = [sub.iloc[:4], sub.iloc[4:]]
    bodies = {f"HAM10000_images_part_{i+1}.zip": _zip({f"{r.image_id}.jpg": Path(r.path).read_bytes() for r in p.itertuples()})
              for i, p in enumerate(parts)}
    meta_csv = sub[["lesion_id", "image_id", "label"]].rename(columns={"label": "dx"}).to_csv(index=False).encode()
    bodies["HAM10000_metadata.tab"] = meta_csv
    listing = []
    for i, (name, body) in enumerate(bodies.items()):
        h.files[f"/api/access/datafile/{i}"] = body
        df = {"id": i, "filename": name, "md5": hashlib.md5(body).hexdigest()}
        df.update({"originalFileSize": len(body)} if name.endswith(".tab") else {"filesize": len(body)})
        listing.append({"dataFile": df})
    h.files["/api/datasets/:persistentId/"] = json.dumps({"data": {"latestVersion": {"files": listing}}}).encode()
    dest = download_ham10000(tmp_path/"ham", server=url)
    t = read_ham10000(dest)
    assert sorted(t.image_id) == sorted(sub.image_id) and (t.label.to_numpy() == sub.sort_values("image_id").label.to_numpy()).all()
    assert (dest/"HAM10000_images_part_1").is_dir() and (dest/"HAM10000_metadata.csv").is_file()


def test_download_dermamnist(tmp_path, server):
    url, h = server
    make_npz(tmp_path/"src.npz"); body = (tmp_path/"src.npz").read_bytes()
    h.files["/dermamnist.npz"] = body
    p = download_dermamnist(tmp_path/"dm", RemoteFile(url + "/dermamnist.npz", "dermamnist.npz", md5=hashlib.md5(body).hexdigest()))
    x, y = load_dermamnist(p, "train")
    assert x.shape == (5, 3, 28, 28)


def test_shades_of_gray_properties_and_bad_input():
    from skindiff.skin import shades_of_gray, illuminant
    g = torch.Generator().manual_seed(0)
    x = torch.randint(20, 230, (5, 3, 16, 16), generator=g, dtype=torch.uint8)
    y = shades_of_gray(x)
    assert y.dtype == torch.uint8 and y.shape == x.shape
    assert torch.allclose(illuminant(y), torch.full((5, 3), 3**-0.5, dtype=torch.float64), atol=5e-3)   # corrected: grey
    assert torch.equal(shades_of_gray(y[:, :1].expand(5, 3, 16, 16).contiguous()), y[:, :1].expand(5, 3, 16, 16))  # grey: a no-op
    assert torch.equal(shades_of_gray(x, 6, batch_size=2), y)                                   # batching changes nothing
    black = torch.zeros(2, 3, 4, 4, dtype=torch.uint8); black[1, 0] = 90
    out = shades_of_gray(black)
    assert out[0].sum() == 0 and out[1, 1:].sum() == 0                                         # black stays black, no NaN
    for bad in (x.float(), x[:, :1], x[0], x.numpy()):
        with pytest.raises(ConfigError, match="uint8 tensor N×3×H×W"): shades_of_gray(bad)
    for p in (0, 0.5, float("inf"), True, "6"):
        with pytest.raises(ConfigError, match="Minkowski"): shades_of_gray(x, p)
