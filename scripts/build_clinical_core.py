#!/usr/bin/env python3
"""Build the clinical core's compiled modules (``alerts.compiled_core``): ``make core``.

    .venv/bin/python scripts/build_clinical_core.py [--jobs 2] [--force]

Each module of ``alerts.compiled_core.MODULES`` is compiled, unchanged, by Cython to C and
by the C compiler to an extension named after the SHA-256 of its source. Idempotent: a
module whose artefact exists for its current source is not built again; artefacts of
older sources of the module are removed. Cython runs with ``annotation_typing=False``, so
type hints never become C types: the compiled module keeps Python's semantics (an ``int``
passed where a hint says ``float`` stays an ``int``), which is what the byte-for-byte
comparison with the plain modules checks.

Exits 1 (and says why) if a module could not be built; the service still runs, with the
plain Python module, and says so at start (``monitor_build_info{clinical_core=...}``).
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alerts.compiled_core import MODULES, SUFFIX, artefact_dir, artefact_path, source_path  # noqa: E402

#: Cython's directives: Python semantics throughout (no C types from annotations)
DIRECTIVES = "language_level=3,annotation_typing=False,binding=True"


def compiler() -> list[str]:
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return shlex.split(cc)


def build(module: str, force: bool) -> tuple[str, str]:
    src = source_path(module)
    source = src.read_bytes()
    target = artefact_path(module, source)
    if target.is_file() and not force:
        return module, "kept"
    target.parent.mkdir(parents=True, exist_ok=True)
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").is_file():
        raise RuntimeError(f"no Python.h in {include}: install this Python's headers (Debian: python3-dev)")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="clinical-core-") as tmp:
        c_file = Path(tmp) / f"{module}.c"
        so = Path(tmp) / f"{module}{SUFFIX}"
        run([sys.executable, "-m", "cython", "-3", "-X", DIRECTIVES, "--module-name", module,
             "-o", str(c_file), str(src)])
        run([*compiler(), "-shared", "-fPIC", "-O2", "-w", "-I", include, str(c_file), "-o", str(so)])
        if src.read_bytes() != source:  # edited while it was built: that build is of neither version
            raise RuntimeError(f"{src} changed during the build; run it again")
        os.replace(so, target)  # atomic: a worker starting now sees the whole file or none
    for old in target.parent.glob(f"{module}-*{SUFFIX}"):
        if old != target:
            old.unlink()
    return module, f"built in {time.monotonic() - t0:.1f} s"


def run(cmd: list[str]) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({p.returncode}):\n{p.stderr[-4000:] or p.stdout[-4000:]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--force", action="store_true", help="build again even where the artefact exists")
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    failed = []
    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        futures = [pool.submit(build, m, a.force) for m in MODULES]
        for m, f in zip(MODULES, futures):
            try:
                print(f"clinical core: {m}: {f.result()[1]}")
            except Exception as exc:  # noqa: BLE001 (reported, then exit 1)
                failed.append(m)
                print(f"clinical core: {m}: NOT BUILT: {exc}", file=sys.stderr)
    print(f"clinical core: {len(MODULES) - len(failed)} of {len(MODULES)} modules compiled in {artefact_dir()} "
          f"({time.monotonic() - t0:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
