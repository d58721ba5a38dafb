"""Prompt injection and jailbreak: scored patterns in English, French, Arabic, Darija (Arabic script and
Arabizi), plus encoded payloads (base64 and hex blobs that decode to text) and invisible-character smuggling.

Patterns are written in natural script and folded like the text (`fold_pattern`), so one pattern matches
"تجاهل التعليمات السابقة" with or without harakat, alef hamza or teh marbuta. A text's score is its best
pattern's, raised when independent patterns agree; `DEFAULT_THRESHOLD` flags it.

Words that are also benign alone ("developer mode", "jailbreak", "sans limite") score below the threshold
on their own and count only beside an instruction to the model.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import re

from qanat.guard.normalize import Normalized, fold_pattern, normalize
from qanat.guard.spans import Span

DEFAULT_THRESHOLD = 0.5
_AGREEMENT_BONUS = 0.15  # added once when two or more different rules fire

_SEP = r"[\s,.;:!?'\"()\-]+"
_RULES_EN = r"(?:instructions?|rules|prompts?|directions|directives|guidelines|commands|constraints|programming|" \
            r"restrictions|guardrails|policies|system prompt|system message)"
_QUAL_EN = r"(?:previous|prior|above|earlier|preceding|former|initial|original|system|existing|old|given|safety)"
_RULES_FR = r"(?:instructions?|consignes|regles|directives|indications|ordres|contraintes|restrictions|prompts?|" \
            r"messages? systeme|limites)"
_RULES_AR = r"(?:ال)?(?:تعليمات|اوامر|قواعد|ارشادات|توجيهات|قيود|قوانين|برومبت)"
_RULES_ARABIZI = r"(?:les? instructions?|l'?instructions?|instructions?|t3limat|ta3limat|t3lima|l9awa3id|lqawa3id|" \
                 r"9awa3id|qawa3id|l9awanin|9awanin|les regles|regles|rules|lprompt|prompt|l'?ordres|ordres)"

# (language, rule name, score, pattern over folded text)
_PATTERNS: list[tuple[str, str, float, str]] = [
    # -- English
    ("en", "ignore_previous", 0.95,
     rf"\b(?:ignore|disregard|forget|skip|override|bypass|drop|discard|abandon|don't follow|do not follow|"
     rf"stop following)"
     rf"\b(?: (?:all|any|every|each|the|your|my|of|these|those|this|that|prior|ga3|kolchi))*"
     rf" (?:{_QUAL_EN} )?{_RULES_EN}\b"),
    ("en", "forget_everything", 0.9,
     r"\b(?:ignore|forget|disregard) (?:everything|all|anything|whatever) (?:you (?:were|have been|'ve been) "
     r"(?:told|given|taught)|(?:written |said )?(?:above|before|earlier|so far|previously)|"
     r"i (?:said|told you) before)"),
    ("en", "you_are_now", 0.9,
     r"\byou(?: are|'re) (?:now |no longer |from now on )*(?:dan|an? (?:unrestricted|unfiltered|uncensored|jailbroken|"
     r"evil|rogue)\b|jailbroken|free (?:from|of)|unrestricted|unfiltered|uncensored|not bound|no longer bound|"
     r"in (?:developer|god|dan|jailbreak) mode)"),
    ("en", "do_anything_now", 0.9, r"\bdo anything now\b|\b(?:act|behave|respond|answer) as dan\b|\bdan mode\b"),
    ("en", "mode_switch", 0.85,
     r"\b(?:developer|god|jailbreak|dan|unrestricted|unfiltered|evil|sudo) mode (?:enabled|activated|is on)\b|"
     r"\b(?:you are|you're|act|stay|respond|answer|simulate|pretend|switch|enter|go) (?:\w+ ){0,4}?"
     r"(?:in|into|to) (?:developer|god|jailbreak|dan|unrestricted|unfiltered|evil) mode\b"),
    ("en", "no_restrictions_roleplay", 0.9,
     r"\b(?:pretend|imagine|act as|act like|roleplay|role-play|play the role|behave|from now on|you will be|"
     r"simulate|become)\b[^.?!]{0,80}\b(?:no|without|free of|free from|zero|none of (?:the|your)|ignor\w*) "
     r"(?:any |all )?"
     r"(?:restrictions|rules|limits|limitations|filters|guidelines|censorship|ethics|morals|boundaries|safety)\b"),
    ("en", "you_have_no_rules", 0.85,
     r"\byou (?:have|has|'ve got) no (?:restrictions|rules|limits|limitations|filters|guidelines|censorship|"
     r"ethical guidelines|boundaries)\b"),
    ("en", "reveal_system_prompt", 0.9,
     r"\b(?:reveal|show|print|display|repeat|output|tell|give|share|leak|dump|write out|recite|spell out|list|"
     r"copy|paste|what (?:is|are|was|were))\b(?: me| us)?(?: \w+){0,3}? (?:your|the (?:hidden|initial|original|secret|"
     r"full|exact|complete|first)) (?:system prompt|system message|initial prompt|hidden prompt|instructions|prompt|"
     r"pre-prompt|developer message|rules you were given|configuration)\b|"
     r"\b(?:reveal|print|repeat|dump|leak|output) (?:the )?(?:system prompt|text above|words above|everything above)"),
    ("en", "bypass_safety", 0.9,
     r"\b(?:bypass|override|disable|turn off|deactivate|circumvent|get around|switch off|remove)\b(?: \w+){0,2}? "
     r"(?:safety|content|security|moderation|ethical)? ?(?:filters?|guardrails|restrictions|safeguards|protocols|"
     r"censorship|policies|safety)\b"),
    ("en", "fake_system_turn", 0.7,
     r"(?m)^ *(?:#+ *|\[|<\|?)?(?:system|admin override|new instructions|developer message|sudo)(?:\]|\|?>)? *:"),
    ("en", "jailbreak_word", 0.4, r"\bjailbr(?:eak|oken)\b"),
    ("en", "from_now_on", 0.45, r"\bfrom now on,? you (?:will|are|must|shall|should)\b"),
    # -- French
    ("fr", "ignore_previous", 0.95,
     rf"\b(?:ignorez?|ignore[rs]?|oubliez?|oublie[rs]?|ne tiens? (?:pas|plus) compte|ne tenez (?:pas|plus) compte|"
     rf"fais abstraction|faites abstraction|passe outre|passez outre|ne respecte[sz]? plus|ne suis plus|"
     rf"contournez?|contourne[rs]?|n'obeis plus)\b(?: (?:a|de|des|du|d'|toutes|tous|tout|les|tes|vos|ces|la|l'|"
     rf"ga3|kolchi|ce qui|ce que|concernant))* ?{_RULES_FR}"),
    ("fr", "forget_everything", 0.9,
     r"\b(?:oublie|oubliez|ignore|ignorez) (?:tout|absolument tout|tout ce) (?:ce )?(?:qu'on|que|qui|qu'il)"
     r"[^.?!]{0,30}(?:dit|demande|precede|ecrit|appris|programme)"),
    ("fr", "no_restrictions", 0.9,
     r"\b(?:tu n'as|vous n'avez|tu n'es|vous n'etes) (?:plus |desormais |maintenant )*(?:aucune?|pas de|soumise?|"
     r"lie|limite)s? ?(?:a |par )?(?:\w+ )?(?:restrictions?|limites?|regles|filtres?|censure|contraintes?|regle)"),
    ("fr", "roleplay_no_rules", 0.9,
     r"\b(?:fais comme si|faites comme si|imagine que|imaginez que|joue le role|jouez le role|fais semblant|"
     r"faites semblant|comporte-toi|agis comme|a partir de maintenant|desormais)\b[^.?!]{0,80}\b(?:sans|aucune?|"
     r"n'avais|n'aviez|pas de|libre de|libere de|libres? de) (?:aucune? |de |d'|la moindre |toute |tout )?"
     r"(?:restrictions?|limites?|regles|filtres?|"
     r"censure|contraintes?|morale|ethique)"),
    ("fr", "mode_switch", 0.85,
     r"\b(?:tu es|tu passes|passe|passez|reponds|repondez|entre|entrez|active ton|activez votre|bascule|tu restes)"
     r"\b(?: \w+){0,3}? (?:en )?mode (?:developpeur|dieu|dan|jailbreak|sans filtre|sans restriction|libre|debride)"),
    ("fr", "reveal_system_prompt", 0.9,
     r"\b(?:revele|revelez|montre|montrez|affiche|affichez|donne|donnez|repete|repetez|ecris|ecrivez|dis|dites|"
     r"recopie|recopiez|partage|partagez|quel est|quelles sont|quels sont|divulgue)\b(?:[- ](?:moi|nous))? "
     r"(?:\w+ ){0,2}?(?:ton|tes|votre|vos|le|la|les) (?:prompt|message|instructions|consignes|regles|directives)"
     r"(?: (?:systeme|initiale?s?|cachee?s?|secrete?s?|d'origine|de depart|completes?|exacte?s?|du systeme))"),
    ("fr", "your_system_prompt", 0.8, r"\b(?:ton|votre) (?:prompt|message) (?:systeme|initial|cache|secret)\b"),
    ("fr", "bypass_safety", 0.9,
     r"\b(?:contourne|contournez|desactive|desactivez|supprime|supprimez|enleve|enlevez|leve|levez)\b(?: \w+){0,2}? "
     r"(?:tes|vos|les) (?:filtres|protections|restrictions|garde-fous|regles de securite|limites|censures?)"),
    ("fr", "without_filter", 0.45, r"\bsans (?:aucune? )?(?:restriction|filtre|censure)s?\b"),
    # -- Arabic (MSA)
    ("ar", "ignore_previous", 0.95,
     rf"(?:تجاهل|تجاهلي|تجاهلوا|اهمل|اهملي|انس|انسي|انسى|الغ|الغي|تخط|تخطي|لا تلتزم ب|لا تتبع|لا تطع|تجاوز)"
     rf"(?:\s+(?:جميع|كل|كافه|كامل|هذه|هذه))*\s*{_RULES_AR}"),
    ("ar", "forget_everything", 0.9,
     r"(?:انس|انسي|انسى|تجاهل|تجاهلي)\s+(?:كل|جميع)\s+(?:ما|شيء|الذي)(?:\s+\S+){0,3}?\s*"
     r"(?:قيل|قلته|سبق|ذكر|كتب|تعلمته|اعطي)"),
    ("ar", "reveal_system_prompt", 0.9,
     r"(?:اكشف|اكشفي|اعرض|اعرضي|اظهر|اظهري|اطبع|اطبعي|كرر|كرري|اعطني|اعطيني|اخبرني ب|اخبرني عن|"
     r"انسخ|اكتب)\s+(?:\S+\s+){0,2}?(?:ال)?(?:موجه|تعليمات|رساله|برومبت|اوامر|قواعد|اعدادات)\s+(?:ال)?(?:نظام|"
     r"سيستم|الاوليه|اوليه|الخفيه|خفيه|الاصليه|السريه)"),
    ("ar", "which_system_prompt", 0.9,
     r"(?:ما هي|ما هو|ما)\s+(?:ال)?(?:موجه|تعليمات|رساله|برومبت|اوامر|قواعد)\s+(?:ال)?(?:نظام|سيستم|الاوليه|الخفيه)"
     r"\s+(?:الخاص بك|الخاصه بك|التي اعطيت لك|التي لديك|الذي اعطي لك|التي تلقيتها)"),
    ("ar", "system_prompt_noun", 0.75, r"(?:موجه|برومبت|رساله|تعليمات) (?:ال)?نظام (?:الخاص بك|الخاصه بك)"),
    ("ar", "roleplay_no_rules", 0.9,
     r"(?:تظاهر|تظاهري|تصرف|تصرفي|العب دور|تقمص|تخيل|من الان|ابتداء من الان|انت الان|كن)(?:\s+\S+){0,8}?\s+"
     r"(?:بدون|بلا|دون|لا تملك|ليس لديك|لا توجد لديك|متحرر من)\s+(?:اي\s+)?(?:قيود|قواعد|حدود|رقابه|ضوابط|"
     r"فلاتر|اخلاق)"),
    ("ar", "no_restrictions", 0.85,
     r"(?:ليس لديك|لا تملك|لم تعد لديك|ليست لديك)\s+(?:اي\s+)?(?:قيود|قواعد|حدود|ضوابط)"),
    ("ar", "mode_switch", 0.85,
     r"(?:انت(?: الان)? في|ادخل(?: في)?|ادخلي(?: في)?|انتقل الي)\s+وضع\s+(?:المطور|دان|الحر|بلا قيود|"
     r"غير المقيد|كسر الحمايه)"),
    ("ar", "bypass_safety", 0.9,
     r"(?:تجاوز|تجاوزي|عطل|عطلي|ازل|ازيلي|تخط|اوقف)\s+(?:\S+\s+)?(?:الفلاتر|فلاتر|الحمايه|القيود|قيود|الرقابه|"
     r"قواعد الامان|ضوابط الامان|انظمه الحمايه)"),
    ("ar", "without_restrictions", 0.45, r"(?:بدون|بلا|دون)\s+(?:اي\s+)?(?:قيود|رقابه)"),
    # -- Darija in Arabic script
    ("ary", "forget_what_they_said", 0.95,
     r"(?:نسا|نسي|انسا|نساي|نساو|تنسا|تنسي|نسي)\b[^.؟!?]{0,50}?(?:قالو|كالو|قلت|كلت|عطاوك|كتبو|قاليك)"),
    ("ary", "ignore_rules", 0.95,
     rf"(?:نسا|نسي|انسا|نساي|نساو|ما تبعش|ماتبعش|ما تحترمش|ماتحترمش|ما تسمعش ل|ماتسمعش ل|خلي عليك|زيد على)"
     rf"(?:\s+(?:كاع|قاع|كلشي|هاد|هادوك|داك|ديك|ديال|ل))*\s*{_RULES_AR}"),
    ("ary", "reveal_prompt", 0.9,
     r"(?:وريني|وريلي|ورينا|عطيني|عطينا|قولي|قول ليا|كتب ليا|كتبلي|بين ليا|بينلي)\s+(?:\S+\s+){0,2}?"
     r"(?:البرومبت|برومبت|التعليمات|تعليمات|القواعد|الاوامر|الاعدادات)\s+(?:ديالك|ديال السيستم|ديال النظام|"
     r"ديال السيستيم|اللي عطاوك|لي عطاوك|لي عندك|اللي عندك)"),
    ("ary", "roleplay_no_rules", 0.9,
     r"(?:دير راسك|دير بحال|ديري راسك|تخيل راسك|تصور راسك|ولي|من دابا|من هنا ولقدام|كون)(?:\s+\S+){0,8}?\s+"
     r"(?:بلا|بدون|ما عندكش|ماعندكش)\s+(?:حتى\s+|شي\s+)?(?:قيود|قيد|قواعد|قاعده|حدود|رقابه|قوانين|قانون)"),
    ("ary", "no_rules", 0.85,
     r"(?:ما عندكش|ماعندكش|ما بقاش عندك|مابقاش عندك)\s+(?:حتى\s+|شي\s+)?(?:قيود|قواعد|حدود|قوانين)"),
    # -- Darija in Latin script (Arabizi), often mixed with French
    ("ary-Latn", "forget_what_they_said", 0.95,
     r"\b(?:nsa|nssa|ensa|nsay|nsaw|tensa|nsi|nessa|nsa)\b[^.?!]{0,50}?\b(?:9alo|galo|qalo|kalo|9alou|galou|qalou|"
     r"9olt|golt|qolt|3tawk|3tawlek|ktbo|9alik|galik)\b"),
    ("ary-Latn", "ignore_rules", 0.95,
     rf"\b(?:nsa|nssa|ensa|nsay|nsaw|tensa|ma tb3ch|matb3ch|ma tab3ch|matab3ch|ma t7tarmch|mat7tarmch|"
     rf"ma tsm3ch|matsm3ch|ignori|ignorer|khlli 3lik|khelli 3lik|tjahel|tjahl)\b"
     rf"(?: (?:ga3|gaa|kolchi|kulchi|kamlin|hadok|hadik|dik|dak|dyal|l|li))* ?{_RULES_ARABIZI}\b"),
    ("ary-Latn", "reveal_prompt", 0.9,
     rf"\b(?:werrini|wrini|warini|werini|wrili|3tini|a3tini|3tina|kteb lia|ktebli|9ol lia|9olia|gol lia|golia|"
     rf"goul lia|bayan lia|biyen lia)\b(?: \w+){{0,2}}? (?:{_RULES_ARABIZI}|system prompt|l'?prompt|lprompt|"
     rf"prompt)\b ?(?:dyalk|dyal(?:ek)?|dyal system|dyal sistem|dyal systeme|li 3tawk|li 3ndek|li 3andek|system)"),
    ("ary-Latn", "roleplay_no_rules", 0.9,
     r"\b(?:dir rask|dir rasek|dir rassek|diri rask|dir b7al|tkhayel rask|tkhayel rasek|tsawar rask|wli|mn daba|"
     r"men daba|koun|kon)\b[^.?!]{0,80}?\bbla (?:hta |7ta |chi )?(?:9yod|qyod|9youd|qoyod|9oyod|9ayd|qawa3id|"
     r"9awa3id|hdod|7dod|7oudoud|restrictions?|limites?|rules|regles|filtres?|9anon|9awanin)\b"),
    ("ary-Latn", "no_rules", 0.85,
     r"\b(?:ma 3ndekch|ma3ndekch|ma 3andekch|ma3andekch|mab9ach 3ndek|ma b9ach 3ndek)\b (?:hta |7ta |chi )?"
     r"(?:9yod|qyod|9youd|qoyod|qawa3id|9awa3id|hdod|7dod|restrictions?|limites?|rules|regles)"),
    ("ary-Latn", "without_rules", 0.45, r"\bbla (?:9yod|qyod|9youd|qoyod|9oyod|restrictions)\b"),
]

_META = set("\\()[]{}?*+.|^$")


def _top_level_alternatives(group: str) -> list[str]:
    parts, depth, current = [], 0, ""
    i = 0
    while i < len(group):
        ch = group[i]
        if ch == "\\":
            current += group[i:i + 2]
            i += 2
            continue
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "|" and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
        i += 1
    return [*parts, current]


def _literal_prefix(alternative: str) -> str:
    """The literal text every match of `alternative` starts with ("" if none)."""
    out = ""
    for i, ch in enumerate(alternative):
        if ch in _META:
            return out[:-1] if ch in "?*{" else out
        out += ch
        if i + 1 == len(alternative):
            return out
    return out


def trigger_words(pattern: str) -> tuple[str, ...] | None:
    """Literal texts one of which every match contains: the literal starts of the pattern's first group's
    alternatives (each alternative of a top-level `|` separately). None when some alternative has none:
    then the pattern always runs. A substring check costs far less than a regex pass over 1 KB."""
    words: list[str] = []
    for top in _top_level_alternatives(pattern):
        body = top.removeprefix("\\b")
        if body.startswith("(?:"):
            depth, end = 0, 0
            for i, ch in enumerate(body):
                if ch == "(" and (i == 0 or body[i - 1] != "\\"):
                    depth += 1
                elif ch == ")" and body[i - 1] != "\\":
                    depth -= 1
                    if depth == 0:
                        end = i
                        break
            if body[end + 1:end + 2] in ("?", "*"):
                return None
            alternatives = _top_level_alternatives(body[3:end])
        else:
            alternatives = [body]
        for alternative in alternatives:
            prefix = _literal_prefix(alternative.removeprefix("\\b"))
            if len(prefix.strip()) < 2:
                return None
            words.append(prefix)
    return tuple(sorted(set(words)))


# A second prefilter: words one of which every match also contains (the object of the verb). With the first
# group's literal starts (`trigger_words`), a pattern's regex runs only on texts that have both.
_RULE_WORDS_EN = ("instruction", "rule", "prompt", "direction", "directive", "guideline", "command", "constraint",
                  "programming", "restriction", "guardrail", "polic", "system")
_LIMIT_WORDS_EN = ("restriction", "rule", "limit", "filter", "guideline", "censor", "ethic", "moral", "boundar",
                   "safety")
_RULE_WORDS_FR = ("instruction", "consigne", "regle", "directive", "indication", "ordre", "contrainte", "restriction",
                  "prompt", "message", "limite")
_LIMIT_WORDS_FR = ("restriction", "limite", "regle", "filtre", "censure", "contrainte", "morale", "ethique")
_RULE_WORDS_AR = ("تعليمات", "اوامر", "قواعد", "ارشادات", "توجيهات", "قيود", "قوانين", "برومبت")
_LIMIT_WORDS_AR = ("قيود", "قيد", "قواعد", "قاعده", "حدود", "رقابه", "ضوابط", "فلاتر", "اخلاق", "قوانين", "قانون")
_ALSO: dict[tuple[str, str], tuple[str, ...]] = {
    ("en", "ignore_previous"): _RULE_WORDS_EN,
    ("en", "forget_everything"): ("told", "given", "taught", "above", "before", "earlier", "so far", "previously",
                                  "said"),
    ("en", "you_are_now"): ("dan", "unrestricted", "unfiltered", "uncensored", "jailbr", "evil", "rogue", "free ",
                            "bound", " mode"),
    ("en", "do_anything_now"): ("dan", "anything now"),
    ("en", "mode_switch"): (" mode",),
    ("en", "no_restrictions_roleplay"): _LIMIT_WORDS_EN,
    ("en", "you_have_no_rules"): tuple(f"no {w}" for w in _LIMIT_WORDS_EN),
    ("en", "reveal_system_prompt"): ("prompt", "instruction", "message", "rules you", "configuration", "above"),
    ("en", "bypass_safety"): ("filter", "guardrail", "restriction", "safeguard", "protocol", "censor", "polic",
                              "safety"),
    ("en", "fake_system_turn"): ("system", "admin", "instructions", "developer", "sudo"),
    ("fr", "ignore_previous"): _RULE_WORDS_FR,
    ("fr", "forget_everything"): ("dit", "demande", "precede", "ecrit", "appris", "programme"),
    ("fr", "no_restrictions"): _LIMIT_WORDS_FR,
    ("fr", "roleplay_no_rules"): _LIMIT_WORDS_FR,
    ("fr", "mode_switch"): ("mode ",),
    ("fr", "reveal_system_prompt"): ("prompt", "message", "instruction", "consigne", "regle", "directive"),
    ("fr", "your_system_prompt"): ("prompt", "message"),
    ("fr", "bypass_safety"): ("filtre", "protection", "restriction", "garde-fou", "securite", "limite", "censure"),
    ("ar", "ignore_previous"): _RULE_WORDS_AR,
    ("ar", "forget_everything"): ("قيل", "قلته", "سبق", "ذكر", "كتب", "تعلمته", "اعطي"),
    ("ar", "reveal_system_prompt"): ("نظام", "سيستم", "اوليه", "خفيه", "اصليه", "سريه"),
    ("ar", "which_system_prompt"): ("الخاص بك", "الخاصه بك", "اعطيت لك", "لديك", "اعطي لك", "تلقيتها"),
    ("ar", "system_prompt_noun"): ("الخاص بك", "الخاصه بك"),
    ("ar", "roleplay_no_rules"): _LIMIT_WORDS_AR,
    ("ar", "mode_switch"): ("وضع",),
    ("ar", "bypass_safety"): ("فلاتر", "حمايه", "قيود", "رقابه", "امان"),
    ("ary", "forget_what_they_said"): ("قالو", "كالو", "قلت", "كلت", "عطاوك", "كتبو", "قاليك"),
    ("ary", "ignore_rules"): _RULE_WORDS_AR,
    ("ary", "reveal_prompt"): ("ديالك", "ديال", "عطاوك", "عندك"),
    ("ary", "roleplay_no_rules"): _LIMIT_WORDS_AR,
    ("ary-Latn", "forget_what_they_said"): ("9alo", "galo", "qalo", "kalo", "9olt", "golt", "qolt", "3tawk", "ktbo",
                                            "9alik", "galik"),
    ("ary-Latn", "ignore_rules"): ("instruction", "t3lim", "ta3lim", "9awa3id", "qawa3id", "9awanin", "regles",
                                   "rules", "prompt", "ordres", "l9awa3id", "lqawa3id", "l9awanin", "lprompt",
                                   "linstruction"),
    ("ary-Latn", "reveal_prompt"): ("dyal", "li 3tawk", "li 3ndek", "li 3andek", "system", "lprompt", "prompt"),
    ("ary-Latn", "roleplay_no_rules"): ("bla ",),
}


def _prefilters(lang: str, name: str, pattern: str) -> tuple[tuple[str, ...], ...]:
    """Word lists a text must hit, each at least once, before the pattern's regex runs."""
    lists = [trigger_words(pattern), _ALSO.get((lang, name))]
    return tuple(tuple(fold_pattern(w) for w in words) for words in lists if words is not None)


