"""The compiled clinical core (``alerts.compiled_core``, built by ``make core``).

- the suite runs the compiled modules (what the worker runs), unless ``CLINICAL_CORE=python``;
- an artefact is used only for the exact source it was built from: a build of another
  source (an edited module) is ignored and the module runs as Python;
- a fresh checkout takes the build from the machine's shared cache when one of the same
  source and recipe is there, and a change of recipe (the compiler's flags) is another key;
- the build threads of one run all see one recipe (no thread finds another compiler);
- the compiled and the plain modules write the same bytes: every output and changelog value
  of ``bench/diff_clinical_outputs.py`` (a simulated cohort with ticks and actions, and the
  alert-churn workload) has the same sha256. A build with Cython's ``annotation_typing``
  on (hints as C types) fails this: 23,309,238 bytes against 23,287,747.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from alerts import compiled_core
from script_module import load_script

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLINICAL_CORE")}
    env.update(extra)
    return env


def _status_in_subprocess(env: dict[str, str]) -> dict[str, str]:
    code = ("import json, importlib; from alerts import compiled_core as c\n"
            "[importlib.import_module(m) for m in c.MODULES]\n"
            "print(json.dumps(c.status()))")
    p = subprocess.run([PY, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@pytest.mark.skipif(not compiled_core.enabled(), reason="CLINICAL_CORE=python: the plain modules on purpose")
def test_the_suite_runs_the_compiled_core():
    import importlib

    for m in compiled_core.MODULES:
        importlib.import_module(m)
    assert compiled_core.status() == dict.fromkeys(compiled_core.MODULES, "compiled"), (
        "the compiled core is not built for this source: run `make core`")
    assert compiled_core.summary() == "compiled"


def test_a_build_of_another_source_is_not_used(tmp_path):
    if compiled_core.unbuilt():
        pytest.fail("the compiled core is not built for this source: run `make core`")
    # the real build of alerts.rules, filed under the digest of an edited source; the
    # others under their own digest
    for m in compiled_core.MODULES:
        p = compiled_core.artefact_path(m)
        if m == "alerts.rules":
            edited = compiled_core.source_path(m).read_bytes() + b"\n# edited\n"
            name = f"{m}-{compiled_core.source_digest(edited)}{compiled_core.SUFFIX}"
        else:
            name = p.name
        shutil.copy(p, tmp_path / name)
    status = _status_in_subprocess(_env(CLINICAL_CORE_DIR=str(tmp_path)))
    assert status.pop("alerts.rules") == "python: no build of this source"
    assert set(status.values()) == {"compiled"}
    # and CLINICAL_CORE=python turns every compiled module off
    off = _status_in_subprocess(_env(CLINICAL_CORE="python"))
    assert set(off.values()) == {"python: CLINICAL_CORE=python"}


def _recipe(env: dict[str, str]) -> str:
    code = "import build_clinical_core as b; print(b.recipe_digest())"
    p = subprocess.run([PY, "-c", code], cwd=ROOT / "scripts", env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def test_a_fresh_checkout_takes_the_build_from_the_shared_cache(tmp_path):
    if compiled_core.unbuilt():
        pytest.fail("the compiled core is not built for this source: run `make core`")
    cache = tmp_path / "cache"
    recipe = cache / _recipe(_env())
    recipe.mkdir(parents=True)
    for m in compiled_core.MODULES:
        shutil.copy(compiled_core.artefact_path(m), recipe)
    checkout = tmp_path / "core"
    env = _env(CLINICAL_CORE_DIR=str(checkout), CLINICAL_CORE_CACHE=str(cache))
    p = subprocess.run([PY, str(ROOT / "scripts" / "build_clinical_core.py")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    taken = re.findall(r"^clinical core: ([\w.]+): from the cache", p.stdout, re.M)
    assert taken == list(compiled_core.MODULES), p.stdout
    for m in compiled_core.MODULES:
        name = compiled_core.artefact_path(m).name
        assert (checkout / name).read_bytes() == (recipe / name).read_bytes()
    assert set(_status_in_subprocess(env).values()) == {"compiled"}
    # another compiler command (flags included) is another recipe, so another cache directory
    script = load_script("scripts/build_clinical_core.py", "build_clinical_core")
    assert _recipe(_env(CC=shlex.join([*script.compiler(), "-g"]))) != recipe.name


def test_every_build_thread_of_one_run_has_the_same_recipe(tmp_path):
    """The build threads start with the recipe settled. Python 3.11's sysconfig fills its
    variables without a lock: two threads asking first could get two compilers ("gcc" and
    "cc"), so one module was filed under another recipe and compiled instead of taken from
    the cache (CI of 2026-11-30, stop 33). Each thread here asks for the recipe first."""
    code = ("import sys, threading\n"
            "sys.path.insert(0, 'scripts')\n"
            "import build_clinical_core as b\n"
            "seen = set()\n"
            "start = threading.Barrier(2)\n"
            "def build(module, force):\n"
            "    start.wait(timeout=30)\n"
            "    seen.add(b.recipe_digest())\n"
            "    return module, 'recipe asked'\n"
            "b.build = build\n"
            "assert b.main(['--jobs', '2']) == 0\n"
            "import json; print('recipes', json.dumps(sorted(seen)))\n")
    for _ in range(5):  # a fresh interpreter each time: the race is on the first call
        p = subprocess.run([PY, "-c", code], cwd=ROOT, env=_env(CLINICAL_CORE_CACHE=str(tmp_path)),
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        recipes = json.loads(re.search(r"^recipes (.*)$", p.stdout, re.M).group(1))
        assert len(recipes) == 1, p.stdout


def _harness(tmp_path: Path, name: str, **env: str) -> tuple[str, str]:
    out = tmp_path / f"{name}.bin"
    p = subprocess.run([PY, str(ROOT / "bench" / "diff_clinical_outputs.py"), "--out", str(out),
                        "--patients", "40", "--days", "14", "--churn-patients", "100", "--churn-rounds", "6"],
                       cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    core = re.search(r"^clinical core: (\w+)", p.stdout, re.M).group(1)
    digest = re.search(r"sha256 ([0-9a-f]{64})", p.stdout).group(1)
    return core, digest


def test_compiled_and_plain_modules_write_the_same_bytes(tmp_path):
    if compiled_core.unbuilt():
        pytest.fail("the compiled core is not built for this source: run `make core`")
    plain = _harness(tmp_path, "plain", CLINICAL_CORE="python")
    compiled = _harness(tmp_path, "compiled")
    assert (plain[0], compiled[0]) == ("python", "compiled")
    assert compiled[1] == plain[1]
