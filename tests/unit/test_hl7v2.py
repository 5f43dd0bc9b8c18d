"""HL7 v2 ORU^R01 -> canonical observations, and ACKs (schemas.hl7v2)."""
from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import hl7
import pytest

from schemas.errors import Reason, Rejected
from schemas.events import ResultStatus
from schemas.hl7v2 import build_ack, normalise, observations_from_hl7, parse_oru, parse_range
from schemas.ingest import DEFAULT_LIMITS, decode

DATA = Path(__file__).resolve().parents[1] / "data" / "hl7"
NOW = datetime(2024, 6, 1, 12, 0, tzinfo=timezone.utc)


def load(name: str) -> str:
    return (DATA / name).read_bytes().decode("utf-8")


def parse(text: str, **kw):
    return observations_from_hl7(text, received_at=NOW, **kw)


def rejected(text: str, **kw) -> Rejected:
    with pytest.raises(Rejected) as ei:
        parse(text, **kw)
    return ei.value


# ---------------------------------------------------------------- public samples


def test_python_hl7_sample_as_published_has_no_loinc():
    # OBX-3 "1554-5^GLUCOSE^POST 12H CFST:MCNC:PT:SER/PLAS:QN": the coding system is not LN, so
    # 1554-5 is a local code, and the sending facility ELAB-3 has no code map (issue 16)
    rej = rejected(load("python-hl7-sample-glucose.hl7"))
    assert rej.reason is Reason.UNKNOWN_LOCAL_CODE
    assert "'1554-5'" in rej.message and rej.location == "OBX^1^3"


def test_python_hl7_sample_adapted():
    text = load("python-hl7-sample-glucose.hl7")
    # adapted: LN coding system and code 2345-7 for OBX 1, offsets on the timestamps
    text = text.replace("OBX|1|SN|1554-5^GLUCOSE^POST 12H CFST:MCNC:PT:SER/PLAS:QN", "OBX|1|SN|2345-7^GLUCOSE^LN")
    assert rejected(text).reason is Reason.NAIVE_TIMESTAMP  # OBR-7 200202150730 has no offset
    text = text.replace("|200202150730|", "|200202150730-0500|")
    res = parse_oru(text, received_at=NOW)
    (o,) = res.observations
    assert o.observation_id == o.event_id == "1045813:2345-7"  # OBR-3 filler order number : LOINC
    assert o.patient_id == "555-44-4444"
    assert (o.analyte, o.value, o.original_unit, o.abnormal_flag) == ("glucose", 182.0, "mg/dl", "H")
    assert o.reference_range is None  # "70_105" is not a range we read
    assert o.effective_at == datetime(2002, 2, 15, 7, 30, tzinfo=timezone(timedelta(hours=-5)))
    assert o.source == "ELAB-3" and o.format == "hl7"
    # OBX 2 (value type FN, local code) is skipped, not fatal
    assert [s.reason for s in res.skipped] == [Reason.HL7_NOT_LOINC]


#: the NIST conformance message is a test message (MSH-11 "T"): read as on a test link
TEST_LINK = replace(DEFAULT_LIMITS, hl7_processing_id="T")


def test_nist_cbc_as_published_is_a_test_message():
    assert rejected(load("nist-lri-gu-002-cbc.hl7")).reason is Reason.HL7_PROCESSING_ID


def test_nist_cbc_as_published_has_an_unconvertible_unit():
    # NIST LRI GU-002 reports haemoglobin 12.5 "g/mL" (sic): we never guess units
    rej = rejected(load("nist-lri-gu-002-cbc.hl7"), limits=TEST_LINK)
    assert rej.reason is Reason.UNIT_NOT_CONVERTIBLE
    assert rej.location is not None and rej.location.startswith("OBX^") and rej.location.endswith("^6")


def nist_adapted() -> str:
    text = load("nist-lri-gu-002-cbc.hl7")
    text = text.replace("||12.5|g/mL^grams per milliliter^UCUM|", "||12.5|g/dL^grams per deciliter^UCUM|")
    text = text.replace(
        "||210000|{cells}/uL^cells per microliter^UCUM|150000 to 350000|",
        "||210|10*3/uL^thousand per microliter^UCUM|150 to 350|",
    )
    return text


