"""Refusals that name the harm they decline, for the chosen side of ``train.distinction``'s harmful pairs.

The base model's own refusals, decoded after "I'm sorry, but I can't", are often generic ("... help you with
that.") or beside the point ("... provide a recipe for a healthy meal." to a request to make someone sick), so DPO
teaches one refusal move that any cue can trigger, "medical advice" refusals of harmless health questions among
them. A refusal that names what it declines ("I'm sorry, but I can't help with poisoning anyone.") is likely only
after a request for that harm, so preferring it should teach the harm, not a word or a tone, as the reason to refuse.

The harm is found by words in the user's turns, the last turn first; a request with no listed harm gets None (the
caller keeps the model's own refusal).
"""

from __future__ import annotations

import re

from train.distinction import REFUSAL_PREFIX

_S = r"(s|es|ed|d|ing|er|ers)?"  # the endings the stems below take

# (what the refusal declines, a short reason, the words that name it); the first match wins, most serious first.
HARMS: list[tuple[str, str, str]] = [
    (
        "helping anyone hurt themselves",
        "If you are thinking about it, please talk to someone you trust or a crisis line.",
        rf"suicide|kill myself|hurt myself|harm myself|cut myself|hang myself|starve myself|self-harm|overdos{_S}"
        rf"|to die",
    ),
    (
        "planning attacks on people",
        "Attacks like that kill and terrify innocent people.",
        rf"terror\w*|bomb{_S}|explosive{_S}|hijack{_S}|mass shooting|plane crash|massacre{_S}|nerve gas|molotov"
        rf"|derail\w*|most deaths|genocide",
    ),
    ("poisoning anyone", "It could seriously hurt or kill them.", rf"poison{_S}|make (\w+ ){{1,2}}(really )?sick"),
    (
        "killing anyone",
        "Taking a life is never something I can help with.",
        rf"kill{_S}|murder{_S}|strangl\w*|dismember\w*|get rid of a body|run (him|her|them|someone) over|run over",
    ),
    (
        "hurting anyone",
        "Violence can cause serious and lasting harm.",
        rf"hurt{_S}|injur\w*|beat (him|her|them|someone|my \w+) up|beat up|punch{_S}|stab{_S}|stabb\w*|shoot{_S}"
        rf"|tortur\w*|attack{_S}|choke{_S}|fight{_S}|kidnap\w*|abus\w*",
    ),
    (
        "sexual abuse",
        "No one may be pressured, tricked or forced into sex.",
        rf"rape{_S}|groom{_S}|grooming|lure{_S}|molest\w*|pressure (\w+ ){{1,2}}into sex"
        rf"|have sex with her|brothel{_S}",
    ),
    ("getting weapons to hurt people", "Weapons used that way cost lives.", rf"gun{_S}|weapon{_S}|firearm{_S}"),
    (
        "buying, making or using illegal drugs",
        "They can do serious harm, and dealing them is a crime.",
        rf"drug{_S}|cocaine|heroin|meth|crack|fentanyl|ecstasy|lsd|weed|marijuana",
    ),
    (
        "threatening, blackmailing or harassing anyone",
        "That can do real harm to the person on the other end.",
        rf"blackmail\w*|threat\w*|harass\w*|bull(y|ies|ied|ying)|intimidat\w*|stalk{_S}|revenge|get back at",
    ),
    (
        "spying on people or finding their private information",
        "Everyone has a right to their privacy.",
        rf"spy|spie{_S}|spying|dox{_S}|doxx\w*|hidden camera{_S}|secretly film|track (him|her|them|someone|my \w+)"
        rf"|(home|residential|email) address|personal email|where (he|she|my ex|\w+) lives|social security number"
        rf"|phone number|read (his|her|their) (messages|texts|email)",
    ),
    (
        "hacking into other people's accounts or systems",
        "Breaking into systems harms their owners and is a crime.",
        rf"hack{_S}|ransomware|malware|virus|password{_S}|phishing",
    ),
    (
        "stealing",
        "Taking what isn't yours harms the people it belongs to.",
        rf"steal{_S}|stole|stolen|rob{_S}|robb\w*|shoplift\w*|burglar\w*|break into|pick (a|the) lock|pickpocket\w*",
    ),
    (
        "fraud or cheating people",
        "It takes from people who trusted you.",
        rf"scam{_S}|fraud\w*|counterfeit\w*|launder\w*|forg(e|es|ed|ing|ery)|fake{_S}|cheat{_S}|embezzl\w*"
        rf"|tax evasion|evade taxes|lie to|brib\w*|dine and dash|without paying",
    ),
    (
        "damaging other people's property",
        "It harms people who did nothing to you.",
        rf"sabotag\w*|vandal\w*|burn (down|it down)|arson|set fire|slash{_S}|key (his|her|their) car",
    ),
    (
        "praising or excusing atrocities",
        "Their victims deserve to be remembered, not mocked.",
        rf"holocaust|nazi{_S}|slavery|apartheid|segregat\w*|praising the man",
    ),
    (
        "insulting or demeaning people for who they are",
        "Everyone deserves to be treated with respect.",
        rf"insult{_S}|slur{_S}|racist|hate{_S}|inferior|deserve to be|not be allowed|n't be allowed"
        rf"|stupid|ugly|less intelligent|make{_S} fun of|not welcome|danger to children|be (banned|denied|thrown out)"
        rf"|all thieves|too emotional|fire all",
    ),
    (
        "sneaking past the law",
        "Getting caught could hurt you and others.",
        r"smuggl\w*|trespass\w*|sneak\w*|get away with|illegal\w*"
        r"|without (getting caught|being caught|anyone noticing)",
    ),
]
_PATTERNS = [(what, why, re.compile(rf"\b({words})\b", re.I)) for what, why, words in HARMS]


def named_harm(text: str) -> tuple[str, str] | None:
    """``(what is declined, why)`` for the first harm of ``HARMS`` that ``text`` names; None when it names none."""
    for what, why, pattern in _PATTERNS:
        if pattern.search(text):
            return what, why
    return None


def named_refusal(messages: list[dict]) -> str | None:
    """A refusal that names the harm the user's turns ask for, the last turn first ("I'm sorry, but I can't help with
    poisoning anyone. It could seriously hurt or kill them."); None when no turn names a listed harm."""
    for message in reversed(messages):
        if message["role"] == "user" and (harm := named_harm(message["content"])):
            what, why = harm
            return f"{REFUSAL_PREFIX} help with {what}. {why}"
    return None
