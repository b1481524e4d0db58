"""Write README.md from nbs/index.ipynb (nbdev's `nbdev-readme` needs quarto, which is not available everywhere).
Usage: python scripts/make_readme.py [--check]   (--check: exit 1 if README.md is out of date)"""
import re, sys
from pathlib import Path
import nbformat

ROOT = Path(__file__).resolve().parent.parent

def render(nb_path: Path) -> str:
    nb = nbformat.read(nb_path, as_version=4)
    parts = []
    for c in nb.cells:
        src = c.source.strip()
        if not src: continue
        if c.cell_type == "markdown": parts.append(src)
        elif c.cell_type == "code":
            lines = src.splitlines()
            if any(re.match(r"#\|\s*hide", l) for l in lines): continue
            code = "\n".join(l for l in lines if not l.startswith("#|")).strip()
            if code: parts.append(f"```python\n{code}\n```")
    header = "<!-- Generated from nbs/index.ipynb by scripts/make_readme.py: edit the notebook, not this file. -->\n\n"
    return header + "\n\n".join(parts) + "\n"

def main() -> int:
    text, readme = render(ROOT/"nbs"/"index.ipynb"), ROOT/"README.md"
    if "--check" in sys.argv:
        if not readme.exists() or readme.read_text() != text:
            print("README.md is out of date: run python scripts/make_readme.py", file=sys.stderr); return 1
        return 0
    readme.write_text(text); print("wrote", readme); return 0

if __name__ == "__main__": sys.exit(main())
