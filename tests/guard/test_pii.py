"""PII detectors: what they must find, and the numbers they must leave alone."""

from __future__ import annotations

import pytest

from qanat.guard.pii import is_valid_iban, is_valid_rib, mod97
from qanat.guard.scan import Scanner

SCANNER = Scanner()


def found(text: str) -> list[tuple[str, str]]:
    return [(s.category, text[s.start:s.end]) for s in SCANNER.scan(text, {"pii"}).spans]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("appelle-moi au 06 12 34 56 78 demain", "06 12 34 56 78"),
        ("call +212 661-234567 now", "+212 661-234567"),
        ("رقمي ٠٦٦١٢٣٤٥٦٧ شكرا", "٠٦٦١٢٣٤٥٦٧"),
        ("tel (+212) 661 234 567.", "(+212) 661 234 567"),
        ("US office +1 415 555 2671", "+1 415 555 2671"),
        ("fixe 0522 27 35 40", "0522 27 35 40"),
    ],
)
def test_phones(text: str, value: str) -> None:
    assert ("pii/phone", value) in found(text)


@pytest.mark.parametrize(
    "text",
    [
        "Order #4839201 of 12/05/2024, total 1 249,99 MAD",
        "In 1999 the population was 28,113,000",
        "Meet at 09:45 on 2025-03-14, gate 12",
        "ISBN 978-2-07-036822-8",
        "Build 20240512.3, version 2.4.1.0",
        "Tracking 1Z999AA10123456784",
        "Commande 0612 : total 612,00 MAD",
        "Coordinates 33.5731, -7.5898",
        "The SHA-256 is 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "Room AB1234 is upstairs, next to the lift",  # a CIN-shaped code, but no context word near it
    ],
)
def test_benign_numbers_are_left_alone(text: str) -> None:
    assert found(text) == []


def test_moroccan_iban_and_rib_checked_by_mod_97() -> None:
    rib = "011519000001205000534921"
    assert is_valid_rib(rib) and not is_valid_rib(rib[:-1] + "0")
    assert is_valid_iban("MA64" + rib) and not is_valid_iban("MA65" + rib)
    from stdnum import iban

    assert not iban.is_valid("MA64" + rib)  # why Qanat checks Moroccan IBANs itself
    assert mod97("MA64" + rib) != 1 and mod97(rib + "MA64") == 1
    text = "IBAN MA64 0115 1900 0001 2050 0053 4921, RIB 011 519 0000012050005349 21."
    assert found(text) == [("pii/iban", "MA64 0115 1900 0001 2050 0053 4921"),
                           ("pii/iban", "011 519 0000012050005349 21")]
    assert found("FR14 2004 1010 0505 0001 3M02 606") == [("pii/iban", "FR14 2004 1010 0505 0001 3M02 606")]


def test_cards_need_luhn_and_an_issuer() -> None:
    assert found("card 4111 1111 1111 1111 exp 09/27") == [("pii/card", "4111 1111 1111 1111")]
    assert found("card 4111 1111 1111 1112") == []  # Luhn fails
    assert found("ref 9111 1111 1111 1116") == []  # no issuer starts with 9


def test_national_ids() -> None:
    assert found("رقم البطاقة الوطنية: BE123456") == [("pii/national_id", "BE123456")]
    assert found("ra9m lbita9a dyali K 45678") == [("pii/national_id", "K 45678")]
    assert found("mon NIR 2 55 08 14 168 025 38") == [("pii/national_id", "2 55 08 14 168 025 38")]


def test_emails_ips_and_secrets() -> None:
    assert found("mail ali.b@menara.ma please") == [("pii/email", "ali.b@menara.ma")]
    assert found("server 192.168.1.20 down, v1.2.3.4 fine, 999.1.1.1 no") == [("pii/ip", "192.168.1.20")]
    assert found("host 2001:db8::1 and 12:30:00") == [("pii/ip", "2001:db8::1")]
    text = "key AKIAIOSFODNN7EXAMPLE and token=ab12cd34ef56gh78"
    assert found(text) == [("pii/secret", "AKIAIOSFODNN7EXAMPLE"), ("pii/secret", "ab12cd34ef56gh78")]
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
    assert found(f"Bearer {jwt}") == [("pii/secret", jwt)]


def test_overlapping_spans_merge() -> None:
    spans = SCANNER.scan("IBAN MA64 0115 1900 0001 2050 0053 4921", {"pii"}).spans
    assert len(spans) == 1
