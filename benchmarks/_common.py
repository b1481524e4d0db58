"""Shared pieces of the benchmark scripts: peak memory, and running one measurement in its own process."""
from __future__ import annotations
import json, resource, subprocess, sys


def peak_mib(cuda: bool) -> tuple[float, str]:
    "Peak memory of this process in MiB and what was measured: CUDA max_memory_allocated, else max RSS (Linux: KiB)."
    if cuda:
        import torch
        return torch.cuda.max_memory_allocated() / 2**20, "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process max RSS"


def run_worker(script: str, args: list[str], what: str) -> dict:
    """Run `python script *args` in a fresh process (so its peak memory is its own) and return the JSON object
    it prints on its last line; exit with `what` and the worker's stderr if it fails."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if out.returncode: sys.exit(f"{what} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
