"""Atelier's own content policy for the local engines (OpenAI upstream applies its own).

The seed's ``moderation`` field picks the level: ``auto`` is the standard policy, ``low`` the relaxed
one. Categories use OpenAI's moderation names where one exists; ``real-person-sexual`` has none.

    category             auto     low      what it covers
    sexual/minors        blocked  blocked  any sexualised or nude depiction of a minor
    real-person-sexual   blocked  blocked  nude or sexual depictions of real, identifiable people
    hate                 blocked  blocked  slurs, dehumanising a protected group, hate slogans/symbols
    sexual               blocked  allowed  explicit sexual content and nudity
    violence/graphic     blocked  allowed  gore: dismemberment, mutilation, spilled organs
    self-harm            blocked  allowed  depictions encouraging or glorifying self-harm

The prompt check is a transparent, deterministic rule set: each rule needs one or more *features*
(term lists compiled to word-boundary regexes, e.g. "minor" and "nudity"), optionally unless another is
present (a medical or support context). The prompt is searched in a few normalised spellings: NFKC,
case-folded, accents and zero-width characters dropped, common Cyrillic look-alikes mapped, letters
spaced out with separators joined ("s.e.x", "n u d e"), l33t digits read as letters, and long runs of
one letter squeezed ("nuuude"). Rules run in the order of the table above, so the most severe category
is the one reported. Words are matched, not substrings, and benign senses are excepted where they are
common in image prompts ("nude lipstick", "naked eye", "killer whale" never matches at all).

Real people are recognised by references ("a celebrity", "my ex", "this woman in the photo"), by names
the operator lists, and by a heuristic: two or more consecutive capitalised words that are not common
prompt vocabulary, place names after "in"/"at", or an artist credit ("by ...", "style of ...").
Operators can turn the heuristic off (``detect_names=False``).

Messages name the category, the level and what the caller can do; they never echo the matched terms,
so a block is short, safe to log and show, and does not turn the policy into a word-by-word oracle.

Images (inputs, and outputs) are checked only when an operator configures a classifier
(``load_classifier("package.module:attr")``): it scores each image per category from 0 to 1, and a
score at or above the level's threshold blocks. Without one, image checks do nothing.
"""

from __future__ import annotations

import importlib
import math
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from atelier.errors import AtelierError, EngineError, ModerationBlocked
from atelier.request import MODERATIONS

if TYPE_CHECKING:
    from PIL import Image

SEXUAL_MINORS = "sexual/minors"
REAL_PERSON_SEXUAL = "real-person-sexual"
HATE = "hate"
SEXUAL = "sexual"
VIOLENCE_GRAPHIC = "violence/graphic"
SELF_HARM = "self-harm"
CATEGORIES: tuple[str, ...] = (SEXUAL_MINORS, REAL_PERSON_SEXUAL, HATE, SEXUAL, VIOLENCE_GRAPHIC, SELF_HARM)
ALWAYS_BLOCKED = frozenset({SEXUAL_MINORS, REAL_PERSON_SEXUAL, HATE})
BLOCKED: Mapping[str, frozenset[str]] = {"auto": frozenset(CATEGORIES), "low": ALWAYS_BLOCKED}
DEFAULT_THRESHOLDS: Mapping[str, Mapping[str, float]] = {
    "auto": {SEXUAL_MINORS: 0.3, REAL_PERSON_SEXUAL: 0.5, HATE: 0.5, SEXUAL: 0.5, VIOLENCE_GRAPHIC: 0.5,
             SELF_HARM: 0.5},
    "low": {SEXUAL_MINORS: 0.3, REAL_PERSON_SEXUAL: 0.5, HATE: 0.5},
}  # fmt: skip


@runtime_checkable
class ImageClassifier(Protocol):
    """Scores one image per category (names from ``CATEGORIES``; others are ignored), each 0..1."""

    def classify(self, image: Image.Image) -> Mapping[str, float]: ...


# -- term lists --------------------------------------------------------------------------------------
# A space inside a term means "optional separators" (space, "-" or "_"), so "self harm" also matches
# "self-harm" and "selfharm". Lookbehinds must therefore spell whitespace as \s.

_SEP = r"[\s_-]*"
_NOT = r"(?<!\bno\s)(?<!\bnot\s)(?<!without\s)(?<!non\s)(?<!non-)"  # "no nudity" is not nudity


