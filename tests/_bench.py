"Load a script of benchmarks/ as a module, for the tests of chapter 16's experiments."
import importlib.util, sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]/"benchmarks"


def load_benchmark(name: str):
    "benchmarks/NAME.py as a module (its folder on sys.path while it loads, for `_common`)."
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH/f"{name}.py")
        mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod
