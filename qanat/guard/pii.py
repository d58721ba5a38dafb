"""PII detectors: each a pure function over normalised text, returning spans in that text's offsets.

Candidates come from precompiled regexes; only candidates reach the checks that cost something (a phone
number's validity in libphonenumber's metadata, a checksum), so text without digits costs one regex pass each.
Benign numbers -- dates, prices, years, order numbers -- are kept out by the checks, not by luck: a national
phone number must start with its trunk prefix 0 and be valid for one of the deployment's regions; a card must
have an issuer prefix and pass Luhn; an IBAN or RIB must pass mod 97; a CIN needs a context word.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

import phonenumbers
from stdnum import iban as stdnum_iban
from stdnum import luhn
from stdnum.fr import nir

from qanat.guard.normalize import Normalized, fold_pattern
from qanat.guard.spans import Span

# -- e-mail ----------------------------------------------------------------------------------------------
_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]{1,64}@[\w-]{1,63}(?:\.[\w-]{1,63})*\.[a-z]{2,24}(?![\w-])")


def find_emails(norm: Normalized) -> list[Span]:
    return [Span("pii/email", m.start(), m.end(), 0.99, "email") for m in _EMAIL.finditer(norm.text)]


# -- phone numbers ---------------------------------------------------------------------------------------
# A run of digits with the separators people write between groups; + or 00 opens the international form.
# Each digit-led regex opens with a lookahead on its first character: Python's re then skips other positions
# in C instead of evaluating the lookbehind at every one.
_PHONE = re.compile(r"(?=[\d(+])(?<![\w+/.,:-])\(?(?:\+|00)?\(?\d[\d \-.()]{6,20}\d(?![\w/]|[.,]\d)")
_DATE_LIKE = re.compile(r"^\d{1,4}[.\-/ ]\d{1,2}[.\-/ ]\d{1,4}$")


def find_phones(norm: Normalized, regions: Sequence[str] = ("MA", "FR")) -> list[Span]:
    spans = []
    for m in _PHONE.finditer(norm.text):
        if m.group()[0] not in "0+(":
            continue  # neither international nor a national number with its trunk 0: a price, a year, a count
        raw = m.group().rstrip(" -.(")
        if raw.startswith("(") and ")" not in raw[1:6]:
            raw = raw[1:]
        digits = re.sub(r"\D", "", raw)
        if not 8 <= len(digits) <= 15 or _DATE_LIKE.match(raw) or "  " in raw:
            continue
        candidates: list[tuple[str, str | None]]
        if raw.lstrip("(").startswith(("+", "00")):
            candidates = [("+" + digits.removeprefix("00"), None)]
        elif digits.startswith("0"):  # national form: the trunk prefix 0, as in Morocco and France
            candidates = [(digits, region) for region in regions]
        else:
            continue
        for number, region in candidates:
            try:
                parsed = phonenumbers.parse(number, region)
            except phonenumbers.NumberParseException:
                continue
            if phonenumbers.is_valid_number(parsed):
                end = m.start() + len(m.group().rstrip(" -.("))
                spans.append(Span("pii/phone", end - len(raw), end, 0.95, "phone"))
                break
    return spans


# -- IBAN and Moroccan RIB -------------------------------------------------------------------------------
# Found from its check digits (a digit-led search runs in C) and the two letters before them.
_IBAN = re.compile(r"(?=\d)(?<=(?<![a-z0-9])[a-z]{2})\d{2}(?:[ \-]?[a-z0-9]){10,30}(?![a-z0-9])")
_RIB = re.compile(r"(?=\d)(?<![\w-])\d(?:[ \-]?\d){23}(?![\w-])")
IBAN_LENGTHS = {"ma": 28, "fr": 27, "es": 24, "de": 22, "gb": 22, "be": 16, "nl": 18, "it": 27, "pt": 25,
                "ch": 21, "lu": 20, "tn": 24, "dz": 26, "sa": 24, "ae": 23, "tr": 26, "ie": 22, "at": 20}


def mod97(alnum: str) -> int:
    """ISO 7064 mod 97-10 over letters (A=10 ... Z=35) and digits."""
    remainder = 0
    for ch in alnum:
        value = int(ch, 36)
        remainder = (remainder * (100 if value > 9 else 10) + value) % 97
    return remainder


def is_valid_iban(compact: str) -> bool:
    compact = compact.upper()
    country = compact[:2].lower()
    if country == "ma":  # python-stdnum's registry has no Moroccan IBAN: checked here, with its RIB key
        return len(compact) == 28 and compact[2:].isdigit() and mod97(compact[4:] + compact[:4]) == 1 \
            and is_valid_rib(compact[4:])
    if country in IBAN_LENGTHS and len(compact) != IBAN_LENGTHS[country]:
        return False
    return bool(stdnum_iban.is_valid(compact))


def is_valid_rib(digits: str) -> bool:
    """A Moroccan RIB: bank (3), city (3), account (16), key (2); the 24 digits are 0 mod 97, as a French RIB."""
    return len(digits) == 24 and digits.isdigit() and int(digits) % 97 == 0 and int(digits[:22]) > 0


def find_ibans(norm: Normalized) -> list[Span]:
    spans = []
    text = norm.text
    for m in _IBAN.finditer(text):
        start = m.start() - 2
        compact = re.sub(r"[ \-]", "", text[start:m.end()])
        # A run that goes on into words ("fr76 ... 189 merci"): try shorter by dropping trailing groups.
        for end in range(len(compact), 13, -1):
            if is_valid_iban(compact[:end]):
                spans.append(Span("pii/iban", start, _extent(text[start:m.end()], start, end), 0.99, "iban"))
                break
    for m in _RIB.finditer(norm.text):
        if is_valid_rib(re.sub(r"\D", "", m.group())):
            spans.append(Span("pii/iban", m.start(), m.end(), 0.97, "rib"))
    return spans


def _extent(text: str, start: int, num_chars: int) -> int:
    """Where, in `text` (found at `start`), the first `num_chars` non-separator characters end."""
    seen = 0
    for i, ch in enumerate(text):
        if ch not in " -":
            seen += 1
            if seen == num_chars:
                return start + i + 1
    return start + len(text)


# -- payment cards ---------------------------------------------------------------------------------------
_CARD = re.compile(r"(?=\d)(?<![\w.-])\d(?:[ \-]?\d){12,18}(?![\w-]|[.,]\d)")
_ISSUER = re.compile(r"^(?:4|5[1-5]|2[2-7]|3[47]|6011|65|64[4-9]|35|62|36|30[0-5]|38|39)")


def find_cards(norm: Normalized) -> list[Span]:
    spans = []
    for m in _CARD.finditer(norm.text):
        digits = re.sub(r"\D", "", m.group())
        if _ISSUER.match(digits) and luhn.is_valid(digits) and len(set(digits)) > 1:
            spans.append(Span("pii/card", m.start(), m.end(), 0.95, "card"))
    return spans


# -- national identity numbers ---------------------------------------------------------------------------
# Moroccan CIN: one or two letters and up to six digits ("BE123456", "K 45678"); far too many things look
# like that, so it counts only near a context word, in any of the languages.
_CIN = re.compile(r"(?<![\w-])[a-z]{1,2} ?\d{4,6}(?![\w-])")
_CIN_CONTEXT = re.compile(fold_pattern(
    r"\b(?:cin|cnie|c\.i\.n|carte (?:nationale|d'identite)|piece d'identite|n° d'identite|national id|"
    r"id card|identity card|id number|bita9a|lbita9a|l'bita9a|carte|lakart|la carte|watania|wataniya|"
    r"identite|ⵜⴰⴽⴰⵔⴹⴰ)|البطاقه الوطنيه|بطاقه التعريف|رقم البطاقه|لاكارط|البطاقه|الهويه|رقم التعريف"))
# Substrings every context word contains one of: a cheap test before the regexes.
_CIN_STEMS = tuple(fold_pattern(s) for s in ("cin", "cni", "carte", "card", "id ", " id", "identit", "bita9a",
                                             "watan", "kart", "بطاق", "هوي", "تعريف", "كارط", "ⵜⴰⴽⴰⵔⴹⴰ"))
_NIR = re.compile(r"(?=[12])(?<![\w-])[12] ?\d{2} ?\d{2} ?(?:\d{2}|2a|2b) ?\d{3} ?\d{3} ?\d{2}(?![\w-])")
_CONTEXT_WINDOW = 60  # characters before a candidate where a context word makes it count


def find_national_ids(norm: Normalized, context: str = "") -> list[Span]:
    """`context`: folded text just before this one (a stream's earlier output), read for context words."""
    text = norm.text
    spans = []
    for m in _NIR.finditer(text):
        if nir.is_valid(m.group().replace(" ", "").upper()):
            spans.append(Span("pii/national_id", m.start(), m.end(), 0.97, "fr_nir"))
    context = context[-_CONTEXT_WINDOW:]
    if not any(stem in text or stem in context for stem in _CIN_STEMS) or _CIN.search(text) is None or (
            _CIN_CONTEXT.search(text) is None and _CIN_CONTEXT.search(context) is None):
        return spans
    for m in _CIN.finditer(text):
        if sum(c.isdigit() for c in m.group()) < 4:
            continue
        window = (context + text[:m.start()])[-_CONTEXT_WINDOW:]
        if _CIN_CONTEXT.search(window):
            spans.append(Span("pii/national_id", m.start(), m.end(), 0.9, "ma_cin"))
    return spans


# -- IP addresses ----------------------------------------------------------------------------------------
_IPV4 = re.compile(r"(?=\d)(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?=[0-9a-f:])(?<![\w:])(?:[0-9a-f]{0,4}:){2,7}[0-9a-f]{0,4}(?![\w:])")
_VERSION_BEFORE = re.compile(r"(?:\b(?:v|version|versao|ver\.?|release)|الاصدار|الإصدار) ?$")


def find_ips(norm: Normalized) -> list[Span]:
    text = norm.text
    spans = []
    for m in _IPV4.finditer(text):
        try:
            address = ipaddress.IPv4Address(m.group())
        except ValueError:
            continue
        if _VERSION_BEFORE.search(text[max(0, m.start() - 10):m.start()]) or address.is_unspecified:
            continue
        spans.append(Span("pii/ip", m.start(), m.end(), 0.9, "ipv4"))
    for m in _IPV6.finditer(text):
        if m.group().count(":") < 3:  # "12:30:00" and similar times are not addresses
            continue
        try:
            ipaddress.IPv6Address(m.group())
        except ValueError:
            continue
        spans.append(Span("pii/ip", m.start(), m.end(), 0.9, "ipv6"))
    return spans


# -- secrets (on the original text: keys are case-sensitive) ---------------------------------------------
# (name, literal one of which every match contains (None: check the lowercased text for `_ASSIGNED_WORDS`),
# pattern): the literal check spares most texts the regex passes.
_SECRET_PATTERNS = (
    ("private_key", ("PRIVATE KEY",),
     r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----[\s\S]*?(?:-----END (?:[A-Z]+ )?PRIVATE KEY-----|$)"),
    ("aws_access_key", ("AKIA", "ASIA",), r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    ("github_token", ("gh", "github_pat_",), r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})\b"),
    ("openai_key", ("sk-",), r"\bsk-(?:proj-|svcacct-)?[A-Za-z0-9_\-]{20,}\b"),
    ("slack_token", ("xox",), r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b"),
    ("google_api_key", ("AIza",), r"\bAIza[0-9A-Za-z_\-]{35}\b"),
    ("stripe_key", ("k_live_", "k_test_",), r"\b[rs]k_(?:live|test)_[0-9A-Za-z]{16,}\b"),
    ("jwt", ("eyJ",), r"\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}"),
    ("hf_token", ("hf_",), r"\bhf_[A-Za-z0-9]{30,}\b"),
    ("assigned_secret", None, r"(?i)\b(?:api[_-]?key|secret|token|password|passwd|mot de passe)\b\s*[:=]\s*"
                        r"[\"']?(?P<value>(?=[^\s\"']*\d)(?=[^\s\"']*[A-Za-z])[^\s\"']{12,})"),
)
_SECRETS = [(name, literals, re.compile(p)) for name, literals, p in _SECRET_PATTERNS]
_ASSIGNED_WORDS = ("key", "secret", "token", "passw", "mot de passe")


def find_secrets(original: str) -> list[Span]:
    spans = []
    lowered = original.lower()
    for name, literals, pattern in _SECRETS:
        if not any(w in original for w in literals) if literals is not None else \
                not any(w in lowered for w in _ASSIGNED_WORDS):
            continue
        for m in pattern.finditer(original):
            group = "value" if "value" in pattern.groupindex else 0
            spans.append(Span("pii/secret", m.start(group), m.end(group), 0.99, name))
    return spans
