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

A build is also kept in a cache shared by every checkout on this machine, as the broker's
jars and the tools are (``${XDG_CACHE_HOME:-~/.cache}/sma-monitor/clinical-core``;
``CLINICAL_CORE_CACHE`` names another directory, an empty value turns it off). A cached
artefact is used only for the same source digest and the same recipe: Cython's version,
its directives, the compiler, its version and flags, and this Python's version and headers
(:func:`recipe_digest`): a build of the same source by the same tools. A fresh clone then
sets up without compiling the six modules again (about 40 s on 2 cores). (Two builds are not
byte-identical files: the object's build id covers the temporary paths of the build.)

Exits 1 (and says why) if a module could not be built; the service still runs, with the
plain Python module, and says so at start (``monitor_build_info{clinical_core=...}``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alerts.compiled_core import MODULES, SUFFIX, artefact_dir, artefact_path, source_path  # noqa: E402

#: Cython's directives: Python semantics throughout (no C types from annotations)
DIRECTIVES = "language_level=3,annotation_typing=False,binding=True"


#: builds of each module the cache keeps per recipe (the newest; each about 0.5 MB)
CACHED_BUILDS = 8

#: the C compiler's flags (besides the include directory, the input and the output)
CFLAGS = ("-shared", "-fPIC", "-O2", "-w")


def compiler() -> list[str]:
    """The C compiler's command: ``CC``, else the one this Python was built with (read from
    ``sysconfig``, whose variables :func:`main` fills before the build threads start)."""
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return shlex.split(cc)


def include_dir() -> Path:
    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").is_file():
        raise RuntimeError(f"no Python.h in {include}: install this Python's headers (Debian: python3-dev)")
    return include


@lru_cache(maxsize=1)
def recipe_digest() -> str:
    """What besides the source decides the artefact's code: Cython's version and
    directives, the compiler (its command, version and flags), this Python (version, ABI
    suffix, ``Python.h`` and ``patchlevel.h``)."""
    import Cython

    cc = subprocess.run([*compiler(), "--version"], capture_output=True, text=True)
    include = include_dir()
    recipe = [Cython.__version__, DIRECTIVES, compiler(), cc.stdout, list(CFLAGS), sys.version, SUFFIX,
              *(hashlib.sha256((include / h).read_bytes()).hexdigest() for h in ("Python.h", "patchlevel.h"))]
    return hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:20]


def cache_dir() -> Path | None:
    """This recipe's directory of the shared cache (None: turned off)."""
    configured = os.environ.get("CLINICAL_CORE_CACHE")
    if configured == "":
        return None
    base = (Path(configured) if configured
            else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sma-monitor" / "clinical-core")
    return base / recipe_digest()


def _place(src: Path, target: Path) -> None:
    """Copy ``src`` to ``target`` atomically (a worker starting now sees the whole file or none)."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def build(module: str, force: bool) -> tuple[str, str]:
    src = source_path(module)
    source = src.read_bytes()
    target = artefact_path(module, source)
    if target.is_file() and not force:
        return module, "kept"
    target.parent.mkdir(parents=True, exist_ok=True)
    include = include_dir()
    cache = cache_dir()
    cached = cache / target.name if cache is not None else None
    t0 = time.monotonic()
    if cached is not None and cached.is_file() and not force:
        _place(cached, target)
        how = f"from the cache {cache} in {time.monotonic() - t0:.1f} s"
    else:
        with tempfile.TemporaryDirectory(prefix="clinical-core-") as tmp:
            c_file = Path(tmp) / f"{module}.c"
            so = Path(tmp) / f"{module}{SUFFIX}"
            run([sys.executable, "-m", "cython", "-3", "-X", DIRECTIVES, "--module-name", module,
                 "-o", str(c_file), str(src)])
            run([*compiler(), *CFLAGS, "-I", str(include), str(c_file), "-o", str(so)])
            if src.read_bytes() != source:  # edited while it was built: that build is of neither version
                raise RuntimeError(f"{src} changed during the build; run it again")
            os.replace(so, target)  # atomic: a worker starting now sees the whole file or none
        how = f"built in {time.monotonic() - t0:.1f} s"
        if cached is not None:
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                _place(target, cached)
                builds = sorted(cached.parent.glob(f"{module}-*{SUFFIX}"), key=lambda f: f.stat().st_mtime)
                for old in builds[:-CACHED_BUILDS]:  # the cache stays bounded
                    old.unlink()
            except OSError as exc:  # the build stands; only the next checkout compiles again
                how += f" (not cached: {exc})"
    for old in target.parent.glob(f"{module}-*{SUFFIX}"):
        if old != target:
            old.unlink()
    return module, how


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
    # Python 3.11's sysconfig fills its variables on first use without a lock: a second
    # thread could find CC not there yet and get "cc" for "gcc", another recipe digest, and
    # compile instead of taking the cache (CI of stop 33). Filled here, in one thread.
    sysconfig.get_config_vars()
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