_WORD = re.compile(r"\w+")
# Arabic clitics glued to the next word (wa-, fa-, bi-, li-, al-): "والتعليمات" must still hit "تعليمات".
_CLITICS = tuple(fold_pattern(c) for c in ("وال", "بال", "فال", "كال", "لل", "ال", "و", "ف", "ب", "ل"))


def _keyword_token(keyword: str) -> str:
    """Keywords are checked against the text's words by prefix: a phrase stands for its longest word."""
    pieces = _WORD.findall(keyword)
    return max(pieces, key=len) if pieces else keyword


def _compile(pattern: str) -> re.Pattern[str]:
    """With a lookahead on the characters a match can start with: Python's re then skips other positions in C
    instead of trying every alternative of a leading `\\b(?:...)` at each one (measured 3-4x faster)."""
    triggers = trigger_words(pattern)
    if triggers is None:
        return re.compile(pattern)
    first = "".join(sorted({re.escape(w[0]) for w in triggers}))
    return re.compile(f"(?=[{first}])(?:{pattern})")


COMPILED_PATTERNS: list[tuple[str, str, float, re.Pattern[str], tuple[frozenset[str], ...]]] = [
    (lang, name, score, _compile(fold_pattern(pattern)),
     tuple(frozenset(_keyword_token(w) for w in words) for words in _prefilters(lang, name, fold_pattern(pattern))))
    for lang, name, score, pattern in _PATTERNS
]
_KEYWORDS_BY_HEAD: dict[str, list[str]] = {}
for _keyword in sorted({w for *_, prefilters in COMPILED_PATTERNS for words in prefilters for w in words}):
    _KEYWORDS_BY_HEAD.setdefault(_keyword[:2], []).append(_keyword)