def test_nist_cbc_adapted():
    text = nist_adapted()
    assert "\n" in text  # the file uses \n separators: normalised before parsing
    res = parse_oru(text, received_at=NOW, limits=TEST_LINK)
    by = {o.analyte: o for o in res.observations}
    assert set(by) == {"hemoglobin", "platelets"}
    hb, plt = by["hemoglobin"], by["platelets"]
    assert hb.observation_id == "R-991133:718-7" and plt.observation_id == "R-991133:26515-7"
    assert (hb.value, hb.unit, hb.abnormal_flag) == (125.0, "g/L", "L")
    assert (hb.reference_range.low, hb.reference_range.high) == (130.0, 180.0)  # "13 to 18" g/dL
    assert (plt.value, plt.unit, plt.reference_range.low, plt.reference_range.high) == (210.0, "10*9/L", 150, 350)
    assert hb.patient_id == "PATID1234"
    assert hb.effective_at == datetime(2011, 1, 3, 14, 34, 28, tzinfo=timezone(timedelta(hours=-8)))
    assert hb.status is ResultStatus.FINAL
    # 17 other numeric results have LOINC codes in no value set; 9 CWE/TX results
    assert len(res.skipped) == 26
    assert {s.reason for s in res.skipped} == {Reason.UNKNOWN_LOINC}


def test_synthetic_liver_panel_two_orders():
    obs = parse(load("liver-panel-synthetic.hl7"))
    assert [o.observation_id for o in obs] == [
        "FL-501:1742-6", "FL-501:1920-8", "FL-501:1975-2", "FL-501:1751-7", "FL-502:777-3"]
    by = {o.analyte: o for o in obs}
    assert by["alt"].reference_range.model_dump() == {"low": 10.0, "high": 40.0}
    assert by["ast"].reference_range.model_dump() == {"low": 10.0, "high": 40.0}  # "10 - 40"
    assert by["bilirubin_total"].reference_range.model_dump() == {"low": None, "high": 1.2}  # "<1.2"
    assert by["bilirubin_total"].value == 1.1  # SN ^1.1, time from OBR-7
    assert by["albumin"].loinc == "1751-7"  # alternate code in OBX-3 components 4-6
    assert by["platelets"].abnormal_flag == "L"


def test_correction_and_deletion_name_the_same_observation():
    first = {o.observation_id: o for o in parse(load("liver-panel-synthetic.hl7"))}
    again = {o.observation_id: o for o in parse(load("liver-panel-synthetic-correction.hl7"))}
    alt, ast = again["FL-501:1742-6"], again["FL-501:1920-8"]
    assert alt.status is ResultStatus.CORRECTED and alt.value == 221.0
    assert ast.status is ResultStatus.ENTERED_IN_ERROR and ast.value is None
    assert alt.replaces in first and ast.replaces in first
    assert alt.corrects is None


# ---------------------------------------------------------------- building blocks

MSG = (
    "MSH|^~\\&|LIS|LAB|MON|GTX|20240502091500+0200||ORU^R01|C1|P|2.5.1\r"
    "PID|1||MRN-1^^^H^MR~ALT-ID^^^X||DOE^JANE\r"
    "OBR|1|P1|F1|24325-3^Hepatic^LN|||20240502080000+0200\r"
    "OBX|1|{vtype}|1742-6^ALT^LN||{value}|U/L|{range}|{flag}|||{status}|||{time}\r"
)


def msg(vtype="NM", value="55", range_="10-40", flag="H", status="F", time="20240502080000+0200"):
    return MSG.format(vtype=vtype, value=value, range=range_, flag=flag, status=status, time=time)