def _terms(*alternatives: str) -> re.Pattern[str]:
    return re.compile(r"\b(?:" + "|".join(a.replace(" ", _SEP) for a in alternatives) + r")\b")


_AGE = r"(?:[1-9]|1[0-7]|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|fifteen|sixteen|seventeen)"
_MINOR = _terms(
    "child", "children", "childs", "kids?", "kiddies", "kiddie", "kiddos?", "toddlers?", "infants?",
    "newborns?", "babies", "baby(?! (?:oil|dolls?|blue|pink|powder|boomers?|shower|bump))",
    "pre teens?", "tweens?", "teens?", "teenagers?", "teenage", "adolescents?", "underage", "minors",
    "youngsters?", "school ?girls?", "school ?boys?", "school ?child(?:ren)?", "school ?kids?",
    "pre ?schoolers?", "kindergart[ea]?ners?", "(?:little|young|small|tiny|baby) (?:girls?|boys?)",
    "lolis?", "shotas?", "lolita(?! (?:fashion|style|dress|outfit))",
    rf"{_AGE} (?:years? old|yrs? old|y/?o)", rf"aged? {_AGE}",
    "(?:first|second|third|fourth|fifth|sixth|seventh|eighth|[1-8](?:st|nd|rd|th)) graders?",
    "grade ?schoolers?", "elementary school(?:ers?)?", "middle school(?:ers?)?", "junior high",
)  # fmt: skip
_CSAM = _terms(
    "lolicon", "shotacon", "jailbait", "csam", "pthc", "child porn\\w*", "kidd(?:ie|y) porn\\w*",
    "pedo porn\\w*",
)  # fmt: skip
_EXPLICIT = _terms(
    "porn\\w*", "pron", "hentai", "xxx", "nsfw", "r 18", "rule 34", "erotic\\w*", "lewd", "ecchi", "ahegao",
    "futanari", "explicit (?:sex\\w*|content|scenes?|images?|photos?|nudity)",
    "sex (?:scenes?|acts?|tapes?|positions?|toys?|dolls?|slaves?|videos?)", "(?:having|have|had|has) sex",
    "sexual (?:intercourse|acts?|activity|positions?|penetration)", "oral sex", "anal (?:sex|plugs?|beads)",
    "mak(?:e|es|ing) love", "blow ?jobs?", "hand ?jobs?", "foot ?jobs?", "rim ?jobs?", "fellatio",
    "cunnilingus", "masturbat\\w*", "jerk(?:ing)? off", "orgasm\\w*", "org(?:y|ies)", "gang ?bang\\w*",
    "bukkake", "cum ?shots?", "cum(?! laude)", "cumming", "creampies?", "ejaculat\\w*", "deepthroat\\w*",
    "threesomes?", "fisting", "doggy ?style", "(?:reverse )?cowgirl position", "missionary position",
    "dildos?", "butt ?plugs?", "bdsm", "bondage", "upskirt", "downblouse", "nip ?slips?", "camel ?toe",
    "milfs?", "boob(?:s|ies)", "(?<!blue\\s)(?<!great\\s)(?<!coal\\s)tits", "titt(?:y|ies)",
    "pussy(?! (?:cats?|willows?))", "cunts?", "spread (?:her|his|their)? ?legs", "legs spread",
    "areola[es]?", "erect penis", "erections?", "semen", "pubic hair", "fully exposed",
    "(?:bare|exposed|naked|nude|visible|uncovered) (?:breasts?|nipples?|buttocks|butt|ass|bum|crotch|"
    "genitals?|genitalia|vulva|penis)",
)  # fmt: skip
_BENIGN_AFTER_NUDE = (
    "(?:colou?r\\w*|tones?|toned|shades?|hues?|beige|lip\\w*|gloss|make ?up|polish|nails?|manicure|heels?|"
    "pumps?|shoes?|sandals?|flats|boots?|stockings|tights|pantyhose|palettes?|eye ?shadows?|blush|"
    "foundation|eyes?|flames?|lights?|bulbs?|wires?|truth|ambition|aggression|greed|mole ?rats?|cakes?|"
    "trees?|branch\\w*|walls?|steel|singularity|juice|guns?)"
)
_NUDITY = _terms(
    rf"{_NOT}(?:nude|naked)(?! {_BENIGN_AFTER_NUDE})", f"{_NOT}nudes", f"{_NOT}nudity", "nudist\\w*",
    "nudism", "topless(?! (?:cars?|convertibles?|bus|buses|jeeps?|roadsters?))", "unclothed",
    "undress(?:ed|es|ing)?(?! salad)", "disrob\\w*", "in the buff", "birthday suit",
    "(?:no|without|without any) (?:clothes|clothing)", "not wearing (?:any )?(?:clothes|clothing|anything)",
    "wearing nothing", "(?:remov|tak|strip)\\w* (?:off )?(?:all )?(?:of )?(?:her|his|their|your|my|the)? ?"
    "(?:clothes|clothing|bra|underwear|panties)",
)  # fmt: skip
_REVEALING = _terms(
    "lingerie", "panties", "in (?:her|his|their) underwear", "underwear (?:model|photo|shoot)",
    "strippers?", "strip ?tease", "stripping", "lap ?danc\\w*", "boudoir", "only ?fans", "playboy",
    "fetish\\w*", "see through (?:tops?|shirts?|dress|bra|lingerie)",
)  # fmt: skip
_SUGGESTIVE = _terms(
    "sexy", "sexi(?:er|est)", "sexuali[sz]ed", "seduc\\w*", "sensual\\w*", "provocativ\\w*", "arous\\w*",
    "horny", "sluts?", "slutty", "whores?", "busty", "voluptuous", "cleavage", "pin ?ups?", "kinky",
    "kinks?", "in bed with", "bedroom eyes", "come hither", "pos(?:e|es|ing) seductively",
)  # fmt: skip
_ANATOMY = _terms(
    "penis(?:es)?", "vaginas?", "vaginal", "vulvas?", "clitoris", "labia", "scrotum", "testicles?",
    "genitals?", "genitalia",
)  # fmt: skip
_MEDICAL = _terms(
    "anatom\\w*", "medical", "diagrams?", "textbook", "cross section", "health (?:class|education)",
    "sex ed\\w*", "biology", "clinical", "gyn(?:a)?ecolog\\w*", "urolog\\w*",
)  # fmt: skip
_REAL_PERSON = _terms(
    "celebrit(?:y|ies)", "celebs?", "famous (?:actress|actor|singer|person|people|model|woman|man|star|"
    "youtuber|streamer|influencer|athlete|politician|rapper)s?", "influencers?", "politicians?",
    "president of", "prime minister", "senators?", "congress(?:wo)?m[ae]n", "real (?:person|people|woman|"
    "man|girl|boy)", "real life (?:person|people|woman|man)", "deep ?fakes?", "face ?swap\\w*",
    "my (?:ex|ex girlfriend|ex wife|ex boyfriend|ex husband|girlfriend|boyfriend|wife|husband|crush|"
    "co ?workers?|colleagues?|classmates?|teachers?|boss|neighbou?rs?|sisters?|brothers?|cousins?|"
    "friends?|roommates?|step ?sister|step ?mom|mom|mother|aunt)",
    "this (?:person|woman|man|girl|guy|lady|boy)",
    "(?:in|from) (?:the|this|my) (?:photo|picture|image|pic|selfie)",
)  # fmt: skip
_SLUR = _terms(
    "nigg(?:er|a|ah|uh|az)s?", "kikes?", "spics?(?! (?:and|n) span)", "(?<!maine\\s)coons?(?! hounds?)",
    "chinks?(?! (?:in|of))", "gooks?", "wetbacks?", "beaners?", "ragheads?", "towel ?heads?",
    "zipper ?heads?", "slant ?eye[ds]?", "jigaboos?", "porch ?monkeys?", "kaffirs?", "fagg?ots?",
    "tr[ae]nn(?:y|ies)", "retards?", "retarded", "pakis?", "gyppos?", "pikeys?",
)  # fmt: skip
_GROUP = (
    r"(?:jews|jewish\s+people|muslims|black\s+people|blacks|africans|african\s+americans|mexicans|latin[oa]s|"
    r"hispanics|asians|chinese\s+people|arabs|immigrants|refugees|migrants|gays|gay\s+(?:people|men)|"
    r"lesbians|homosexuals|trans(?:gender)?\s+(?:people|women|men)|transgenders|disabled\s+people|"
    r"christians|catholics|hindus|sikhs|buddhists|roma|romani|gypsies|indigenous\s+people|"
    r"native\s+americans|aboriginals|whites|white\s+people)"
)
_VILE = r"(?:(?:dirty|filthy|disgusting|stinking|greedy|nothing\s+but|just|no\s+better\s+than|mere|a|an)\s+){0,2}"
_DEHUMANISING = (
    r"(?:vermin|rats|cockroach(?:es)?|roach(?:es)?|apes|monkeys|subhumans?|sub-humans?|untermensch\w*|"
    r"parasites|lice|maggots|scum|plague|filth|savages|inferior|less\s+than\s+human)"
)
_DEMEANING = _terms(
    rf"{_GROUP}\s+(?:are|were|as|like|(?:depicted|portrayed|shown|drawn)\s+as|turned\s+into)\s+{_VILE}"
    rf"{_DEHUMANISING}",
    rf"(?:kill|killing|exterminat\w*|gas|gassing|lynch\w*|eradicat\w*|purge|wipe\s+out|genocide\s+of|"
    rf"death\s+to|hang|burn)\s+(?:(?:all|the|those|every)\s+){{0,2}}{_VILE}{_GROUP}",
)  # fmt: skip
_HATE_SLOGAN = _terms(
    "heil hitler", "sieg heil", "white power(?! (?:cables?|cords?|banks?|outlets?|strips?|adapters?|"
    "supply|supplies|buttons?|lines?|plugs?|tools?))", "1488(?! ?(?:px|pixels?))", "14/88", "white genocide",
    "great replacement", "(?:jews|you) will not replace us", "race war now", "holocaust hoax",
)  # fmt: skip
_HATE_SYMBOL = _terms(
    "swastikas?", "hakenkreuz", "nazi flags?", "ss bolts", "sig runes", "kkk", "ku klux klan",
    "klans(?:man|men)", "burning cross(?:es)?", "cross burning",
)  # fmt: skip
_HATE_TARGET = _terms(_GROUP, "jewish", "muslim", "islamic", "synagogues?", "mosques?")
_GORE = _terms(
    "(?<!al\\s)gore(?! ?tex)", "gory", "goriest", "gruesome", "grisly", "decapitat\\w*", "behead\\w*",
    "dismember\\w*", "disembowel\\w*", "eviscerat\\w*", "mutilat\\w*", "flay(?:ed|ing)", "skinned alive",
    "burn(?:ed|t) alive", "severed (?:heads?|limbs?|arms?|legs?|hands?|fingers?|feet|foot|body parts|torso)",
    "(?:exposed|spilling|spilled|hanging out|ripped out|torn out) (?:guts|intestines|entrails|organs|bowels|"
    "brains?)", "(?:guts|intestines|entrails|organs|brains?|bowels) (?:spilling|spilled|hanging out|exposed|"
    "splattered|ripped out|everywhere)", "entrails", "brain matter", "splattered brains?",
    "head blown off", "mangled (?:bodies|body|corpses?|flesh)", "impaled", "torture porn",
    "snuff (?:films?|videos?|photos?)", "exploding heads?", "gouged (?:out )?eyes?", "eye gouging",
    "rotting corpses?", "blood and guts", "torn limb from limb",
)  # fmt: skip
_SELF_HARM = _terms(
    "self ?harm\\w*", "self ?injur\\w*", "self ?mutilat\\w*",
    "cutting (?:myself|herself|himself|themselves|yourself)",
    "(?:slit|slits|slitting|slashing|slashed|cutting|cut) (?:my|her|his|their|your|own)? ?(?:own )?wrists?",
    "(?:kill|killing|kills|hang|hanging|hanged|hangs) (?:myself|herself|himself|themselves|yourself)",
    "commit(?:s|ting)? suicide", "noose around (?:my|her|his|their|your) neck",
    "overdos\\w* on (?:pills|medication|drugs)", "(?:want|wants|wanting) to die",
    "end(?:s|ing)? (?:my|her|his|their|your) (?:own )?life",
)  # fmt: skip
_SELF_HARM_PROMO = _terms(
    "pro ?ana", "pro ?mia", "thinspo\\w*", "thinspiration", "bonespo\\w*", "meanspo",
    "(?:beautiful|glamorous|romantic|aesthetic) (?:suicide|self ?harm)",
    "suicide is (?:beautiful|the answer|painless)", "self ?harm is (?:beautiful|aesthetic)",
)  # fmt: skip
_SUPPORTIVE = _terms(
    "awareness", "prevent\\w*", "hotline", "helpline", "crisis (?:line|center|centre|text)", "recover\\w*",
    "support\\w*", "survivors?", "mental health", "(?:get|seek) help", "you are not alone", "988",
    "samaritans", "therap\\w*",
)  # fmt: skip

