"""The layering the design promises, checked on the source (no broker needed).

- Pure core, thin edges: ``alerts`` and ``schemas`` import no Kafka client, no Faust and
  nothing of ``monitor`` (the edges that wire them into streams), not even indirectly.
- No module of ours reads or writes a private attribute of faust, mode (faust's service
  library), aiokafka or kafka-python (issue 13: the compensations for faust's Table wrote
  four private faust fields; the runner that replaced them uses public APIs only).
"""
from __future__ import annotations

import ast
import functools
import importlib.machinery
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUR_PACKAGES = ("monitor", "alerts", "schemas")
PURE_PACKAGES = ("alerts", "schemas")
#: the stream-processing libraries the pure core must not load, and whose private
#: attributes no module of ours may touch
STREAM_LIBRARIES = ("faust", "mode", "aiokafka", "kafka")
#: underscore names that are public API: namedtuple's methods (aiokafka's RecordMetadata
#: and TopicPartition are namedtuples; ``md._replace(offset=...)`` is documented use)
PUBLIC_UNDERSCORE = frozenset({"_replace", "_asdict", "_fields", "_make", "_field_defaults"})


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_names_defined(tree: ast.AST) -> set[str]:
    """Private names a module defines: functions, classes, arguments, variables, and
    attributes it assigns (``self._x = ...``)."""
    out: set[str] = set()
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(n.name)
        elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            out.add(n.id)
        elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store):
            out.add(n.attr)
        elif isinstance(n, ast.arg):
            out.add(n.arg)
        elif isinstance(n, ast.alias):
            out.add(n.asname or n.name.split(".")[0])
    return {x for x in out if _private(x)}


def private_uses(tree: ast.AST) -> list[tuple[int, str, str]]:
    """``(line, name, how)`` for each private attribute read or written: ``x._name`` and
    ``getattr``/``setattr``/``hasattr``/``delattr`` with a constant name."""
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Attribute) and _private(n.attr):
            out.append((n.lineno, n.attr, ast.unparse(n)))
        elif (isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
              and n.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(n.args) >= 2
              and isinstance(n.args[1], ast.Constant) and isinstance(n.args[1].value, str)
              and _private(n.args[1].value)):
            out.append((n.lineno, n.args[1].value, ast.unparse(n)))
    return out


def foreign_private_uses(ours: dict[str, ast.AST], library_private: frozenset[str]) -> list[str]:
    """The private attributes our modules use that are not their own.

    A private name no module of ours defines can only be another package's. A private name
    that a stream library also defines must be defined in the module that uses it (its own
    class's attribute), so ``self._client`` in a class of ours that sets it passes, and
    ``consumer._client`` in a module that never sets ``_client`` does not."""
    anywhere: set[str] = set()
    here: dict[str, set[str]] = {}
    for path, tree in ours.items():
        here[path] = private_names_defined(tree)
        anywhere |= here[path]
    bad = []
    for path, tree in ours.items():
        for line, name, how in private_uses(tree):
            if name in PUBLIC_UNDERSCORE:
                continue
            if name not in anywhere or (name in library_private and name not in here[path]):
                bad.append(f"{path}:{line}: {how}")
    return bad


def _parse_package(root: Path, rel_to: Path) -> dict[str, ast.AST]:
    out = {}
    for p in sorted(root.rglob("*.py")):
        try:
            out[str(p.relative_to(rel_to))] = ast.parse(p.read_text(encoding="utf-8", errors="replace"), str(p))
        except SyntaxError:  # a vendored file for another Python version: nothing of ours
            continue
    return out


@functools.lru_cache(maxsize=1)
def library_private_names() -> frozenset[str]:
    names: set[str] = set()
    for lib in STREAM_LIBRARIES:
        # the path finder, not ``importlib.util.find_spec``: faust replaces its module in
        # ``sys.modules`` with a lazy one that has no ``__spec__`` once it is imported
        spec = importlib.machinery.PathFinder.find_spec(lib)
        assert spec is not None and spec.submodule_search_locations, f"{lib} is a dependency of the worker"
        root = Path(list(spec.submodule_search_locations)[0])
        for tree in _parse_package(root, root).values():
            names |= private_names_defined(tree)
    return frozenset(names)


def our_modules() -> dict[str, ast.AST]:
    out = {}
    for pkg in OUR_PACKAGES:
        out.update(_parse_package(ROOT / pkg, ROOT))
    return out


def test_no_module_touches_a_private_attribute_of_faust_or_kafka_clients():
    library_private = library_private_names()
    assert {"_client", "_fetcher", "_coordinator"} <= library_private  # the scan sees aiokafka's
    assert foreign_private_uses(our_modules(), library_private) == []


