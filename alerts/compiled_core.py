"""The clinical core's hot modules, compiled by Cython from their own source, used only when
built from exactly the source on disk.

The rules, the engine, the patient state, the lifecycle and the clinical processor and
store are plain Python. ``scripts/build_clinical_core.py`` (``make core``, part of ``make
setup``) compiles each of them, unchanged, into an extension module named after the
SHA-256 of its source: ``<dir>/alerts.rules-<digest>.<abi suffix>``. The finder installed
here loads that extension instead of the ``.py`` only when the digest of the ``.py`` on
disk names an artefact that exists; an edited source names another digest, so it runs as
Python until it is built again (no stale build can shadow a change). Anything missing (no
build, another Python ABI, no compiler where it was set up) means the plain Python module,
which is the reference the compiled one is tested against (``tests/unit/test_compiled_core.py``
compares their outputs byte for byte).

``CLINICAL_CORE=python`` turns the compiled modules off (e.g. to profile the core with
py-spy, which sees no Python frames inside an extension). ``CLINICAL_CORE_DIR`` names
another artefact directory (default ``.build/clinical-core`` at the repository root).

Pure import machinery: no Kafka, no Faust.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

#: the modules compiled, in the order they are built (the largest first)
MODULES = (
    "alerts.rules",
    "alerts.lifecycle",
    "alerts.engine",
    "monitor.clinical.processor",
    "alerts.state",
    "monitor.clinical.store",
)

ROOT = Path(__file__).resolve().parents[1]
#: the ABI suffix of this interpreter's extension modules (e.g. ``.cpython-311-x86_64-linux-gnu.so``)
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def enabled() -> bool:
    return os.environ.get("CLINICAL_CORE", "auto").strip().lower() != "python"


def artefact_dir() -> Path:
    return Path(os.environ.get("CLINICAL_CORE_DIR") or ROOT / ".build" / "clinical-core")


def source_path(module: str) -> Path:
    return ROOT.joinpath(*module.split(".")).with_suffix(".py")


def source_digest(source: bytes) -> str:
    return hashlib.sha256(source).hexdigest()[:20]


def artefact_path(module: str, source: bytes | None = None) -> Path:
    """Where the build of ``module`` from ``source`` (default: the source on disk) lives."""
    if source is None:
        source = source_path(module).read_bytes()
    return artefact_dir() / f"{module}-{source_digest(source)}{SUFFIX}"


def unbuilt() -> list[str]:
    """The modules with no build of their current source (``make core`` builds them)."""
    return [m for m in MODULES if not artefact_path(m).is_file()]


#: module -> why it runs as Python ("python: <why>"), for the modules the finder passed on
_loaded: dict[str, str] = {}


class CompiledCoreFinder:
    """A meta path finder for ``MODULES`` only: the extension built from the exact source on
    disk, else nothing (the regular finders then load the ``.py``)."""

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname not in MODULES:
            return None
        try:
            so = artefact_path(fullname)
        except OSError as exc:  # no source on disk (an installed wheel without sources)
            _loaded[fullname] = f"python: source not readable ({type(exc).__name__})"
            return None
        if not so.is_file():
            _loaded[fullname] = "python: no build of this source"
            return None
        loader = importlib.machinery.ExtensionFileLoader(fullname, str(so))
        return importlib.util.spec_from_file_location(fullname, str(so), loader=loader)


_FINDER = CompiledCoreFinder()


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once; not with ``CLINICAL_CORE=python``).
    Called by the packages holding the modules, before any of them is imported."""
    if not enabled():
        for m in MODULES:
            _loaded.setdefault(m, "python: CLINICAL_CORE=python")
        return
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def status() -> dict[str, str]:
    """How each module of the core runs in this process: "compiled", "python: <why>", or
    "not imported"."""
    out = {}
    for m in MODULES:
        mod = sys.modules.get(m)
        if mod is None:
            out[m] = "not imported"
        elif str(getattr(mod, "__file__", "")).endswith(SUFFIX):
            out[m] = "compiled"
        else:
            out[m] = _loaded.get(m, "python")
    return out


def summary() -> str:
    """``compiled``, ``python`` or ``partial`` over the imported modules of the core."""
    kinds = {("compiled" if s == "compiled" else "python") for s in status().values() if s != "not imported"}
    if kinds == {"compiled"}:
        return "compiled"
    if kinds == {"python"} or not kinds:
        return "python"
    return "partial"


__all__ = ["MODULES", "artefact_dir", "artefact_path", "enabled", "install", "source_digest", "source_path",
           "status", "summary", "unbuilt"]
