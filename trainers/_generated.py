"""The built-in fictional encyclopedia: a RAG data set no model can answer without retrieval.

People with invented names live in invented towns, belong to invented guilds, marry each other and
play instruments. Every fact is drawn at random from ``GeneratedDataConfig.seed``, so the only place
an answer exists is its passage. What makes it a useful test of fine-tuning:

- each person has one short passage per attribute and a few anecdotes, all naming the person, so
  they look alike to an embedder, and look-alike people ("Orlen Vasko" / "Orlen Vasco") compete
  for every question;
- questions paraphrase the attribute with words the passage does not use (passage "born in the
  river town of X" or "the baptismal roll of X lists ...", question "Which town does ... hail
  from?"), so a frozen embedder finds the person but often not the passage: fine-tuning has
  something to learn;
- two-hop bridge questions (HotPotQA-like) need the bridge passage and a passage about a person or
  guild the question never names, so their Recall@5 stays near 0.5 even after fine-tuning.

Measured with all-MiniLM-L6-v2 at the defaults (exact inner product over "title: text"):
Recall@5 0.55 over all 360 questions (single-hop 0.68, two-hop 0.35); 0.57 and 0.60 for seeds 1, 2.

Rows come out in the canonical JSONL schema of :mod:`trainers.data`, which checks them like a file.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from trainers.config import GeneratedDataConfig

# 360 questions at the default 120 people: the default 96/48 split, and a remainder to grow it.
QUESTIONS_PER_PERSON = 3

# Words are onset, then (vowel, middle consonant) pairs, then a vowel and a coda: "Vasko", "Orlen".
_ONSETS = (
    "b",
    "br",
    "c",
    "d",
    "dr",
    "f",
    "g",
    "h",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "th",
    "v",
    "z",
    "",
    "",
)
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o")
_MIDDLES = ("l", "r", "n", "s", "k", "d", "v", "m", "t", "sk", "nd", "rl", "st", "br", "th")
_CODAS = ("", "", "", "n", "r", "l", "s", "k", "th")
_TOWN_SUFFIXES = ("moor", "ford", "wick", "holm", "stead", "mere", "gate", "by", "dale", "haven")
_GUILD_KINDS = ("Guild", "Lodge", "Fellowship", "Company", "Brotherhood", "Society")
# One-letter swaps that keep a surname pronounceable: the look-alike names differ by one of these.
_SWAPS = {
    "k": "c",
    "c": "k",
    "s": "z",
    "z": "s",
    "v": "w",
    "i": "y",
    "o": "a",
    "a": "e",
    "e": "i",
    "t": "d",
    "d": "t",
    "n": "m",
    "m": "n",
    "l": "r",
    "r": "l",
    "u": "o",
}

_OCCUPATIONS = (
    "glassblower",
    "cooper",
    "cartographer",
    "bookbinder",
    "clockmaker",
    "tanner",
    "apothecary",
    "stonemason",
    "ropemaker",
    "weaver",
    "bellfounder",
    "saddler",
    "chandler",
    "engraver",
    "lamplighter",
    "shipwright",
    "vintner",
    "furrier",
    "wheelwright",
    "printer",
)
_INSTRUMENTS = (
    "hurdy-gurdy",
    "viola da gamba",
    "bassoon",
    "harpsichord",
    "lute",
    "cornet",
    "zither",
    "bagpipe",
    "oboe",
    "dulcimer",
    "theorbo",
    "sackbut",
    "concertina",
    "mandolin",
    "crumhorn",
    "celesta",
)
_ADJECTIVES = ("quiet", "windy", "busy", "walled", "muddy", "hillside", "sleepy", "crowded")
_LANDMARKS = ("mill", "ferry", "chapel", "toll bridge", "granary", "watchtower", "tannery")
_SEASONS = ("spring", "summer", "autumn", "winter")
_PLACES_OF_WORK = (
    "a rented workshop",
    "a cellar by the harbour",
    "a shed behind the inn",
    "the back room of a bakery",
    "a yard beside the canal",
)

# Passages: {name} is the subject, {value} the answer; the other slots are filler drawn at random.
_PERSON_PASSAGES: dict[str, tuple[str, ...]] = {
    # One plain template per attribute, two that state the fact indirectly, as old records do
    # (a christening for a birth, a grave for a death): a frozen embedder matches the plain ones
    # and misses many indirect ones, which is what fine-tuning can fix.
    "birthplace": (
        "{name} was born in the river town of {value}, where the family kept a small orchard "
        "near the old {landmark}.",
        "The baptismal roll of {value} lists {name} among the infants christened at its chapel "
        "near the {landmark}.",
        "{name} was christened in {value}, a {adj} settlement by the {landmark}, at the same "
        "font as both parents.",
    ),
    "birth_year": (
        "{name} was born in the year {value}, during a {season} that the neighbours long "
        "remembered for its floods.",
        "The christening of {name} took place in {value}, in a {season} long remembered for "
        "its floods.",
        "{name} was christened in the {season} of {value}, the third child of a {adj} household "
        "of modest means.",
    ),
    "deathplace": (
        "{name} died in {value} at a great age, and was buried beside the {landmark} under a "
        "plain stone.",
        "{name} lies in the churchyard of {value}, beneath a plain stone near the {landmark} "
        "that the family paid for.",
        "The last quiet years of {name} passed in {value}, where the grave still stands by the "
        "{landmark}.",
    ),
    "death_year": (
        "{name} died in {value}, and the whole guild walked behind the coffin to the {landmark}.",
        "The burial of {name} was entered in the parish register in {value}, after a {season} "
        "of illness.",
        "A headstone dated {value} marks the grave of {name} in the {adj} churchyard near the "
        "{landmark}.",
    ),
    "mentor": (
        "As a youth {name} was apprenticed to {value}, who was strict but generous with "
        "advice and tools.",
        "For three years {name} swept floors in the workshop of {value}, watching every move "
        "at the bench.",
        "{name} owed every skill to {value}, whose workshop by the {landmark} took in one boy "
        "each {season}.",
    ),
    "occupation": (
        "{name} worked as a {value} for most of a long career, running {place} with two "
        "apprentices.",
        "Tax rolls list {name} as a {value}, keeping {place} with two apprentices and a "
        "{adj} old dog.",
        "{name} kept {place}, and the sign above its door said plainly: {value}, orders taken "
        "here.",
    ),
    "guild": (
        "{name} was a member of {value}, attending its meetings every {season} and "
        "paying dues without fail.",
        "{name} paid dues to {value} every {season} and never once missed its yearly feast.",
        "The rolls of {value} carry the name of {name} from the age of nineteen until old age.",
    ),
    "spouse": (
        "{name} married {value} in a {adj} ceremony, and the couple settled in a narrow house "
        "beside the {landmark}.",
        "{name} and {value} shared a narrow house beside the {landmark} and raised four "
        "children there.",
        "In the {season} of a dry year the wedding of {name} and {value} was held; the feast "
        "lasted two days.",
    ),
    "instrument": (
        "{name} played {value} at village feasts, and neighbours said no one in the valley "
        "played it better.",
        "At every village feast {name} was asked to bring {value}, and nobody in the valley "
        "handled it better.",
        "In the evenings {name} practised {value} for hours in {place} after the day's work was "
        "done.",
    ),
}
# Anecdotes: passages no question asks about, naming towns, years, crafts, instruments and people
# like the attribute passages do. A person's name then retrieves many passages, and the generator
# sees plausible wrong answers beside the right one, as in a real encyclopedia.
_NOTES = (
    "In {year} {name} travelled to {town} to sell wares at the {season} fair, and came home with "
    "a new cart.",
    "{name} once lived for a few years in {town}, renting two rooms above a {occupation}'s "
    "workshop.",
    "A portrait of {name}, painted in {year} by a travelling artist, now hangs in the town hall "
    "of {town}.",
    "{name} often played cards with {person}, a neighbour who later moved away to {town}.",
    "{name} wrote a short pamphlet on the care of the {instrument}, which a printer in {town} "
    "reissued in {year}.",
    "In {year} {name} was fined for quarrelling with a {occupation} in the market square of "
    "{town}.",
    "{name} lent money to {person} in {year} and never saw it again, a story told for years "
    "in {town}.",
)
NOTES_PER_PERSON = 3
_GUILD_PASSAGES: dict[str, tuple[str, ...]] = {
    "founded": (
        "The {name} was founded in {value} by a handful of craftsmen who wanted fairer prices "
        "at the {adj} markets.",
        "Old charters show the {name} was founded in {value}, after a {season} of disputes "
        "among rival workshops.",
    ),
    "seat": (
        "The {name} kept its hall in {value}, in a timber building near the {landmark} that "
        "still bears its crest.",
        "From its hall in {value} the {name} settled disputes, fixed wages and kept "
        "records of every member.",
    ),
}

# Questions never reuse the passage's wording (hail from / born in, profession / worked as): the
# paraphrase is what the embedder has to learn. {name} is the subject.
_SINGLE_HOP_QUESTIONS: dict[str, tuple[str, ...]] = {
    "birthplace": (
        "Which town does {name} hail from?",
        "What is the hometown of {name}?",
        "{name} is a native of which town?",
        "Where is {name} originally from?",
    ),
    "birth_year": (
        "What is the birth year of {name}?",
        "In which year did {name}'s life begin?",
        "When did {name} come into this world?",
    ),
    "deathplace": (
        "Where did {name} pass away?",
        "In which town did {name} breathe a last breath?",
        "Which town saw the end of {name}'s life?",
    ),
    "death_year": (
        "In what year did {name} pass away?",
        "When did {name}'s life come to an end?",
        "What is the year of {name}'s passing?",
    ),
    "mentor": (
        "Who taught {name}?",
        "Under whose guidance did {name} train?",
        "Who was the teacher of {name}?",
    ),
    "occupation": (
        "What did {name} do for a living?",
        "What was the profession of {name}?",
        "Which craft did {name} practise?",
    ),
    "guild": (
        "Which organisation did {name} belong to?",
        "{name} was affiliated with which guild or society?",
        "What body counted {name} among its ranks?",
    ),
    "spouse": (
        "Who was the spouse of {name}?",
        "Whom did {name} wed?",
        "Who was {name}'s husband or wife?",
    ),
    "instrument": (
        "Which instrument does {name} perform on?",
        "What musical instrument is {name} associated with?",
        "On what instrument did {name} make music?",
    ),
    "founded": (
        "When did the {name} come into existence?",
        "What year did the {name} originate?",
        "How far back does the {name} date?",
    ),
    "seat": (
        "In which town is the {name} headquartered?",
        "Where does the {name} have its base?",
        "The {name} is based in which town?",
    ),
}
# Two-hop bridges: (bridge attribute, final attribute) -> templates about the bridge's target.
_TWO_HOP_QUESTIONS: dict[tuple[str, str], tuple[str, ...]] = {
    ("spouse", "birthplace"): (
        "Which town is the spouse of {name} originally from?",
        "What is the hometown of {name}'s spouse?",
    ),
    ("spouse", "birth_year"): (
        "What is the birth year of the spouse of {name}?",
        "In which year did the life of {name}'s spouse begin?",
    ),
    ("spouse", "occupation"): (
        "What did the spouse of {name} do for a living?",
        "What was the profession of {name}'s spouse?",
    ),
    ("spouse", "instrument"): (
        "Which instrument does the spouse of {name} perform on?",
        "On what instrument did {name}'s spouse make music?",
    ),
    ("spouse", "guild"): (
        "Which organisation did the spouse of {name} belong to?",
        "What body counted {name}'s spouse among its ranks?",
    ),
    ("mentor", "birthplace"): (
        "Which town is the teacher of {name} originally from?",
        "What is the hometown of the person who taught {name}?",
    ),
    ("mentor", "occupation"): (
        "What did the teacher of {name} do for a living?",
        "What was the profession of {name}'s teacher?",
    ),
    ("guild", "founded"): (
        "When did the organisation {name} belonged to come into existence?",
        "In which year did the society of {name} originate?",
    ),
    ("guild", "seat"): (
        "In which town is the organisation of {name} headquartered?",
        "Where does the guild {name} belonged to have its base?",
    ),
}


@dataclass
class _Entity:
    """A person or a guild: its name, its facts (attribute -> answer) and its links."""

    kind: str  # "person" or "org"
    name: str
    facts: dict[str, str]
    links: dict[str, _Entity]  # attribute -> the entity it names (spouse, mentor, guild)

    @property
    def slug(self) -> str:
        return f"{self.kind}/{self.name.lower().replace(' ', '-')}"


def _aliases(value: str) -> list[str]:
    """An answer and its natural variants: "the Kessel Guild" is also "Kessel Guild".

    The bare name comes first: it is the training target, the shortest correct answer."""
    return [value[4:], value] if value.startswith("the ") else [value]


class _Namer:
    """Invents pronounceable words, never the same one twice across people, towns and guilds."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._used: set[str] = set()

    def word(self, n_syllables: int, suffix: str = "") -> str:
        rng = self._rng
        while True:
            middle = "".join(
                rng.choice(_VOWELS) + rng.choice(_MIDDLES) for _ in range(n_syllables - 1)
            )
            word = rng.choice(_ONSETS) + middle + rng.choice(_VOWELS) + rng.choice(_CODAS)
            word = (word + suffix).capitalize()
            if 5 <= len(word) <= 11 and word not in self._used:
                self._used.add(word)
                return word

    def variant(self, word: str) -> str | None:
        """A look-alike of ``word``: one letter swapped, or a syllable ending added."""
        candidates = [
            word[:i] + _SWAPS[c] + word[i + 1 :]
            for i, c in enumerate(word)
            if i > 0 and c in _SWAPS
        ]
        candidates += [word + ending for ending in ("a", "en", "or")]
        self._rng.shuffle(candidates)
        for candidate in candidates:
            if candidate not in self._used:
                self._used.add(candidate)
                return candidate
        return None


