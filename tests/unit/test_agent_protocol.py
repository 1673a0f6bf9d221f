"""The agent protocol's host side: every byte from the guest is untrusted (SECURITY.md #19)."""

from __future__ import annotations

import struct

import pytest

from silo.agent import protocol as P


def test_frames_split_anywhere_are_reassembled() -> None:
    data = P.frame(P.STDOUT, 1, b"hello") + P.frame(P.EXIT, 1, struct.pack(">I", 3))
    reader = P.Reader()
    got = []
    for i in range(len(data)):
        got += reader.feed(data[i:i + 1])
    assert got == [(P.STDOUT, 1, b"hello"), (P.EXIT, 1, struct.pack(">I", 3))]


def test_an_oversized_frame_is_refused_before_its_payload_arrives() -> None:
    reader = P.Reader()
    with pytest.raises(P.ProtocolError, match="over the limit"):
        reader.feed(struct.pack(">IBI", P.MAX_PAYLOAD + 1, P.STDOUT, 1))


@pytest.mark.parametrize("kind", [0, 15, 255])
def test_an_unknown_kind_is_refused(kind: int) -> None:
    with pytest.raises(P.ProtocolError, match=f"unknown frame kind {kind}"):
        P.Reader().feed(struct.pack(">IBI", 0, kind, 1))


@pytest.mark.parametrize(("parse", "payload", "message"), [
    (P.hello, b"\0\0\0\2", "a hello of 4 bytes"),
    (P.hello, b"\0" * 9, "a hello of 9 bytes"),
    (P.started, b"", "a started message of 0 bytes"),
    (P.exit_code, struct.pack(">I", 256), "exit code 256"),
    (P.exit_code, b"\0\0\0\0\0", "an exit message of 5 bytes"),
    (P.closed_stream, b"\0", "names no output stream"),
    (P.closed_stream, b"\3", "names no output stream"),
    (P.error, b"\0\0", "without its code"),
    (P.error, struct.pack(">I", 1000) + b"x", "error code 1000"),
])
def test_malformed_guest_messages_are_refused(parse, payload: bytes, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(P.ProtocolError, match=message):
        parse(payload)


def test_an_error_message_is_bounded_and_printable() -> None:
    code, text = P.error(struct.pack(">I", 127) + b"\x1b[31mred\n" + b"y" * 5000 + b"\xff")
    assert code == 127
    assert text.startswith("?[31mred?")
    assert len(text) == P.MAX_ERROR


def test_an_exec_request_carries_byte_strings_and_counts() -> None:
    data = P.exec_request(7, [b"ls", b"caf\xe9"], [b"A=1"], b"/tmp", 1000, 1000, True, 24, 80)
    [(kind, channel, payload)] = P.Reader().feed(data)
    assert (kind, channel) == (P.EXEC, 7)
    assert struct.unpack_from(">IIHHBIII", payload) == (1000, 1000, 24, 80, 1, 2, 1, 0)
    assert payload[25:] == b"/tmp\0ls\0caf\xe9\0A=1\0"


def test_an_exec_request_carries_its_rlimits_by_linux_number() -> None:
    data = P.exec_request(1, [b"true"], [], b"/", 0, 0, False, 0, 0, (("nofile", 32, 128), ("core", 0, 0)))
    [(_, _, payload)] = P.Reader().feed(data)
    assert struct.unpack_from(">IIHHBIII", payload)[-1] == 2
    assert struct.unpack_from(">IQQIQQ", payload, 25) == (7, 32, 128, 4, 0, 0)
    assert payload[65:] == b"/\0true\0"


def test_users_carry_passwd_then_group() -> None:
    [(kind, channel, payload)] = P.Reader().feed(P.users(1000, 100, b"root:x:0:0::/root:/bin/sh\n", b"root:x:0:\n"))
    assert (kind, channel) == (P.USERS, 0)
    assert struct.unpack_from(">III", payload) == (1000, 100, 26)
    assert payload[12:38] == b"root:x:0:0::/root:/bin/sh\n" and payload[38:] == b"root:x:0:\n"


@pytest.mark.parametrize(("argv", "env", "cwd"), [
    ([], [], b"/"), ([b"a\0b"], [], b"/"), ([b"ls"], [b"NOEQUALS"], b"/"), ([b"ls"], [], b"/\0"),
])
def test_an_exec_request_that_the_agent_could_misread_is_not_built(argv: list[bytes], env: list[bytes],
                                                                   cwd: bytes) -> None:
    with pytest.raises(ValueError):
        P.exec_request(1, argv, env, cwd, 0, 0, False, 0, 0)


def test_an_identity_carries_hostname_machine_id_and_seed() -> None:
    seed = bytes(range(64))
    data = P.identity(b"box-1", b"0123456789abcdef0123456789abcdef", seed)
    length, kind, channel = P.HEADER.unpack_from(data)
    payload = data[P.HEADER.size:]
    assert (kind, channel, length) == (P.IDENTITY, 0, len(payload))
    assert payload == b"\x05box-1" + b"0123456789abcdef0123456789abcdef" + seed


@pytest.mark.parametrize(("hostname", "machine_id", "seed", "message"), [
    (b"", b"0" * 32, b"s" * 16, "bad hostname"),
    (b"a" * 64, b"0" * 32, b"s" * 16, "bad hostname"),
    (b"a b", b"0" * 32, b"s" * 16, "bad hostname"),
    (b"box", b"0" * 31, b"s" * 16, "machine-id"),
    (b"box", b"G" * 32, b"s" * 16, "machine-id"),
    (b"box", b"0" * 32, b"s" * 15, "RNG seed"),
    (b"box", b"0" * 32, b"s" * 513, "RNG seed"),
])
def test_an_identity_the_agent_would_refuse_is_not_built(hostname: bytes, machine_id: bytes, seed: bytes,
                                                          message: str) -> None:
    with pytest.raises(ValueError, match=message):
        P.identity(hostname, machine_id, seed)