@pytest.mark.parametrize("code, canonical", [
    ("F", ResultStatus.FINAL), ("C", ResultStatus.CORRECTED), ("P", ResultStatus.PRELIMINARY),
    ("R", ResultStatus.PRELIMINARY), ("S", ResultStatus.PRELIMINARY), ("A", ResultStatus.AMENDED),
    ("U", ResultStatus.FINAL), ("X", ResultStatus.CANCELLED), ("D", ResultStatus.ENTERED_IN_ERROR),
    ("W", ResultStatus.ENTERED_IN_ERROR),
])
def test_status_mapping(code, canonical):
    (o,) = parse(msg(status=code))
    assert o.status is canonical and o.observation_id == "F1:1742-6"


@pytest.mark.parametrize("code", ["I", "N", "O"])
def test_no_result_statuses_are_skipped(code):
    assert rejected(msg(status=code)).reason is Reason.HL7_BAD_VALUE  # nothing else in the message


@pytest.mark.parametrize("code", ["", "Z"])
def test_bad_status(code):
    assert rejected(msg(status=code)).reason is Reason.HL7_BAD_VALUE


@pytest.mark.parametrize("vtype, value, expected", [
    ("NM", "55", 55.0), ("NM", " 55.5 ", 55.5), ("NM", "+1", 1.0), ("NM", "-0", 0.0), ("SN", "^182", 182.0), ("SN", "=^7", 7.0),
])
def test_values(vtype, value, expected):
    assert parse(msg(vtype=vtype, value=value))[0].value == expected


@pytest.mark.parametrize("vtype, value, expected, comparator", [
    ("SN", "<^5", 5.0, "<"), ("SN", ">^100", 100.0, ">"), ("SN", "<=^5", 5.0, "<="), ("SN", ">=^2.5", 2.5, ">="),
    ("NM", "<5", 5.0, "<"), ("NM", "> 1000", 1000.0, ">"), ("NM", ">3000", 3000.0, ">"), ("SN", "^7", 7.0, None),
])
def test_censored_values_keep_their_bound_and_comparator(vtype, value, expected, comparator):
    (o,) = parse(msg(vtype=vtype, value=value))
    assert (o.value, o.comparator) == (expected, comparator)


@pytest.mark.parametrize("vtype, value, reason", [
    ("NM", "high", Reason.HL7_BAD_VALUE), ("NM", "<", Reason.HL7_BAD_VALUE), ("SN", ">^", Reason.HL7_BAD_VALUE),
    ("NM", "1e999", Reason.HL7_BAD_VALUE), ("SN", "^1^-^5", Reason.HL7_BAD_VALUE),
    ("SN", "^1^:^128", Reason.HL7_BAD_VALUE), ("SN", "<>^5", Reason.HL7_BAD_VALUE),
    ("NM", "1~2", Reason.HL7_BAD_VALUE), ("ST", "55", Reason.HL7_BAD_VALUE),
    ("NM", "", Reason.MISSING_VALUE),
])
def test_bad_values(vtype, value, reason):
    assert rejected(msg(vtype=vtype, value=value)).reason is reason


@pytest.mark.parametrize("raw, low, high", [
    ("10-40", 10, 40), ("3.5 - 5.0", 3.5, 5.0), ("4.3 to 6.2", 4.3, 6.2), ("<5", None, 5), (">10", 10, None),
    ("<=5", None, 5), (">= 10", 10, None), ("-2-3", -2, 3),
])
def test_ranges(raw, low, high):
    rr = parse_range(raw)
    assert (rr.low, rr.high) == (low, high)


@pytest.mark.parametrize("raw", ["", "normal", "70_105", "Recommended: <200; High Risk: >240", "40-10"])
def test_unreadable_ranges_are_dropped(raw):
    assert parse_range(raw) is None
    assert parse(msg(range_=raw))[0].reference_range is None


@pytest.mark.parametrize("ts, expected", [
    ("202405020800+0200", datetime(2024, 5, 2, 8, 0, tzinfo=timezone(timedelta(hours=2)))),
    ("20240502080012-0330", datetime(2024, 5, 2, 8, 0, 12, tzinfo=timezone(-timedelta(hours=3, minutes=30)))),
    ("20240502080012.25+0000", datetime(2024, 5, 2, 8, 0, 12, 250000, tzinfo=timezone.utc)),
    ("2024050208+0000", datetime(2024, 5, 2, 8, tzinfo=timezone.utc)),
])
def test_timestamps(ts, expected):
    assert parse(msg(time=ts))[0].effective_at == expected