def test_the_check_finds_a_private_attribute_of_the_consumer():
    """The check above can fail: a consumer's private client read in a module of ours."""
    library_private = library_private_names()
    ours = our_modules()
    ours["monitor/probe.py"] = ast.parse("def lag(consumer):\n    return consumer._client.cluster\n")
    ours["monitor/probe2.py"] = ast.parse("def f(app):\n    return getattr(app, '_monitor')\n")
    ours["monitor/probe3.py"] = ast.parse("def g(md):\n    return md._replace(offset=1)\n")
    assert [b for b in foreign_private_uses(ours, library_private) if "/probe" in b] == [
        "monitor/probe.py:2: consumer._client", "monitor/probe2.py:2: getattr(app, '_monitor')"]


def test_a_class_of_ours_may_use_its_own_private_attribute_of_a_library_name():
    library_private = library_private_names()
    own = ast.parse("class Runner:\n    def __init__(self):\n        self._client = None\n"
                    "    def close(self):\n        return self._client\n")
    assert "_client" in library_private
    assert foreign_private_uses({"monitor/runner_like.py": own}, library_private) == []


_IMPORT_ALL = """
import importlib, json, pkgutil, sys
walked = []
for pkg in {packages!r}:
    mod = importlib.import_module(pkg)
    for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
        importlib.import_module(info.name)
        walked.append(info.name)
print(json.dumps({{"walked": walked,
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in {forbidden!r})}}))
"""


def import_every_module(packages: tuple[str, ...], forbidden: tuple[str, ...]) -> tuple[set[str], list[str]]:
    """In a fresh interpreter, import every module of ``packages``: the modules the walk
    imported, and the ``forbidden`` modules the interpreter then holds."""
    code = _IMPORT_ALL.format(packages=packages, forbidden=forbidden)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return set(out["walked"]), out["loaded"]


def module_files(pkg: str) -> set[str]:
    return {str(p.relative_to(ROOT).with_suffix("")).replace("/", ".")
            for p in (ROOT / pkg).rglob("*.py") if p.name != "__init__.py"}


def test_the_pure_core_imports_no_kafka_faust_or_monitor():
    walked, loaded = import_every_module(PURE_PACKAGES, STREAM_LIBRARIES + ("monitor",))
    assert loaded == []
    # the walk imported every module file of the pure packages (none was skipped)
    files = set().union(*(module_files(pkg) for pkg in PURE_PACKAGES))
    assert files <= walked, sorted(files - walked)


def test_the_import_check_sees_what_a_package_loads():
    """The check above can fail: importing ``monitor`` loads faust and aiokafka."""
    _walked, loaded = import_every_module(("monitor",), ("faust", "aiokafka"))
    assert "faust" in loaded and "aiokafka" in loaded


def import_graph(modules: dict[str, ast.AST]) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports, at its top or inside a function (an import
    deferred into a function is still a dependency; deferring it only hides a cycle).
    ``modules``: dotted name -> parsed source."""
    graph: dict[str, set[str]] = {}
    for name, tree in modules.items():
        package = name if name in PACKAGE_NAMES else name.rpartition(".")[0]
        deps: set[str] = set()
        for n in ast.walk(tree):
            targets: list[str] = []
            if isinstance(n, ast.Import):
                targets = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom):
                base = n.module or ""
                if n.level:
                    parts = package.split(".")
                    parts = parts[:len(parts) - n.level + 1]
                    base = ".".join(parts + ([n.module] if n.module else []))
                targets = [base] + [f"{base}.{a.name}" for a in n.names]
            deps.update(t for t in targets if t in modules and t != name)
        graph[name] = deps
    return graph


#: packages (``__init__``) among our modules: a relative import inside one is relative to itself
PACKAGE_NAMES = {str(p.parent.relative_to(ROOT)).replace("/", ".")
                 for pkg in OUR_PACKAGES for p in (ROOT / pkg).rglob("__init__.py")}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected sets of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def our_modules_by_name() -> dict[str, ast.AST]:
    out = {}
    for path, tree in our_modules().items():
        name = path[:-3].replace("/", ".")
        out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = tree
    return out


def test_no_two_modules_of_ours_import_each_other():
    """The architecture review's import circles (``schemas.ingest`` with the FHIR and HL7
    adapters, ``alerts.protocol`` with ``alerts.rules``, ``monitor.cli`` with the modules it
    starts) were hidden by imports deferred into functions; none is left, deferred or not."""
    graph = import_graph(our_modules_by_name())
    assert {"schemas.canonical", "alerts.rules"} <= graph["schemas.ingest"] | graph["alerts.engine"]
    assert import_cycles(graph) == []


def test_the_cycle_check_sees_a_deferred_import():
    """The check above can fail: a function-level import back into a module's importer."""
    ours = our_modules_by_name()
    ours["schemas.canonical"] = ast.parse(ast.unparse(ours["schemas.canonical"])
                                          + "\ndef late():\n    from .ingest import decode\n    return decode\n")
    cycles = import_cycles(import_graph(ours))
    assert len(cycles) == 1 and {"schemas.canonical", "schemas.ingest"} <= set(cycles[0]), cycles
