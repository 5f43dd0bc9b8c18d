"""Security review H2: alert ids (and finding ids) are keyed with the deployment's
PSEUDONYM_SECRET, never a plain hash of the patient id; free text stays out of
third-party payloads (M4).

On the old code ``alert_id`` was sha256(patient, rule, dedupe key, episode): the same for
every deployment, and an MRN came back by brute force from a webhook body."""
from __future__ import annotations

import hashlib

from alerts.engine import finding_id
from alerts.lifecycle import AlertBook, LifecycleConfig, apply_finding

from test_lifecycle import PID, ROUTE, T0, finding, only

SECRET_A = b"a" * 16 + b"-deployment-one-secret-0123"
SECRET_B = b"b" * 16 + b"-deployment-two-secret-4567"


def opened(secret: bytes):
    cfg = LifecycleConfig(routes={"liver": ROUTE}, pseudonym_secret=secret)
    return only(apply_finding(AlertBook(patient_id=PID), finding(at=T0, fid="f-1"), T0, cfg))


def test_alert_ids_differ_between_two_pseudonym_secrets_for_the_same_patient_and_rule():
    a, b = opened(SECRET_A), opened(SECRET_B)
    assert a.rule_id == b.rule_id and a.patient_id == b.patient_id == PID and a.episode == b.episode
    assert a.alert_id != b.alert_id
    assert a.pseudonym != b.pseudonym
    assert opened(SECRET_A).alert_id == a.alert_id  # deterministic under one key (replays stay idempotent)


def test_alert_id_is_not_the_unkeyed_hash_an_attacker_can_enumerate():
    a = opened(SECRET_A)
    for episode in (1, 2, 3):
        plain = "\x1f".join([PID, a.rule_id, a.dedupe_key or "", str(episode)])
        assert hashlib.sha256(plain.encode()).hexdigest()[:32] != a.alert_id
    assert len(a.alert_id) == 32 and PID not in a.alert_id


def test_finding_ids_are_keyed():
    args = (PID, "liver.alt_increased", "", "present", 3, 3, "obs-1")
    assert finding_id(*args, key=SECRET_A) != finding_id(*args, key=SECRET_B)
    raw = "\x1f".join(str(x) for x in args)
    assert finding_id(*args, key=SECRET_A) != hashlib.sha256(raw.encode()).hexdigest()[:32]


def test_public_dict_withholds_the_silence_reason():
    a = opened(SECRET_A).model_copy(update={"silence_reason": "Jane Doe (bed 4) mother refused repeat draw"})
    body = a.public_dict()
    assert "Jane" not in str(body) and body["silence_reason"] == "[reason withheld]"
    assert a.public_dict(include_patient_id=True)["silence_reason"].startswith("Jane")