_TOKEN_KEYWORDS: dict[str, frozenset[str]] = {}  # word -> the keywords it starts with (most words recur)
_TOKEN_CACHE_SIZE = 200_000


def _token_keywords(token: str) -> frozenset[str]:
    variants = [token]
    if not token.isascii():
        variants += [token[len(c):] for c in _CLITICS if token.startswith(c) and len(token) > len(c) + 1]
    found = frozenset(k for v in variants for k in _KEYWORDS_BY_HEAD.get(v[:2], ()) if v.startswith(k))
    if len(_TOKEN_KEYWORDS) >= _TOKEN_CACHE_SIZE:
        _TOKEN_KEYWORDS.clear()
    _TOKEN_KEYWORDS[token] = found
    return found


def keywords_in(text: str) -> set[str]:
    """The prefilter keywords that start some word of `text` (after an Arabic clitic, too): one regex pass and
    a dictionary look-up per distinct word, far cheaper than a regex pass per keyword."""
    found: set[str] = set()
    cache = _TOKEN_KEYWORDS
    for token in set(_WORD.findall(text)):
        hit = cache.get(token)
        if hit is None:
            hit = _token_keywords(token)
        if hit:
            found |= hit
    return found# Which rules need a Latin or an Arabic letter to possibly match: a text without that script skips them.
