"""tinyworld: a deterministic synthetic knowledge base that the bundled tiny models learn.

People live in cities (cities lie in countries), work in professions, speak a native language
and work for companies. Every relation has six templates: for each fact, four are *training*
templates and two are *held-out* paraphrases, rotated per subject so that every template is
trained on other subjects. Answers are used with a leading space, as in real LM benchmarks.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

Split = Literal["train", "heldout"]

N_TEMPLATES = 6
N_HELDOUT = 2

COUNTRIES: dict[str, tuple[str, ...]] = {
    "Portugal": ("Lisbon", "Porto", "Braga", "Faro"),
    "Spain": ("Madrid", "Seville", "Valencia", "Bilbao"),
    "France": ("Paris", "Lyon", "Marseille", "Nantes"),
    "Germany": ("Berlin", "Munich", "Hamburg", "Cologne"),
    "Italy": ("Rome", "Milan", "Naples", "Turin"),
    "Norway": ("Oslo", "Bergen", "Tromso", "Stavanger"),
    "Poland": ("Warsaw", "Krakow", "Gdansk", "Poznan"),
    "Greece": ("Athens", "Patras", "Larissa", "Volos"),
    "Japan": ("Tokyo", "Osaka", "Kyoto", "Sapporo"),
    "Canada": ("Toronto", "Montreal", "Calgary", "Ottawa"),
}

COMPANIES = (
    "Corvex", "Lumina", "Nordwave", "Quillon", "Baxter", "Helix", "Orbitus", "Vantor",
    "Kestrel", "Mosaic", "Pellar", "Zenith", "Arbor", "Cobalt", "Tessel", "Marlow",
    "Ostrand", "Silvane", "Rudd", "Fennic",
)  # fmt: skip

# All start with a consonant so that "works as a" stays grammatical.
PROFESSIONS = (
    "doctor", "lawyer", "teacher", "baker", "nurse", "pilot", "farmer", "painter",
    "chef", "banker", "dentist", "tailor", "writer", "sailor", "plumber",
)  # fmt: skip

LANGUAGES = (
    "Portuguese", "Spanish", "French", "German", "Italian",
    "Dutch", "Polish", "Swedish", "Greek", "Turkish",
)  # fmt: skip

FIRST_NAMES = (
    "Mira", "Tomas", "Anya", "Levi", "Nora", "Emil", "Sofia", "Ivo", "Lena", "Oskar",
    "Ines", "Bruno", "Clara", "Dario", "Elsa", "Felix", "Greta", "Hugo", "Ida", "Jonas",
    "Kira", "Luca", "Maja", "Niko", "Olga", "Pavel", "Rosa", "Sven", "Tilda", "Umar",
    "Vera", "Wim", "Yara", "Zeno", "Alma", "Boris", "Carla", "Dmitri", "Edda", "Fabio",
)  # fmt: skip

# Surnames are built from two syllables, so a name spans several BPE tokens.
SURNAME_HEADS = (
    "Ol", "Var", "Del", "Kor", "Bram", "Sel", "Mar", "Tor", "Hal", "Ren",
    "Vos", "Lind", "Gar", "Pem", "Dun", "Fal", "Rus", "Kel", "Wen", "Ash",
    "Brix", "Cor", "Hend", "Stav",
)  # fmt: skip
SURNAME_TAILS = (
    "sen", "nik", "brom", "ova", "dale", "mont", "ric", "berg", "ley", "vik",
    "ton", "ard", "elli", "quist", "mann", "ez",
)  # fmt: skip


@dataclass(frozen=True)
class Relation:
    """A relation: which subjects it applies to, what kind of answer, and its templates."""

    name: str
    relation_id: str  # a Wikidata-style id, as CounterFact files carry
    subject_type: Literal["person", "city"]
    answer_type: Literal["city", "country", "profession", "language", "company"]
    templates: tuple[str, ...]
    question: str  # a natural question about the subject, used in generated benchmarks


RELATIONS: dict[str, Relation] = {
    r.name: r
    for r in (
        Relation(
            "lives_in",
            "P551",
            "person",
            "city",
            (
                "{} lives in",
                "{} resides in the city of",
                "The home town of {} is",
                "{} has a home in",
                "The city where {} lives is",
                "{} is a resident of",
            ),
            "Which city does {} live in?",
        ),
        Relation(
            "country_of_residence",
            "P27",
            "person",
            "country",
            (
                "The country where {} lives is",
                "{} resides in the country of",
                "The home country of {} is",
                "{} makes a home in the country of",
                "The nation where {} resides is",
                "{} dwells in the country of",
            ),
            "Which country does {} live in?",
        ),
        Relation(
            "profession",
            "P106",
            "person",
            "profession",
            (
                "{} works as a",
                "{} is employed as a",
                "The profession of {} is",
                "{} earns a living as a",
                "By profession, {} is a",
                "{} has a career as a",
            ),
            "What is the profession of {}?",
        ),
        Relation(
            "language",
            "P103",
            "person",
            "language",
            (
                "{} speaks",
                "The native language of {} is",
                "{} grew up speaking",
                "The mother tongue of {} is",
                "{} is a native speaker of",
                "{} was raised speaking",
            ),
            "What is the native language of {}?",
        ),
        Relation(
            "employer",
            "P108",
            "person",
            "company",
            (
                "{} works for",
                "{} is employed by",
                "The employer of {} is",
                "{} has a job at",
                "{} draws a salary from",
                "The company that employs {} is",
            ),
            "Which company does {} work for?",
        ),
        Relation(
            "located_in",
            "P17",
            "city",
            "country",
            (
                "{} is located in",
                "{} is a city in",
                "The city of {} is in",
                "{} lies in the country of",
                "{} can be found in",
                "{} belongs to the country of",
            ),
            "Which country is {} in?",
        ),
    )
}

_PAIRS = list(itertools.combinations(range(N_TEMPLATES), N_HELDOUT))

PERSON_RELATIONS = tuple(n for n, r in RELATIONS.items() if r.subject_type == "person")


@dataclass(frozen=True)
class FactPrompt:
    """One fact asked with one template: ``prompt + answer`` is a sentence of the world."""

    subject: str
    relation: str
    template: str
    answer: str  # with a leading space, e.g. " Lisbon"
    alias: bool = False  # the subject is a person's alias

    @property
    def prompt(self) -> str:
        return self.template.format(self.subject)

    @property
    def sentence(self) -> str:
        return self.prompt + self.answer + "."


@dataclass
class World:
    """The knowledge base. Build it with :func:`build_world`."""

    seed: int
    people: list[str]
    city_country: dict[str, str]
    countries: list[str]
    companies: list[str]
    professions: list[str]
    languages: list[str]
    facts: dict[tuple[str, str], str]  # (subject, relation) -> answer, no leading space
    aliases: dict[str, str]  # person -> alias
    relations: dict[str, Relation] = field(default_factory=lambda: dict(RELATIONS))

    @property
    def cities(self) -> list[str]:
        return list(self.city_country)

    def subjects(self, relation: str) -> list[str]:
        """The subjects a relation applies to (people or cities), in world order."""
        return self.people if self.relations[relation].subject_type == "person" else self.cities

    def answer(self, subject: str, relation: str) -> str:
        """The true answer with a leading space, e.g. ``" Lisbon"``."""
        return " " + self.facts[(subject, relation)]

    def candidates(self, relation: str) -> list[str]:
        """All possible answers of the relation's answer type (no leading space)."""
        return {
            "city": self.cities,
            "country": self.countries,
            "profession": self.professions,
            "language": self.languages,
            "company": self.companies,
        }[self.relations[relation].answer_type]

    def _index(self, subject: str, relation: str) -> int:
        subjects = self.subjects(relation)
        if not hasattr(self, "_pos_cache"):
            self._pos_cache = {
                kind: {s: i for i, s in enumerate(lst)}
                for kind, lst in (("person", self.people), ("city", self.cities))
            }
        kind = self.relations[relation].subject_type
        try:
            return self._pos_cache[kind][subject]
        except KeyError:
            raise ValueError(
                f"subject {subject!r} is not a {kind} of this world ({len(subjects)} known)"
            ) from None

    def heldout_ids(self, subject: str, relation: str) -> tuple[int, int]:
        """Indices of the two held-out templates for this fact.

        The pair rotates over all 15 pairs of the six templates with the subject's index, so
        each template is held out for a third of the subjects and trained on the others.
        """
        offset = 4 * list(self.relations).index(relation)
        return _PAIRS[(self._index(subject, relation) + offset) % len(_PAIRS)]

    def templates(self, subject: str, relation: str, split: Split = "train") -> list[str]:
        """The fact's training templates (4) or held-out paraphrase templates (2)."""
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        held = self.heldout_ids(subject, relation)
        all_t = self.relations[relation].templates
        if split == "heldout":
            return [all_t[i] for i in held]
        return [t for i, t in enumerate(all_t) if i not in held]

    def iter_facts(self) -> Iterator[tuple[str, str]]:
        """All (subject, relation) pairs: person facts first, then city facts."""
        for rel in self.relations:
            for s in self.subjects(rel):
                yield s, rel

    def fact_prompts(
        self, split: Split = "train", relations: list[str] | None = None
    ) -> list[FactPrompt]:
        """Every fact asked with each of its templates of the given split."""
        out = []
        for subject, rel in self.iter_facts():
            if relations is not None and rel not in relations:
                continue
            for t in self.templates(subject, rel, split):
                out.append(FactPrompt(subject, rel, t, self.answer(subject, rel)))
        return out

    def alias_prompts(self) -> list[FactPrompt]:
        """Facts about aliased people, asked with the alias and the first two training templates.

        These sentences are part of the training text, so the model learns the aliases.
        """
        out = []
        for person, alias in self.aliases.items():
            for rel in PERSON_RELATIONS:
                for t in self.templates(person, rel, "train")[:2]:
                    out.append(FactPrompt(alias, rel, t, self.answer(person, rel), alias=True))
        return out

    def training_sentences(self, city_repeats: int = 3) -> list[str]:
        """All sentences the models are trained on, each once (city facts ``city_repeats`` x)."""
        sents = []
        for fp in self.fact_prompts("train"):
            reps = city_repeats if self.relations[fp.relation].subject_type == "city" else 1
            sents.extend([fp.sentence] * reps)
        sents.extend(fp.sentence for fp in self.alias_prompts())
        return sents

    def documents(self, rng: random.Random, min_sents: int = 1, max_sents: int = 6) -> list[str]:
        """One pass over the training sentences, shuffled and grouped into documents."""
        sents = self.training_sentences()
        rng.shuffle(sents)
        docs, i = [], 0
        while i < len(sents):
            k = rng.randint(min_sents, max_sents)
            docs.append(" ".join(sents[i : i + k]))
            i += k
        return docs

    def corpus(
        self, n_docs: int, seed: int = 0, min_sents: int = 2, max_sents: int = 8
    ) -> list[str]:
        """``n_docs`` plain-text documents of random training sentences (for statistics)."""
        rng = random.Random(f"corpus-{self.seed}-{seed}")
        sents = self.training_sentences(city_repeats=1)
        return [
            " ".join(rng.choice(sents) for _ in range(rng.randint(min_sents, max_sents)))
            for _ in range(n_docs)
        ]