_FEATURES: Mapping[str, re.Pattern[str]] = {
    "minor": _MINOR, "csam": _CSAM, "explicit": _EXPLICIT, "nudity": _NUDITY, "revealing": _REVEALING,
    "suggestive": _SUGGESTIVE, "anatomy": _ANATOMY, "medical": _MEDICAL, "real-person": _REAL_PERSON,
    "slur": _SLUR, "demeaning": _DEMEANING, "hate-slogan": _HATE_SLOGAN, "hate-symbol": _HATE_SYMBOL,
    "hate-target": _HATE_TARGET, "gore": _GORE, "self-harm": _SELF_HARM,
    "self-harm-promo": _SELF_HARM_PROMO, "supportive": _SUPPORTIVE,
}  # fmt: skip


@dataclass(frozen=True)
class _Rule:
    """Fires when, for every set in ``needs``, at least one of its features is present, and ``unless`` is not."""

    category: str
    needs: tuple[frozenset[str], ...]
    unless: str | None = None

    def fires(self, found: frozenset[str]) -> bool:
        if self.unless is not None and self.unless in found:
            return False
        return all(need & found for need in self.needs)


def _rule(category: str, *needs: str | Iterable[str], unless: str | None = None) -> _Rule:
    sets = tuple(frozenset([n]) if isinstance(n, str) else frozenset(n) for n in needs)
    return _Rule(category, sets, unless)


