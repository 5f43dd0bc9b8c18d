"""``schemas.yaml_text.safe_load``: libyaml's parser where PyYAML has it, the same data as
PyYAML's pure-Python ``safe_load`` for every YAML file the project ships, and PyYAML's own
message (with the offending line) for text that does not parse."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from schemas import yaml_text

ROOT = Path(__file__).resolve().parents[2]


def _one_document(path: Path) -> bool:
    """Files the project reads with ``safe_load``: one YAML document (Kubernetes manifests are
    multi-document streams, read by kubectl and kubeconform, not by the service)."""
    return len(list(yaml.safe_load_all(path.read_text(encoding="utf-8")))) == 1


SHIPPED = sorted(p for d in ("alerts", "schemas", "deploy", "docs") for p in (ROOT / d).rglob("*.y*ml")
                 if p.suffix in (".yaml", ".yml") and _one_document(p))


def test_the_fast_parser_is_there():
    # the speed-up is real only with libyaml (PyYAML's wheels ship it)
    assert yaml_text._FAST is yaml.CSafeLoader


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_file_gives_the_same_data_as_pyyaml(path):
    text = path.read_text(encoding="utf-8")
    assert yaml_text.safe_load(text) == yaml.safe_load(text)


def test_text_that_does_not_parse_raises_pyyamls_message_with_the_line():
    with pytest.raises(yaml.YAMLError) as exc:
        yaml_text.safe_load("rules:\n  - id: a\n    when: [1, 2\n  - id: b\n")
    message = str(exc.value)
    assert "line 3" in message and "^" in message  # the pure-Python loader's snippet