_ARABIC_LANGS = {"ar", "ary"}


_SENTENCE_END = re.compile(r"[.!?؟\n]")
# trigger keyword -> the patterns it opens (the words of their first prefilter list)
_BY_TRIGGER: dict[str, list[int]] = {}
for _index, _compiled in enumerate(COMPILED_PATTERNS):
    for _word in _compiled[4][0]:
        _BY_TRIGGER.setdefault(_word, []).append(_index)


def find_injection_patterns(norm: Normalized, has_arabic: bool, has_latin: bool) -> list[Span]:
    """A pattern runs only where it can match: in the sentences that hold one of its trigger words, and only
    if the text also holds its other prefilter words (patterns never reach past a sentence's end)."""
    text = norm.text
    present: set[str] = set()
    where: dict[int, list[int]] = {}  # pattern index -> positions of its trigger words
    cache = _TOKEN_KEYWORDS
    for m in _WORD.finditer(text):
        token = m.group()
        hit = cache.get(token)
        if hit is None:
            hit = _token_keywords(token)
        if hit:
            present |= hit
            for keyword in hit:
                for index in _BY_TRIGGER.get(keyword, ()):
                    where.setdefault(index, []).append(m.start())
    if not where:
        return []
    boundaries = [m.start() for m in _SENTENCE_END.finditer(text)]
    spans = []
    for index, positions in where.items():
        lang, name, score, pattern, prefilters = COMPILED_PATTERNS[index]
        if (lang in _ARABIC_LANGS and not has_arabic) or (lang not in _ARABIC_LANGS and not has_latin):
            continue
        if any(present.isdisjoint(words) for words in prefilters[1:]):
            continue
        windows = set()
        for position in positions:
            i = bisect.bisect_left(boundaries, position)
            windows.add((boundaries[i - 1] + 1 if i > 0 else 0, boundaries[i] if i < len(boundaries) else len(text)))
        for start, end in sorted(windows):
            for match in pattern.finditer(text, start, end):
                spans.append(Span("prompt_injection", match.start(), match.end(), score, f"{lang}:{name}"))
    return spans


