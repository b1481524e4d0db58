"""Every study chapter has a papermill `parameters` cell that defines every parameter a profile injects."""
import ast
import nbformat
import pytest
from skindiff import study

COMMON = {"profile", "out_dir", "data_root", "device", "seed"}

def parameter_names(cell_source: str) -> set[str]:
    "The names a chapter's `parameters` cell assigns."
    return {t.id for node in ast.parse(cell_source).body if isinstance(node, ast.Assign) for t in node.targets}

@pytest.mark.parametrize("chapter", [c.name for c in study.CHAPTERS])
def test_parameters_cell(chapter):
    nb = nbformat.read(study.notebooks_dir()/f"{chapter}.ipynb", as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{chapter}: expected one cell tagged 'parameters' (did nbdev-clean strip the tag?)"
    names = parameter_names(cells[0].source)
    assert COMMON <= names, f"{chapter}: the parameters cell lacks {COMMON - names}"
    for profile, chapters in study.PROFILES.items():
        unknown = set(chapters.get(chapter, {})) - names
        assert not unknown, f"profile {profile} injects {unknown} into {chapter}, which its parameters cell does not define"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


def test_skin_classifier_cross_fit_and_upsampled_input(tmp_path):
    """Chapter 16 with `cross_fit=True` and `input_size` (off in the profiles' defaults, so nbdev-test does not run
    them): each member trains on train + the other validation fold and its checkpoint metadata names its fold; the
    32 px images reach the network at 40 px, and the saved model says so (source_size), so the CLI repeats it."""
    import json, papermill, torch
    from skindiff.data import DataNotFoundError, find_data_root
    try: find_data_root(need="ham10000")
    except DataNotFoundError: pytest.skip("shared data ham10000 not available")
    out = tmp_path/"run"
    papermill.execute_notebook(str(study.notebooks_dir()/"16_skin_classifier.ipynb"), str(tmp_path/"out.ipynb"), cwd=str(study.notebooks_dir()),
                               parameters=dict(out_dir=str(out), cross_fit=True, input_size=40), progress_bar=False)   # else the ci-sized defaults
    for i, name in enumerate(("lesion", "lesion_1")):
        sel = json.loads((out/"checkpoints"/"16_skin_classifier"/name/"selection.json").read_text())
        assert [h["step"] for h in sel["history"]] == [12, 24]
        ck = torch.load(sorted((out/"checkpoints"/"16_skin_classifier"/name).glob("ckpt_*.pt"))[-1], map_location="cpu", weights_only=True)
        assert ck["meta"]["cross_fit"] == f"fold {i} of 2"
    results = json.loads((out/"results"/"16_skin_classifier.json").read_text())
    assert next(r for r in results if r["name"] == "lesion_train_seconds")["cross_fit"] is True
    from skindiff.classifier import load_classifier, source_size
    _, meta = load_classifier(out/"models"/"skin_classifier.pt")
    assert meta["image_size"] == 40 and source_size(meta) == 32 == meta["source_size"]