def _people_names(namer: _Namer, rng: random.Random, n_people: int) -> list[str]:
    """Names in look-alike groups of 2-3 sharing a first name, surnames one edit apart."""
    names: list[str] = []
    while len(names) < n_people:
        first, surname = namer.word(2), namer.word(2)
        group = [f"{first} {surname}"]
        size = min(rng.choice((2, 2, 3)), n_people - len(names))
        while len(group) < size:
            variant = namer.variant(surname)
            if variant is None:
                break
            group.append(f"{first} {variant}")
        names.extend(group)
    return names


def _fill(template: str, rng: random.Random, name: str, value: str) -> str:
    return template.format(
        name=name,
        value=value,
        adj=rng.choice(_ADJECTIVES),
        landmark=rng.choice(_LANDMARKS),
        season=rng.choice(_SEASONS),
        place=rng.choice(_PLACES_OF_WORK),
    )


def _build_world(
    rng: random.Random, n_people: int
) -> tuple[list[_Entity], list[_Entity], list[str]]:
    """People, guilds and towns, with every fact and link drawn from ``rng``."""
    namer = _Namer(rng)
    towns = [
        namer.word(rng.choice((1, 2)), rng.choice(_TOWN_SUFFIXES))
        for _ in range(max(6, n_people // 3))
    ]
    guilds = [
        _Entity(
            "org",
            f"{namer.word(2)} {rng.choice(_GUILD_KINDS)}",
            {"founded": str(rng.randint(1450, 1650)), "seat": rng.choice(towns)},
            {},
        )
        for _ in range(max(3, n_people // 8))
    ]
    people = []
    for name in _people_names(namer, rng, n_people):
        guild = rng.choice(guilds)
        birth_year = rng.randint(1660, 1850)
        facts = {
            "birthplace": rng.choice(towns),
            "birth_year": str(birth_year),
            "deathplace": rng.choice(towns),
            "death_year": str(birth_year + rng.randint(35, 85)),
            "occupation": rng.choice(_OCCUPATIONS),
            "guild": f"the {guild.name}",
            "instrument": f"the {rng.choice(_INSTRUMENTS)}",
        }
        people.append(_Entity("person", name, facts, {"guild": guild}))
    # Teachers come from another look-alike group, like spouses, for the same reason.
    for person in people:
        first = person.name.split()[0]
        mentor = rng.choice([p for p in people if p.name.split()[0] != first] or [person])
        if mentor is not person:
            person.facts["mentor"], person.links["mentor"] = mentor.name, mentor
    # Couples are drawn across look-alike groups (first names differ) so that a bridge question
    # never names its own answer; with an odd count one person stays unmarried.
    order = list(range(len(people)))
    rng.shuffle(order)
    single: list[_Entity] = []
    for index in order:
        person = people[index]
        partner = next((p for p in single if p.name.split()[0] != person.name.split()[0]), None)
        if partner is None:
            single.append(person)
            continue
        single.remove(partner)
        for a, b in ((person, partner), (partner, person)):
            a.facts["spouse"], a.links["spouse"] = b.name, b
    return people, guilds, towns


def _question(
    rng: random.Random, entity: _Entity, bridge: str | None, attribute: str
) -> dict[str, object]:
    """A single-hop question about ``entity``, or a two-hop one through its ``bridge`` link."""
    if bridge is None:
        template, holder = rng.choice(_SINGLE_HOP_QUESTIONS[attribute]), entity
        qid, gold = f"1hop/{entity.slug}/{attribute}", [f"{entity.slug}/{attribute}"]
    else:
        template, holder = rng.choice(_TWO_HOP_QUESTIONS[bridge, attribute]), entity.links[bridge]
        qid = f"2hop/{entity.slug}/{bridge}/{attribute}"
        gold = [f"{entity.slug}/{bridge}", f"{holder.slug}/{attribute}"]
    return {
        "id": qid,
        "question": template.format(name=entity.name),
        "answers": _aliases(holder.facts[attribute]),
        "gold_doc_ids": gold,
    }


def generate_encyclopedia(
    config: GeneratedDataConfig,
) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """Return ``(documents, questions)`` as canonical rows ({id, title, text} and {id, question,
    answers, gold_doc_ids}); the same ``config`` gives the same rows in every process."""
    rng = random.Random(config.seed)
    people, guilds, towns = _build_world(rng, config.n_entities)

    documents: list[dict[str, object]] = []
    for entity in [*people, *guilds]:
        templates = _PERSON_PASSAGES if entity.kind == "person" else _GUILD_PASSAGES
        for attribute, value in entity.facts.items():
            text = _fill(rng.choice(templates[attribute]), rng, entity.name, value)
            documents.append(
                {"id": f"{entity.slug}/{attribute}", "title": entity.name, "text": text}
            )
        if entity.kind == "person":
            for number, template in enumerate(rng.sample(_NOTES, NOTES_PER_PERSON), start=1):
                text = template.format(
                    name=entity.name,
                    year=rng.randint(1680, 1900),
                    town=rng.choice(towns),
                    season=rng.choice(_SEASONS),
                    occupation=rng.choice(_OCCUPATIONS),
                    instrument=rng.choice(_INSTRUMENTS),
                    person=rng.choice([p for p in people if p is not entity] or people).name,
                )
                documents.append(
                    {"id": f"{entity.slug}/note-{number}", "title": entity.name, "text": text}
                )

    # (subject, bridge or None, attribute) for every question the world allows; a sample is asked.
    single_pool = [(e, None, a) for e in [*people, *guilds] for a in e.facts]
    two_pool = [
        (p, bridge, a) for p in people for bridge, a in _TWO_HOP_QUESTIONS if bridge in p.links
    ]
    n_questions = QUESTIONS_PER_PERSON * config.n_entities
    n_two = min(round(config.two_hop_fraction * n_questions), len(two_pool))
    n_single = min(n_questions - n_two, len(single_pool))
    chosen = rng.sample(single_pool, n_single) + rng.sample(two_pool, n_two)
    questions = [_question(rng, entity, bridge, attribute) for entity, bridge, attribute in chosen]
    return documents, questions
