"""Every study chapter has a papermill `parameters` cell that defines every parameter a profile injects."""
import ast
import nbformat
import pytest
from skindiff import study

COMMON = {"profile", "out_dir", "data_root", "device", "seed"}

@pytest.mark.parametrize("chapter", [c.name for c in study.CHAPTERS])
def test_parameters_cell(chapter):
    nb = nbformat.read(study.notebooks_dir()/f"{chapter}.ipynb", as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{chapter}: expected one cell tagged 'parameters' (did nbdev-clean strip the tag?)"
    names = {t.id for node in ast.parse(cells[0].source).body if isinstance(node, ast.Assign) for t in node.targets}
    assert COMMON <= names, f"{chapter}: the parameters cell lacks {COMMON - names}"
    for profile, chapters in study.PROFILES.items():
        unknown = set(chapters.get(chapter, {})) - names
        assert not unknown, f"profile {profile} injects {unknown} into {chapter}, which its parameters cell does not define"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
