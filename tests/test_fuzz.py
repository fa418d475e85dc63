"""Fuzzing the parts that read untrusted bytes (issue 6), with Hypothesis, bounded so that CI
spends seconds on it: the data set inspection of the store handler, UID and path handling,
config parsing, task messages. Each property is "a clear refusal or a good answer, never
another exception"; a crash found here becomes a regression example (``@example``)."""
from __future__ import annotations

import io
import string
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node.spool import Spool
from dicom_node.structure import MAX_INFLATED_BYTES, Undecodable, scan_buffer
from dicom_node.uids import InvalidUID, validate_uid
from study_queue.delivery import check_result
from study_queue.errors import UsageError
from study_queue.settings import load_settings
from study_queue.workdir import BadMessage

from .factory import ct_dataset

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian]


def _encoded(syntax: str) -> bytes:
    ds = ct_dataset("1.2.3", index=0, size=8, transfer_syntax=syntax)
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=syntax != ExplicitVRBigEndian)
    return buf.getvalue()


VALID = {ts: _encoded(ts) for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian)}


@FUZZ
@given(data=st.binary(max_size=4096), syntax=st.sampled_from(SYNTAXES))
@example(data=b"\x08\x00\x18\x00UI\xff\xff", syntax=ExplicitVRLittleEndian)  # length past the end
@example(data=b"\xfe\xff\x00\xe0\xff\xff\xff\xff" * 4, syntax=ImplicitVRLittleEndian)  # items at the top level
def test_random_bytes_are_refused_or_read_never_a_crash(data, syntax):
    try:
        values = scan_buffer(data, 0, len(data), syntax)
    except Undecodable:
        return
    assert isinstance(values, dict) and all(isinstance(v, str) for v in values.values())


@FUZZ
@given(syntax=st.sampled_from(list(VALID)), cuts=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
       truncate=st.integers(0, 10_000))
def test_mutated_data_sets_are_refused_or_read_never_a_crash(syntax, cuts, truncate):
    """A real data set with bytes changed and its end cut off, as a broken scanner sends."""
    data = bytearray(VALID[syntax][132 + 12:])  # past the preamble and File Meta group length element
    for pos, value in cuts:
        data[pos % len(data)] = value
    data = bytes(data[: max(1, len(data) - truncate % len(data))])
    try:
        scan_buffer(data, 0, len(data), syntax)
    except Undecodable:
        pass


def test_a_deflate_bomb_is_refused_without_inflating_it():
    bomb = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = b"\0" * (1 << 20)
    payload = b"".join(bomb.compress(chunk) for _ in range((MAX_INFLATED_BYTES >> 20) + 2)) + bomb.flush()
    assert len(payload) < 4 << 20  # a few MB on the wire
    with pytest.raises(Undecodable, match="inflates beyond"):
        scan_buffer(payload, 0, len(payload), DeflatedExplicitVRLittleEndian)


@FUZZ
@given(text=st.text(max_size=80))
@example(text="../../etc/passwd")
@example(text="1.2/../../x")
@example(text="1.2.3\x00")
def test_any_text_is_a_valid_uid_inside_the_spool_or_refused(text, tmp_path_factory):
    try:
        uid = validate_uid(text)
    except InvalidUID:
        return
    assert set(uid) <= set(string.digits + ".") and len(uid) <= 64
    spool = Spool(tmp_path_factory.getbasetemp() / "spool")
    path = (spool.root / spool.instance_relpath(uid, uid, uid)).resolve()
    assert spool.root in path.parents


SECTION_KEYS = {
    "node": ["ae_title", "port", "spool", "study_idle_timeout", "max_associations", "accept_unknown_callers", "bind"],
    "delivery": ["return_to", "max_attempts", "backoff_initial", "backoff_max"],
    "queue": ["broker_url", "stale_after", "max_attempts"],
    "inference": ["engine", "models", "batch_size"],
    "http": ["port", "token"],
    "bogus": ["x"],
}
VALUES = st.one_of(st.integers(-70000, 70000), st.floats(allow_nan=True), st.booleans(), st.text(max_size=20),
                   st.lists(st.text(max_size=8), max_size=3))


@FUZZ
@given(text=st.text(max_size=300))
def test_any_config_text_loads_or_is_one_config_error(text, tmp_path_factory):
    path = Path(tmp_path_factory.mktemp("cfg")) / "c.toml"
    path.write_text(text)
    try:
        load_settings(path, env={})
    except UsageError as exc:
        assert "\n" not in str(exc).strip() or "TOML" in str(exc)


@FUZZ
@given(config=st.dictionaries(st.sampled_from(sorted(SECTION_KEYS)),
                              st.dictionaries(st.sampled_from(sum(SECTION_KEYS.values(), [])), VALUES, max_size=4),
                              max_size=4))
def test_structured_configs_load_or_name_the_key(config, tmp_path_factory):
    from study_queue.settings import toml_value

    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items() if not (isinstance(v, float) and v != v)]
    path = Path(tmp_path_factory.mktemp("cfg")) / "c.toml"
    path.write_text("\n".join(lines) + "\n")
    try:
        load_settings(path, env={})
    except UsageError as exc:
        message = str(exc)
        assert message and "Traceback" not in message


@FUZZ
@given(message=st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
                            max_leaves=12))
def test_any_json_deliver_message_is_checked_or_refused(message):
    try:
        check_result(message)
    except BadMessage:
        pass