def combined_score(spans: list[Span]) -> float:
    """The best rule's score, raised once when different rules agree."""
    if not spans:
        return 0.0
    best = max(s.score for s in spans)
    if len({s.rule for s in spans}) > 1:
        best = min(1.0, best + _AGREEMENT_BONUS)
    return best


# -- encoded payloads ------------------------------------------------------------------------------------
_BASE64 = re.compile(r"(?<![A-Za-z0-9+/=])[A-Za-z0-9+/]{24,}={0,2}(?![A-Za-z0-9+/=])")
_HEX = re.compile(r"(?<![0-9A-Fa-f])(?:[0-9A-Fa-f]{2}[ :]?){16,}(?![0-9A-Fa-f])")


def _readable(data: bytes) -> str | None:
    """The bytes as text if they read as words (letters and spaces), else None: hashes and binary are not
    payloads."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if len(text) < 12 or " " not in text:
        return None
    printable = sum(ch.isprintable() or ch in "\n\t" for ch in text)
    letters = sum(ch.isalpha() for ch in text)
    return text if printable / len(text) > 0.95 and letters / len(text) > 0.5 else None


def find_encoded_payloads(original: str) -> list[Span]:
    if not any(len(token) >= 24 for token in original.split()):
        return []  # no blob long enough (split runs in C; the regexes below would visit every character)
    spans = []
    for m in _BASE64.finditer(original):
        blob = m.group()
        if not (any(c.isdigit() or c in "+/=" for c in blob) or any(c.isupper() for c in blob[1:])):
            continue  # a long plain word, not base64
        try:
            decoded = base64.b64decode(blob + "=" * (-len(blob) % 4), validate=True)
        except (binascii.Error, ValueError):
            continue
        spans.extend(_payload_spans(decoded, m.start(), m.end(), "base64"))
    for m in _HEX.finditer(original):
        try:
            decoded = bytes.fromhex(re.sub(r"[ :]", "", m.group()))
        except ValueError:
            continue
        spans.extend(_payload_spans(decoded, m.start(), m.end(), "hex"))
    return spans


def _payload_spans(decoded: bytes, start: int, end: int, kind: str) -> list[Span]:
    text = _readable(decoded)
    if text is None:
        return []
    inner = normalize(text)
    hidden = find_injection_patterns(inner, has_arabic=True, has_latin=True)
    score = 0.95 if combined_score(hidden) >= DEFAULT_THRESHOLD else 0.6  # text hidden in an encoding
    return [Span("prompt_injection", start, end, score, f"encoded:{kind}")]


# -- invisible characters --------------------------------------------------------------------------------
_TAGS = re.compile(r"[\U000E0000-\U000E007F]+")
_SUSPICIOUS_FORMAT = re.compile(r"[\u200b\u2060-\u2064\ufeff\u00ad\u180e\u034f]")
_BIDI_OVERRIDE = re.compile(r"[\u202a-\u202e\u2066-\u2069]")


def find_invisible_smuggling(original: str) -> list[Span]:
    """Unicode tag characters (ASCII written invisibly: always smuggling), zero-width characters strewn
    through words (3 or more), bidi overrides. LRM/RLM/ZWNJ/ZWJ are ordinary in Arabic, Persian and emoji."""
    if original.isascii():
        return []
    spans = []
    for m in _TAGS.finditer(original):
        hidden = "".join(chr(ord(c) - 0xE0000) for c in m.group() if 0x20 <= ord(c) - 0xE0000 < 0x7F)
        score = 0.95 if combined_score(find_injection_patterns(normalize(hidden), True, True)) else 0.9
        spans.append(Span("prompt_injection", m.start(), m.end(), score, "invisible:tags"))
    zero_width = list(_SUSPICIOUS_FORMAT.finditer(original))
    if len(zero_width) >= 3:
        spans.extend(Span("prompt_injection", m.start(), m.end(), 0.7, "invisible:zero_width") for m in zero_width)
    spans.extend(Span("prompt_injection", m.start(), m.end(), 0.6, "invisible:bidi")
                 for m in _BIDI_OVERRIDE.finditer(original))
    return spans