@pytest.mark.parametrize("ts, reason", [
    ("202405020800", Reason.NAIVE_TIMESTAMP), ("20240502", Reason.NAIVE_TIMESTAMP),
    ("2024-05-02T08:00", Reason.HL7_BAD_VALUE), ("20241302080000+0000", Reason.HL7_BAD_VALUE),
    ("20240502080000+2500", Reason.HL7_BAD_VALUE), ("20990101000000+0000", Reason.FUTURE_TIMESTAMP),
])
def test_bad_timestamps(ts, reason):
    assert rejected(msg(time=ts)).reason is reason


def test_default_tz_reads_naive_local_time():
    (o,) = parse(msg(time="202405020800"), default_tz=ZoneInfo("Europe/Berlin"))
    assert o.effective_at.utcoffset() == timedelta(hours=2)
    assert o.effective_at.astimezone(timezone.utc) == datetime(2024, 5, 2, 6, tzinfo=timezone.utc)


def test_decode_takes_the_default_zone_the_mllp_listener_was_given():
    """``decode`` (the listener's one path for every message) reads a naive HL7 time in the
    zone given, and without one refuses it as the topics' ingest does."""
    raw = msg(time="202405020800").encode()
    now = datetime(2024, 5, 3, tzinfo=timezone.utc)
    (o,) = decode("lab-results", raw, received_at=now, default_tz=ZoneInfo("Europe/Berlin"))
    assert o.effective_at.astimezone(timezone.utc) == datetime(2024, 5, 2, 6, tzinfo=timezone.utc)
    with pytest.raises(Rejected) as naive:
        decode("lab-results", raw, received_at=now)
    assert naive.value.reason is rejected(msg(time="202405020800")).reason


def test_obr7_fallback_and_no_time():
    assert parse(msg(time=""))[0].effective_at == datetime(2024, 5, 2, 8, tzinfo=timezone(timedelta(hours=2)))
    no_time = msg(time="").replace("|||20240502080000+0200\r", "\r", 1)
    assert rejected(no_time).reason is Reason.HL7_BAD_VALUE


def test_patient_id_is_first_repetition():
    assert parse(msg())[0].patient_id == "MRN-1"


@pytest.mark.parametrize("sep", ["\r", "\n", "\r\n"])
def test_separators_and_mllp_framing(sep):
    body = msg().replace("\r", sep)
    assert parse(body)[0].value == 55.0
    assert parse("\x0b" + body + "\x1c\r")[0].value == 55.0


def test_normalise():
    assert normalise("\x0bMSH|x\nPID|y\r\n\r\nOBX|z\x1c\r") == "MSH|x\rPID|y\rOBX|z\r"


@pytest.mark.parametrize("mutate, reason", [
    (lambda m: m.replace("ORU^R01", "ADT^A01"), Reason.HL7_UNSUPPORTED_MESSAGE),
    (lambda m: m.replace("ORU^R01", "ORU^R30"), Reason.HL7_UNSUPPORTED_MESSAGE),
    (lambda m: m.replace("PID|1||MRN-1^^^H^MR~ALT-ID^^^X", "PID|1||"), Reason.HL7_NO_PATIENT),
    (lambda m: m.replace("PID|1||MRN-1^^^H^MR~ALT-ID^^^X||DOE^JANE\r", ""), Reason.HL7_NO_PATIENT),
    (lambda m: m.replace("OBR|1|P1|F1|24325-3^Hepatic^LN|||20240502080000+0200\r", ""), Reason.HL7_INVALID),
    (lambda m: m.split("OBX")[0], Reason.HL7_INVALID),
    (lambda m: m.replace("1742-6^ALT^LN", "ALT^ALT^L"), Reason.UNKNOWN_LOCAL_CODE),
    (lambda m: m.replace("1742-6^ALT^LN", "^ALT"), Reason.HL7_NOT_LOINC),
    (lambda m: m.replace("1742-6^ALT^LN", "99999-9^X^LN"), Reason.UNKNOWN_LOINC),
    (lambda m: m.replace("U/L", "mg/dL"), Reason.UNIT_NOT_CONVERTIBLE),
    (lambda m: m + m.split("\r", 1)[1].split("OBX")[0].replace("PID", "XXX") + m[m.index("OBX"):],
     Reason.HL7_INVALID),  # same LOINC twice for one order
    (lambda m: m + m, Reason.HL7_INVALID),  # two messages in one frame
    (lambda m: "PID|1\r" + m, Reason.HL7_INVALID),
    (lambda m: "", Reason.HL7_INVALID),
    (lambda m: "MSH", Reason.HL7_INVALID),
])
def test_broken_variants(mutate, reason):
    assert rejected(mutate(msg())).reason is reason