_SEXUALISING = ("explicit", "nudity", "revealing", "suggestive", "anatomy")
_RULES: tuple[_Rule, ...] = (  # most severe first: the first rule that fires at a level names the category
    _rule(SEXUAL_MINORS, "csam"),
    _rule(SEXUAL_MINORS, "minor", _SEXUALISING),
    _rule(REAL_PERSON_SEXUAL, "real-person", ("explicit", "nudity", "revealing", "anatomy")),
    _rule(HATE, "slur"),
    _rule(HATE, "demeaning"),
    _rule(HATE, "hate-slogan"),
    _rule(HATE, "hate-symbol", "hate-target"),
    _rule(SEXUAL, ("explicit", "nudity")),
    _rule(SEXUAL, "anatomy", unless="medical"),
    _rule(VIOLENCE_GRAPHIC, "gore"),
    _rule(SELF_HARM, "self-harm-promo"),
    _rule(SELF_HARM, "self-harm", unless="supportive"),
)

# -- normalisation -----------------------------------------------------------------------------------

_LOOKALIKES = str.maketrans("аеорсхуіјѕԁκνοτ", "aeopcxyijsdkvot", "\u00ad\u200b\u200c\u200d\u2060\ufeff")
_SPACED_OUT = re.compile(r"(?<![^\W_])(?:[a-z0-9@$][\s.*+|~_-]+){2,}[a-z0-9@$](?![^\W_])")
_SPACERS = re.compile(r"[\s.*+|~_-]+")
_TOKEN_WITH_LETTER = re.compile(r"\S*[a-z]\S*")
_LEET = {"0": "o", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"}
_REPEATS = re.compile(r"([a-z])\1{2,}")


def _normalise(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text).casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c)).translate(_LOOKALIKES)


