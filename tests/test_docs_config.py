"The docs site's configuration (quarto is not installed here, so `nbdev-docs` is not run): it parses, and what it names exists."
from pathlib import Path

import yaml

NBS = Path(__file__).resolve().parents[1]/"nbs"
GENERATED = {"sidebar.yml"}          # written by nbdev-docs from the notebooks


def test_quarto_config_parses_and_its_files_exist():
    cfg = yaml.safe_load((NBS/"_quarto.yml").read_text())
    assert cfg["project"]["type"] == "website"
    css = cfg["format"]["html"]["css"]
    for f in [css] if isinstance(css, str) else css:
        assert (NBS/f).is_file(), f"nbs/_quarto.yml names css {f!r}, which is missing from nbs/"
    for f in cfg["metadata-files"]:
        assert f in GENERATED or (NBS/f).is_file(), f"nbs/_quarto.yml names metadata file {f!r}, which is missing from nbs/"
    site = yaml.safe_load((NBS/"nbdev.yml").read_text())
    assert site["project"]["output-dir"] == "_docs" and site["website"]["title"] == "skindiff"