def test_multiple_patients_in_one_message():
    second = ("PID|2||MRN-2\rOBR|1|P9|F9|x^y^LN|||20240502080000+0200\r"
              "OBX|1|NM|1920-8^AST^LN||30|U/L|||||F\r")
    obs = parse(msg() + second)
    assert [(o.patient_id, o.observation_id) for o in obs] == [("MRN-1", "F1:1742-6"), ("MRN-2", "F9:1920-8")]


def test_filler_missing_falls_back_to_placer_then_control_id():
    assert parse(msg().replace("|P1|F1|", "|P1||"))[0].observation_id == "P1:1742-6"
    assert parse(msg().replace("|P1|F1|", "|||"))[0].observation_id == "C1:1:1742-6"


def test_never_raises_anything_but_rejected():
    for junk in ["MSH|^~\\&", "MSH|" + "^" * 5000, "MSH|^~\\&|\x00\x01|||||ORU^R01|1\rPID|||x\rOBX|1", msg()[:60]]:
        with pytest.raises(Rejected):
            parse(junk)


def test_decode_routes_hl7_bytes():
    for raw in (msg().encode(), b"\x0b" + msg().encode() + b"\x1c\r", msg().encode("latin-1")):
        (o,) = decode("lab-results", raw, received_at=NOW)
        assert o.format == "hl7"
    with pytest.raises(Rejected) as ei:
        decode("treatments", msg().encode(), received_at=NOW)
    assert ei.value.reason is Reason.UNKNOWN_FORMAT


# ---------------------------------------------------------------- ACKs


def test_ack_aa():
    ack = hl7.parse(build_ack(msg(), "AA").decode())
    assert str(ack.segment("MSH")(9)) == "ACK^R01^ACK"
    assert str(ack.segment("MSA")(1)) == "AA" and str(ack.segment("MSA")(2)) == "C1"
    with pytest.raises(KeyError):
        ack.segment("ERR")


def test_ack_ae_escapes_and_truncates_text():
    text = "hl7_bad_value: OBX-1 value 'x|y^z' is not a number " + "z" * 200
    raw = build_ack(msg(), "AE", text, reason=Reason.HL7_BAD_VALUE).decode()
    ack = hl7.parse(raw)
    assert str(ack.segment("MSA")(1)) == "AE" and str(ack.segment("MSA")(2)) == "C1"
    assert len(ack.segment("MSA")) == 4  # the delimiters in the text are escaped
    assert "\\F\\" in raw and "\\S\\" in raw
    err = ack.segment("ERR")
    assert str(err(3)(1)(1)) == "102" and str(err(4)) == "E"


def test_ack_for_unreadable_message_is_minimal():
    raw = build_ack(b"\xff\xfegarbage", "AR", "not stored").decode()
    ack = hl7.parse(raw)
    assert str(ack.segment("MSA")(1)) == "AR" and str(ack.segment("MSA")(2)) == ""
    with pytest.raises(ValueError):
        build_ack(msg(), "XX")


# ---------------------------------------------------------------- conventions (issue 16)


def test_ack_msh7_is_utc_with_an_offset():
    ts = str(hl7.parse(build_ack(msg(), "AA").decode()).segment("MSH")(7))
    assert len(ts) == 19 and ts.endswith("+0000")
    sent = datetime.strptime(ts, "%Y%m%d%H%M%S%z")
    assert abs((sent - datetime.now(timezone.utc)).total_seconds()) < 60