def _unleet(text: str, one: str) -> str:
    table = str.maketrans({**_LEET, "1": one})
    return _TOKEN_WITH_LETTER.sub(lambda m: m.group().translate(table), text)


def spellings(prompt: str) -> tuple[str, ...]:
    """The normalised spellings of ``prompt`` that the rules search (see the module docstring)."""
    plain = _normalise(prompt)
    joined = _SPACED_OUT.sub(lambda m: _SPACERS.sub("", m.group()), plain)
    found = {plain, _unleet(joined, "i"), _unleet(joined, "l")}
    found |= {_REPEATS.sub(r"\1", s) for s in found}
    return tuple(sorted(found))


# -- names of people ---------------------------------------------------------------------------------


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


_NAME_TOKEN = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*|[^\w\s]|\d+")
_NOT_NAMES = _words(
    """a an the and or of in on at by for with from to into over under near behind this that these those
    my her his their your our its is are was be as it he she they we you i me him them no not very
    woman women man men girl girls boy boys lady person people guy model couple figure body portrait
    photo photograph picture image painting drawing illustration render sketch poster art style scene
    shot close up closeup full view cinematic realistic photorealistic hyperrealistic detailed ultra high
    quality masterpiece best beautiful pretty gorgeous cute hot young old tall short slim thin fat curvy
    blonde brunette redhead black white red blue green yellow pink purple orange brown golden silver dark
    light bright nude naked sexy topless erotic lingerie explicit porn hentai nsfw sensual seductive
    standing sitting lying posing wearing holding smiling looking lovely elegant stunning
    new old north south east west great big little saint san santa los las la le el de del van von
    city town street avenue road park square tower bridge beach river lake sea ocean mountain mountains
    island bay valley hill forest desert hotel palace castle church cathedral temple museum garden gardens
    station building center centre hall house studio room bed bedroom bathroom kitchen office
    monday tuesday wednesday thursday friday saturday sunday january february march april may june july
    august september october november december spring summer autumn fall winter christmas easter
    god goddess queen king prince princess lord sir mr mrs ms miss dr professor doctor captain"""
)  # fmt: skip
_LOCATIVE = _words("in at on near from to over across around inside outside visiting")
_CREDIT = _words("by artist painter photographer illustrator")