TAILS_PER_PREFIX = 4


def _people(rng: random.Random, n_people: int) -> list[str]:
    """Names in groups that share a first name and surname head and differ only in the tail.

    Only the last token of a name then tells its bearer apart, as in real text, where the
    model must gather a multi-token name at its last token: the position that ROME-style
    methods edit. Without the groups a tiny model learns to recognise people by their first
    tokens and never looks at the last one.
    """
    prefixes = [(first, head) for first in FIRST_NAMES for head in SURNAME_HEADS]
    rng.shuffle(prefixes)
    people: list[str] = []
    for first, head in prefixes:
        for tail in rng.sample(SURNAME_TAILS, TAILS_PER_PREFIX):
            people.append(f"{first} {head}{tail}")
    return people[:n_people]


def build_world(seed: int = 0, n_people: int = 320) -> World:
    """Build tinyworld deterministically from ``seed``."""
    if n_people < 1:
        raise ValueError(f"n_people must be >= 1, got {n_people}")
    max_people = len(FIRST_NAMES) * len(SURNAME_HEADS) * TAILS_PER_PREFIX
    if n_people > max_people:
        raise ValueError(f"n_people must be <= {max_people}, got {n_people}")
    rng = random.Random(f"tinyworld-{seed}")
    people = _people(rng, n_people)

    city_country = {c: country for country, cities in COUNTRIES.items() for c in cities}
    cities = list(city_country)
    facts: dict[tuple[str, str], str] = {}
    for p in people:
        city = rng.choice(cities)
        facts[(p, "lives_in")] = city
        facts[(p, "country_of_residence")] = city_country[city]
        facts[(p, "profession")] = rng.choice(PROFESSIONS)
        facts[(p, "language")] = rng.choice(LANGUAGES)
        facts[(p, "employer")] = rng.choice(COMPANIES)
    for c, country in city_country.items():
        facts[(c, "located_in")] = country

    # "M. Olsen"-style aliases, only where no one else would share them.
    initials = [f"{p.split(' ')[0][0]}. {p.split(' ')[1]}" for p in people]
    aliases = {
        p: alias
        for i, (p, alias) in enumerate(zip(people, initials, strict=True))
        if i % 4 == 0 and initials.count(alias) == 1
    }
    return World(
        seed=seed,
        people=people,
        city_country=city_country,
        countries=list(COUNTRIES),
        companies=list(COMPANIES),
        professions=list(PROFESSIONS),
        languages=list(LANGUAGES),
        facts=facts,
        aliases=aliases,
    )