def test_err_v25_layout_names_the_failing_field():
    text = msg().replace("|U/L|", "|furlongs|")
    rej = rejected(text)
    assert rej.reason is Reason.UNIT_NOT_CONVERTIBLE and rej.location == "OBX^1^6"
    err = hl7.parse(build_ack(text, "AE", rej.message, reason=rej.reason, location=rej.location).decode()).segment("ERR")
    assert str(err(1)) == ""                                   # ERR-1 is withdrawn from v2.5 on
    assert str(err(2)) == "OBX^1^6"                            # ERR-2 error location
    assert str(err(3)(1)(1)) == "103" and str(err(3)(1)(3)) == "HL70357"  # ERR-3 table 0357
    assert str(err(4)) == "E"                                  # ERR-4 severity


@pytest.mark.parametrize("version", ["2.3", "2.3.1", "2.2", "2.4"])
def test_err_for_an_old_version_sender_is_err1(version):
    text = msg().replace("|P|2.5.1", f"|P|{version}").replace("|U/L|", "|furlongs|")
    rej = rejected(text)
    raw = build_ack(text, "AE", rej.message, reason=rej.reason, location=rej.location).decode()
    err = hl7.parse(raw).segment("ERR")
    assert len(err) == 2  # ERR-1 only: ERR-2.. do not exist before v2.5
    assert str(err(1)) == "OBX^1^6^103&Table value not found&HL70357"
    assert str(hl7.parse(raw).segment("MSH")(12)) == version


def test_test_message_is_refused_with_the_processing_id_reason():
    text = msg().replace("|P|2.5.1", "|T|2.5.1")
    rej = rejected(text)
    assert rej.reason is Reason.HL7_PROCESSING_ID and rej.location == "MSH^1^11"
    err = hl7.parse(build_ack(text, "AR", rej.message, reason=rej.reason, location=rej.location).decode()).segment("ERR")
    assert str(err(3)(1)(1)) == "202" and str(err(2)) == "MSH^1^11"
    # a test link (HL7_PROCESSING_ID=T) takes it, and refuses production traffic
    assert parse(text, limits=replace(DEFAULT_LIMITS, hl7_processing_id="T"))
    assert rejected(msg(), limits=replace(DEFAULT_LIMITS, hl7_processing_id="T")).reason is Reason.HL7_PROCESSING_ID


@pytest.mark.parametrize("mtype,kind", [
    ("ORU^R01", "oru"), ("ORU^R01^ORU_R01", "oru"), ("ADT^A01", "adt"), ("ADT^A04^ADT_A01", "adt"),
    ("ADT^A08", "adt"), ("ADT^A31", "adt"), ("ADT^A03", "unsupported"), ("ORM^O01", "unsupported"),
    ("ORU^R30", "unsupported"), ("", "unsupported"),
])
def test_message_kind_is_the_one_dispatch_decision(mtype, kind):
    from schemas.hl7v2 import message_kind, read_msh

    assert message_kind(read_msh(msg().replace("ORU^R01", mtype, 1))) == kind


def test_unsupported_type_gets_err_200_at_msh9():
    text = msg().replace("ORU^R01", "ORM^O01", 1)
    rej = rejected(text)
    assert rej.reason is Reason.HL7_UNSUPPORTED_MESSAGE and rej.location == "MSH^1^9"
    err = hl7.parse(build_ack(text, "AR", rej.message, reason=rej.reason, location=rej.location).decode()).segment("ERR")
    assert str(err(3)(1)(1)) == "200"