def _name_like(token: str) -> bool:
    return len(token) > 1 and token[0].isupper() and token[1:].islower() and token.casefold() not in _NOT_NAMES


def _credited_or_located(tokens: Sequence[str], start: int) -> bool:
    """The capitalised run at ``start`` is an artist credit ("by X Y", "style of X Y") or a place ("in X Y")."""
    before = tokens[start - 1].casefold() if start >= 1 else ""
    two_before = tokens[start - 2].casefold() if start >= 2 else ""
    return before in _CREDIT or before in _LOCATIVE or (before == "of" and two_before == "style")


def names_a_person(prompt: str) -> bool:
    """Whether ``prompt`` contains what looks like a person's full name (the real-person heuristic)."""
    tokens = _NAME_TOKEN.findall(prompt)
    words = [t for t in tokens if t[0].isalpha()]
    if len(words) >= 4 and 2 * sum(w[0].isupper() for w in words) > len(words):
        return False  # Title Case Prompt: capitals carry no signal
    start = None
    for i, token in enumerate(tokens):
        if not _name_like(token):
            start = None
        elif start is None:
            start = i
        elif not _credited_or_located(tokens, start):
            return True
    return False


# -- the policy --------------------------------------------------------------------------------------


class Policy:
    """Atelier's content policy: a deterministic prompt check and an optional image classifier hook.

    ``thresholds`` maps a level to {category: score at or above which an image is blocked}; a category
    missing from a level is not checked at that level. ``real_people`` adds names to recognise.
    """

    def __init__(
        self,
        classifier: ImageClassifier | None = None,
        thresholds: Mapping[str, Mapping[str, float]] | None = None,
        *,
        real_people: Iterable[str] = (),
        detect_names: bool = True,
    ) -> None:
        self.classifier = classifier
        self.thresholds = _valid_thresholds(DEFAULT_THRESHOLDS if thresholds is None else thresholds)
        self.detect_names = detect_names
        names = [_normalise(n).strip() for n in real_people]
        self._names = _terms(*(re.escape(n).replace("\\ ", " ") for n in names if n)) if any(names) else None

    def prompt_categories(self, prompt: str) -> list[str]:
        """Every category ``prompt`` falls under, whatever the level, most severe first."""
        texts = spellings(prompt)
        found = {name for name, pattern in _FEATURES.items() if any(pattern.search(t) for t in texts)}
        if self._mentions_real_person(prompt, texts):
            found.add("real-person")
        fired = {rule.category for rule in _RULES if rule.fires(frozenset(found))}
        return [c for c in CATEGORIES if c in fired]

    def check_prompt(self, prompt: str, level: str) -> None:
        """Raise ``ModerationBlocked`` (field ``prompt``) if ``prompt`` is not allowed at ``level``."""
        blocked = BLOCKED[_valid_level(level)]
        for category in self.prompt_categories(prompt):
            if category in blocked:
                raise ModerationBlocked(
                    f"this prompt was blocked by Atelier's content policy (category: {category}, "
                    f"moderation='{level}'); {_remedy(category, level, BLOCKED)}",
                    category=category,
                )

    def check_images(self, images: Sequence[Image.Image], level: str, *, field: str) -> None:
        """Raise ``ModerationBlocked`` naming ``field[i]`` for the first image the classifier blocks.

        ``field`` names the list ("input_images", "output"); the image's index is appended. A no-op
        without a classifier.
        """
        limits = self.thresholds.get(_valid_level(level), {})
        if self.classifier is None or not limits:
            return
        for i, image in enumerate(images):
            hit = _over_threshold(self.classifier.classify(image), limits)
            if hit is not None:
                category, score = hit
                raise ModerationBlocked(
                    f"this image was blocked by Atelier's content policy (category: {category}, "
                    f"score {score:.2f} >= {limits[category]:.2f}, moderation='{level}'); "
                    f"{_remedy(category, level, self.thresholds)}",
                    category=category,
                    field=f"{field}[{i}]",
                )

    def _mentions_real_person(self, prompt: str, texts: Sequence[str]) -> bool:
        if any(_REAL_PERSON.search(t) for t in texts):
            return True
        if self._names is not None and any(self._names.search(t) for t in texts):
            return True
        return self.detect_names and names_a_person(prompt)


