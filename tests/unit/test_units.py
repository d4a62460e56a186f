"""Scalar parsers: what they accept, and one clear error for everything else."""

from __future__ import annotations

import pytest

from vmdriver.errors import SpecError
from vmdriver.units import (
    check_cores,
    check_hostname,
    check_socket_path,
    parse_duration,
    parse_memory_mib,
    parse_port,
    parse_size,
)


@pytest.mark.parametrize("text,expected", [
    ("10GiB", 10 * 2**30), ("10G", 10 * 2**30), ("20GB", 20 * 10**9), ("512MiB", 512 * 2**20),
    ("1.5KiB", 1536), (4096, 4096), (" 7 ", 7), ("1kb", 1000), ("0", 0),
])
def test_sizes(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", [
    "", "GiB", "-1", "1.5", "10 GiBs", "1e9", "ten", "\uff11\uff10G", "1_000", True, None, 1.5, [],
    "9" * 400, "99999999999EiB", "1i", "0x10",
])
def test_bad_sizes_say_what_was_expected(text: object) -> None:
    with pytest.raises(SpecError) as info:
        parse_size(text, where="disk")
    assert str(info.value).startswith("disk: ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text,expected", [
    ("30s", 30), ("5m", 300), ("1h30m", 5400), ("500ms", 0.5), (12, 12), ("2.5", 2.5),
    ("1m30s", 90), (0, 0),
])
def test_durations(text: object, expected: float) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", [
    "", "s", "5 m", "-5s", "5d", "1h-1m", "\uff19s", float("nan"), float("inf"), 10**400,
    "9" * 300 + "h", True, None, "1e3s", "30s5", "1y",
])
def test_bad_durations(text: object) -> None:
    with pytest.raises(SpecError, match="duration"):
        parse_duration(text, where="kill_timeout")


@pytest.mark.parametrize("text,expected", [(80, 80), ("8080", 8080), (" 22 ", 22), (65535, 65535)])
def test_ports(text: object, expected: int) -> None:
    assert parse_port(text) == expected


@pytest.mark.parametrize("text", [0, 65536, -1, "\uff18\uff10", "8_0", "+80", "0x50", "", True, 80.0, None,
                                  "9" * 30])
def test_bad_ports(text: object) -> None:
    with pytest.raises(SpecError, match=r"1 to 65535|port"):
        parse_port(text, where="port")


def test_port_zero_when_allowed() -> None:
    assert parse_port(0, allow_zero=True) == 0


@pytest.mark.parametrize("name", ["example.com", "a", "a-b.c-d", "x" * 63, "host.", "1.2.3.4"])
def test_hostnames(name: str) -> None:
    assert check_hostname(name) == name


@pytest.mark.parametrize("name", ["", "-a", "a-", "a..b", "a_b", "x" * 64, "ex ample",
                                  "exampl\u212a.com", ".", ("a." * 127) + "ab", 5])
def test_bad_hostnames(name: object) -> None:
    with pytest.raises(SpecError, match="RFC 1123"):
        check_hostname(name)


@pytest.mark.parametrize("value,expected", [(128, 128), ("2GiB", 2048), ("512", 512),
                                            ("1G", 1024)])
def test_memory(value: object, expected: int) -> None:
    assert parse_memory_mib(value, host_mib=4096) == expected


@pytest.mark.parametrize("value", [127, 0, -5, "8GiB", "1.5MiB", "lots", True, 4097])
def test_memory_bounds(value: object) -> None:
    with pytest.raises(SpecError, match="128 to 4096 MiB"):
        parse_memory_mib(value, where="memory", host_mib=4096)


@pytest.mark.parametrize("value", [0, -1, 1025, "two", True, 1.0])
def test_core_bounds(value: object) -> None:
    with pytest.raises(SpecError, match="1 to 1024"):
        check_cores(value, where="cores")
    assert check_cores("4") == 4


def test_socket_path_length() -> None:
    assert check_socket_path("/tmp/" + "x" * 102) is not None
    with pytest.raises(SpecError, match="107 bytes"):
        check_socket_path("/tmp/" + "x" * 103)