def test_local_code_oru_maps_through_the_source_map(tmp_path):
    from schemas.codemaps import check_code_map, load_code_map, load_code_maps

    (tmp_path / "lab.yaml").write_text(
        "source: LAB\ncodes:\n  ALT: 1742-6\n  TBIL: {loinc: 1975-2, unit: umol/l}\n  PLT: 777-3\n"
        "units:\n  U/l: U/L\n  umol/l: umol/L\n  G/l: 10*9/L\n", encoding="utf-8")
    maps = load_code_maps(str(tmp_path))
    assert check_code_map(load_code_map(tmp_path / "lab.yaml")) == []
    text = (
        "MSH|^~\\&|LIS|LAB|MON|GTX|20240502091500+0200||ORU^R01|C1|P|2.5.1\r"
        "PID|1||MRN-1\r"
        "OBR|1|P1|F1|HEP^Hepatic^L|||20240502080000+0200\r"
        "OBX|1|NM|ALT^ALT (GPT)^L||80|U/l|10-40|H|||F\r"
        "OBX|2|NM|TBIL^Bilirubin^L||34.2||<21||||F\r"
        "OBX|3|NM|PLT^Platelets^L||150|G/l|||||F\r"
        "OBX|4|TX|COMMENT^Comment^L||haemolysed||||||F\r"
    )
    limits = replace(DEFAULT_LIMITS, code_maps=maps)
    by = {o.analyte: o for o in parse(text, limits=limits)}
    assert set(by) == {"alt", "bilirubin_total", "platelets"}
    assert by["alt"].loinc == "1742-6" and by["alt"].value == 80.0 and by["alt"].unit == "U/L"
    assert by["alt"].observation_id == "F1:1742-6"
    assert by["bilirubin_total"].loinc == "1975-2" and by["bilirubin_total"].value == pytest.approx(2.0, rel=1e-3)
    assert by["platelets"].value == 150.0
    # another facility's message with the same local code is not mapped
    rej = rejected(text.replace("|LIS|LAB|", "|LIS|OTHER LAB|"), limits=limits)
    assert rej.reason is Reason.UNKNOWN_LOCAL_CODE and "'ALT'" in rej.message
    # a local code the map does not know names the code
    rej = rejected(text.replace("ALT^ALT (GPT)^L", "GGT^GGT^L"), limits=limits)
    assert rej.reason is Reason.UNKNOWN_LOCAL_CODE and "'GGT'" in rej.message and rej.location == "OBX^1^3"


def test_maps_check_reports_unknown_loinc_and_unconvertible_units(tmp_path):
    from schemas.codemaps import CodeMapError, check_code_map, load_code_map

    f = tmp_path / "bad.yaml"
    f.write_text("source: X\ncodes:\n  A: 9999-9\n  B: {loinc: 1742-6, unit: mg}\n  C: 777-3\n"
                 "units:\n  parsec: pc\n", encoding="utf-8")
    problems = check_code_map(load_code_map(f))
    assert any("9999-9" in p for p in problems)
    assert any("'B'" in p and "mg" in p for p in problems)
    assert any("parsec" in p for p in problems)
    f.write_text("source: X\ncodes:\n  A: not-a-loinc\n", encoding="utf-8")
    with pytest.raises(CodeMapError, match="not a LOINC"):
        load_code_map(f)


def test_test_message_on_an_input_topic_is_dead_lettered_with_a_reason():
    with pytest.raises(Rejected) as ei:
        decode("lab-results", msg().replace("|P|2.5.1", "|T|2.5.1").encode(), received_at=NOW)
    assert ei.value.reason is Reason.HL7_PROCESSING_ID and "'T'" in ei.value.message


def test_maps_check_command_exit_codes(tmp_path, capsys):
    from monitor.cli import main

    good = tmp_path / "good.yaml"
    good.write_text("source: LAB\ncodes:\n  ALT: 1742-6\nunits:\n  U/l: U/L\n", encoding="utf-8")
    bad = tmp_path / "bad.yaml"
    bad.write_text("source: LAB2\ncodes:\n  XX: 9999-9\n", encoding="utf-8")
    assert main(["maps", "check", str(good)]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["maps", "check", str(good), str(bad)]) == 1
    assert "9999-9" in capsys.readouterr().out


def test_a_negative_alt_is_implausible_and_answered_as_a_data_type_error():
    err = rejected(msg(value="-55"))
    assert err.reason == Reason.IMPLAUSIBLE_VALUE and "alt -55 U/L" in err.message