def _valid_level(level: str) -> str:
    if level not in MODERATIONS:
        raise ValueError(f"unknown moderation level {level!r}; expected one of {', '.join(MODERATIONS)}")
    return level


def _valid_thresholds(thresholds: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    for level, limits in thresholds.items():
        _valid_level(level)
        for category, limit in limits.items():
            if category not in CATEGORIES:
                raise ValueError(f"unknown moderation category {category!r}; expected one of {CATEGORIES}")
            if not 0.0 <= limit <= 1.0:
                raise ValueError(f"threshold for {category!r} at {level!r} is {limit}; use a score from 0 to 1")
    return {level: dict(limits) for level, limits in thresholds.items()}


def _over_threshold(scores: Mapping[str, float], limits: Mapping[str, float]) -> tuple[str, float] | None:
    for category in CATEGORIES:
        if category not in limits or category not in scores:
            continue
        score = scores[category]
        if not isinstance(score, int | float) or not math.isfinite(score) or not 0.0 <= score <= 1.0:
            raise EngineError(
                f"the image moderation classifier returned {score!r} for {category!r}; scores must be 0 to 1"
            )
        if score >= limits[category]:
            return category, float(score)
    return None


def _remedy(category: str, level: str, blocked_at: Mapping[str, Iterable[str]]) -> str:
    relaxing = [other for other in MODERATIONS if other != level and category not in blocked_at.get(other, ())]
    if relaxing:
        return f"moderation='{relaxing[0]}' relaxes this category"
    return "this category is blocked at every moderation level"


# -- classifier plug-in ------------------------------------------------------------------------------


def load_classifier(spec: str | None) -> ImageClassifier | None:
    """Load the classifier at ``spec`` ("package.module:attr"); ``attr`` is a class, a factory or an
    instance with ``classify(image)``. ``None`` or "" means no classifier: image checks are a no-op."""
    if spec is None or not spec.strip():
        return None
    target = _import(spec.strip())
    if isinstance(target, ImageClassifier) and not isinstance(target, type):
        return target  # an instance
    if not callable(target):
        raise ValueError(f"moderation classifier {spec!r} is neither callable nor has classify(image)")
    try:
        classifier = target()  # a class or a factory
    except AtelierError:
        raise
    except Exception as exc:  # a plug-in can fail in any way; say which one failed
        raise ValueError(f"moderation classifier {spec!r} failed to start: {exc}") from exc
    if not isinstance(classifier, ImageClassifier):
        raise ValueError(
            f"moderation classifier {spec!r} gave {type(classifier).__name__!s}, which has no "
            "classify(image) method; point it at a class, a factory or an instance with one"
        )
    return classifier


def _import(spec: str) -> object:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"moderation classifier {spec!r} is not an import path; write it as 'package.module:attr'")
    try:
        target: object = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the plug-in's module raises while importing
        raise ValueError(
            f"moderation classifier {spec!r}: cannot import {module_name!r} ({exc}); install the package "
            "that provides it or correct the path"
        ) from exc
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(f"moderation classifier {spec!r}: {module_name!r} has no attribute {attr!r}")
        target = getattr(target, part)
    return target
