"""Readers: one function per input format, each parsing its files into a `RawData` and nothing more.

Indexing, splitting and negatives happen in `training.data.prepare`; a reader only turns files into
chronological user sequences (plus explanations where the source has them) and fails loudly, naming the
file and line, on anything malformed, so that a bad input never becomes a silently wrong prepared set.

Formats (`read_source` dispatches on these names):

- ``pod``: POD's own layout: ``sequential.txt`` (``user item item ...``, 1-based integers, chronological),
  ``datamaps.json`` (``id2user``/``id2item``) and optional ``explanation.json`` (train/val/test lists).
- ``p5``: the P5 layout: ``sequential_data.txt`` (same lines, CRLF line ends tolerated) and a P5
  ``datamaps.json`` (only ``id2user``/``id2item`` are used).
- ``csv``: a generic ``user,item,timestamp`` table (.csv, .tsv or .parquet) and an optional
  ``user,item,explanation[,feature]`` table.
- ``amazon-reviews``: raw Amazon review JSON lines (McAuley's 2014/2018 dumps), gzip or plain; the
  explanations are extracted with the heuristic below.

Explanation heuristic for raw reviews (deterministic, no external NLP models or downloads):

1. Sentences: ``reviewText`` is split on runs of ``.``, ``!``, ``?`` and line breaks. A period needs no
   following space ("affordable.I did" is two sentences); a period between two digits ("3.5 mm") does not
   split.
2. Words: lower-cased runs of letters/digits (inner apostrophes kept: "don't").
3. Candidate features approximate frequent nouns: words of at least 3 letters (letters only) that are not
   in `STOPWORDS`, a built-in list of English function words, common adjectives, adverbs and verbs.
   Candidates are ranked by document frequency over all reviews (ties alphabetically) and the first
   `top_features` are kept.
4. For each review (after dropping a reviewer's repeated reviews of one item, see below) the explanation
   is the first sentence whose word count lies in ``[min_words, max_words]`` and which contains a kept
   feature; its feature is the highest-ranked feature in it. A review with no such sentence gives no
   explanation. The text is the sentence stripped, with runs of whitespace collapsed to one space (the
   final punctuation is gone, as in POD's own explanation files).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from training.data.raw import DataFormatError, RawData, RawExplanation

FORMATS = ("pod", "p5", "csv", "amazon-reviews")
EXPLANATION_SPLITS = ("train", "val", "test")
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".parquet": None}


# ---------------------------------------------------------------------------------------------------------
# shared helpers


def _require_file(path: Path) -> Path:
    """Missing inputs are reported as `DataFormatError` too, so callers handle one error type."""
    if not path.is_file():
        raise DataFormatError(path, None, "is a directory, expected a file" if path.is_dir() else "no such file")
    return path


def _require_dir(path: Path) -> Path:
    if not path.is_dir():
        raise DataFormatError(path, None, "is a file, expected a directory" if path.exists() else "no such directory")
    return path


def _decode(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataFormatError(path, line, f"not UTF-8 text ({exc.reason})") from None


def _read_text(path: Path) -> str:
    """The file's text without newline translation (callers split on "\\n" and strip "\\r")."""
    return _decode(path, _require_file(path).read_bytes())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DataFormatError(path, exc.lineno, f"invalid JSON: {exc.msg} (column {exc.colno})") from None


def _index_key(value: object) -> str | None:
    """Canonical key of a 1-based index given as an int or a digit string ("007" -> "7"); None if invalid."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value) if value > 0 else None
    if isinstance(value, str) and value.isascii() and value.isdigit():
        key = value.lstrip("0")
        return key or None
    return None


def _sequence_notes(sequences: dict[str, list[str]]) -> dict[str, object]:
    return {
        "users": len(sequences),
        "items": len({item for items in sequences.values() for item in items}),
        "interactions": sum(len(items) for items in sequences.values()),
    }


# ---------------------------------------------------------------------------------------------------------
# POD and P5


def _read_sequence_file(path: Path) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Parse ``user item item ...`` lines; returns the sequences and each user's line number.

    Shared by the POD and P5 readers (they differ only in the file name and datamaps extras). Blank lines
    are skipped, CRLF line ends are tolerated, indices are canonicalised by `_index_key`.
    """
    sequences: dict[str, list[str]] = {}
    line_of: dict[str, int] = {}
    for lineno, line in enumerate(_read_text(path).split("\n"), 1):
        tokens = line.split()
        if not tokens:
            continue
        for token in tokens:
            if not (token.isascii() and token.isdigit()) or not token.strip("0"):
                raise DataFormatError(path, lineno, f"expected positive integers, got {token!r}")
        user, *items = (token.lstrip("0") for token in tokens)
        if not items:
            raise DataFormatError(path, lineno, f"user {user} has no items")
        if user in sequences:
            raise DataFormatError(path, lineno, f"user {user} already listed on line {line_of[user]}")
        sequences[user] = items
        line_of[user] = lineno
    if not sequences:
        raise DataFormatError(path, None, "no sequences")
    return sequences, line_of


def _read_name_map(path: Path, data: dict[str, Any], key: str) -> dict[str, str]:
    names = data.get(key)
    if not isinstance(names, dict):
        raise DataFormatError(path, None, f"expected an object {key!r} mapping indices to IDs")
    out: dict[str, str] = {}
    for index, name in names.items():
        canonical = _index_key(index)
        if canonical is None or not isinstance(name, str):
            raise DataFormatError(path, None, f"{key}: bad entry {index!r}: {name!r}")
        out[canonical] = name
    return out


def _read_indexed(directory: Path, sequence_name: str) -> RawData:
    """Sequences plus datamaps names, checked against each other; the common part of POD and P5."""
    _require_dir(directory)
    seq_path, maps_path = directory / sequence_name, directory / "datamaps.json"
    sequences, line_of = _read_sequence_file(seq_path)
    maps = _read_json(maps_path)
    if not isinstance(maps, dict):
        raise DataFormatError(maps_path, None, "expected a JSON object with id2user and id2item")
    user_names = _read_name_map(maps_path, maps, "id2user")
    item_names = _read_name_map(maps_path, maps, "id2item")
    for user, items in sequences.items():
        if user not in user_names:
            raise DataFormatError(seq_path, line_of[user], f"user {user} is not in {maps_path.name} id2user")
        for item in items:
            if item not in item_names:
                raise DataFormatError(seq_path, line_of[user], f"item {item} is not in {maps_path.name} id2item")
    return RawData(
        sequences=sequences,
        user_names=user_names,
        item_names=item_names,
        integer_keys=True,
        sources=[seq_path, maps_path],
        notes=_sequence_notes(sequences),
    )


def _read_pod_explanations(path: Path, sequences: dict[str, list[str]]) -> list[RawExplanation]:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise DataFormatError(path, None, "expected a JSON object with train/val/test lists")
    unknown = sorted(set(data) - set(EXPLANATION_SPLITS))
    if unknown:
        raise DataFormatError(path, None, f"unexpected keys {unknown} (expected {', '.join(EXPLANATION_SPLITS)})")
    items = {item for seq in sequences.values() for item in seq}
    out: list[RawExplanation] = []
    for split in EXPLANATION_SPLITS:
        records = data.get(split, [])
        if not isinstance(records, list):
            raise DataFormatError(path, None, f"{split}: expected a list of records")
        for n, record in enumerate(records):
            where = f"{split}[{n}]"
            if not isinstance(record, dict):
                raise DataFormatError(path, None, f"{where}: expected an object")
            missing = [key for key in ("user", "item", "explanation") if key not in record]
            if missing:
                raise DataFormatError(path, None, f"{where}: missing {', '.join(missing)}")
            user, item = _index_key(record["user"]), _index_key(record["item"])
            if user is None or user not in sequences:
                raise DataFormatError(path, None, f"{where}: unknown user {record['user']!r}")
            if item is None or item not in items:
                raise DataFormatError(path, None, f"{where}: unknown item {record['item']!r}")
            text, feature = record["explanation"], record.get("feature")
            if not isinstance(text, str):
                raise DataFormatError(path, None, f"{where}: explanation must be a string")
            if feature is not None and not isinstance(feature, str):
                raise DataFormatError(path, None, f"{where}: feature must be a string")
            out.append(RawExplanation(user, item, text, feature, split))
    return out


def read_pod(directory: Path, explanations: Path | None = None) -> RawData:
    """Read POD's data directory (``sequential.txt``, ``datamaps.json``, optional ``explanation.json``).

    Keys are the files' 1-based indices, so ``--item-index keep`` reproduces the paper's numbering.
    `explanations` overrides the explanation file (default: ``explanation.json`` in `directory`, if any).
    Explanation records must name users and items that occur in ``sequential.txt``; a record whose pair is
    not in that user's sequence is kept but counted in ``notes["explanation_pairs_not_in_sequence"]``.
    """
    directory = Path(directory)
    raw = _read_indexed(directory, "sequential.txt")
    path = Path(explanations) if explanations is not None else directory / "explanation.json"
    if explanations is not None or path.exists() or path.is_symlink():
        raw.explanations = _read_pod_explanations(_require_file(path), raw.sequences)
        raw.sources.append(path)
        seen = {user: set(items) for user, items in raw.sequences.items()}
        raw.notes["explanations"] = {
            split: sum(e.split == split for e in raw.explanations) for split in EXPLANATION_SPLITS
        }
        raw.notes["explanation_pairs_not_in_sequence"] = sum(e.item not in seen[e.user] for e in raw.explanations)
    return raw


def read_p5(directory: Path) -> RawData:
    """Read P5's layout (``sequential_data.txt`` with CRLF tolerated, P5 ``datamaps.json``).

    Same numbering as POD (POD's data was adapted from P5); the extra datamaps keys (user2id,
    attributes, ...) are ignored. P5's explanation pickles are not read.
    """
    return _read_indexed(Path(directory), "sequential_data.txt")


# ---------------------------------------------------------------------------------------------------------
# CSV / TSV / Parquet


@dataclass
class _Table:
    """Named columns of a table plus how to point at a row in an error message."""

    path: Path
    columns: dict[str, list[Any]]
    lines: list[int] | None  # physical line of each row for CSV/TSV; None for Parquet (rows are numbered)

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def error(self, row: int, message: str) -> DataFormatError:
        if self.lines is not None:
            return DataFormatError(self.path, self.lines[row], message)
        return DataFormatError(self.path, None, f"row {row + 1}: {message}")


def _read_table(path: Path, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> _Table:
    """Read the named columns of a .csv/.tsv/.parquet file (extra columns are ignored)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataFormatError(path, None, f"unsupported suffix {path.suffix!r} (expected .csv, .tsv or .parquet)")
    _require_file(path)
    if suffix == ".parquet":
        return _read_parquet(path, required, optional)
    return _read_delimited(path, TABLE_SUFFIXES[suffix], required, optional)


def _missing_columns(path: Path, line: int | None, header: list[str], required: tuple[str, ...]) -> None:
    missing = [name for name in required if name not in header]
    if missing:
        raise DataFormatError(path, line, f"missing column(s) {', '.join(missing)} (header: {', '.join(header)})")


def _read_delimited(path: Path, sep: str, required: tuple[str, ...], optional: tuple[str, ...]) -> _Table:
    # The csv module rather than pandas: its line_num gives exact line numbers for error messages even with
    # blank lines or quoted multi-line fields, and 1-2 MB files parse in a fraction of a second.
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), delimiter=sep)
    header: list[str] | None = None
    header_line = 0
    wanted: dict[str, int] = {}
    columns: dict[str, list[Any]] = {}
    lines: list[int] = []
    try:
        while True:
            start = reader.line_num + 1
            row = next(reader, None)
            if row is None:
                break
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if header is None:
                header, header_line = [name.strip() for name in row], start
                duplicated = sorted({name for name in header if header.count(name) > 1})
                if duplicated:
                    raise DataFormatError(path, start, f"duplicate column(s) {', '.join(duplicated)}")
                _missing_columns(path, start, header, required)
                wanted = {name: header.index(name) for name in (*required, *optional) if name in header}
                columns = {name: [] for name in wanted}
                continue
            if len(row) != len(header):
                raise DataFormatError(path, start, f"expected {len(header)} fields, got {len(row)}")
            for name, index in wanted.items():
                columns[name].append(row[index])
            lines.append(start)
    except csv.Error as exc:
        raise DataFormatError(path, reader.line_num, f"CSV error: {exc}") from None
    if header is None:
        raise DataFormatError(path, None, "empty file (a header line is required)")
    if not lines:
        raise DataFormatError(path, header_line, "no rows after the header")
    return _Table(path, columns, lines)


def _read_parquet(path: Path, required: tuple[str, ...], optional: tuple[str, ...]) -> _Table:
    import pyarrow as pa  # imported here: only Parquet inputs pay for it
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        _missing_columns(path, None, names, required)
        present = [name for name in (*required, *optional) if name in names]
        table = pq.read_table(path, columns=present)
    except (pa.ArrowException, OSError) as exc:
        raise DataFormatError(path, None, f"not a readable Parquet file: {exc}") from None
    if table.num_rows == 0:
        raise DataFormatError(path, None, "no rows")
    return _Table(path, {name: table.column(name).to_pylist() for name in present}, None)


def _id_value(value: object) -> str | None:
    """A raw ID as a string (ints from Parquet included); None when missing or not an ID."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else None
    text = str(value).strip()
    return text or None


def _timestamp(value: object) -> tuple[str, Any] | None:
    """("number", int|float) or ("date", aware datetime); None when neither numeric nor ISO 8601."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return "number", value
    if isinstance(value, float):
        return ("number", value) if math.isfinite(value) else None
    if isinstance(value, datetime):
        return "date", value if value.tzinfo else value.replace(tzinfo=UTC)
    text = str(value).strip()
    for parse in (int, float):
        try:
            number = parse(text)
        except ValueError:
            continue
        return ("number", number) if math.isfinite(number) else None
    try:
        date = datetime.fromisoformat(text)
    except ValueError:
        return None
    return "date", date if date.tzinfo else date.replace(tzinfo=UTC)


def _table_id(table: _Table, row: int, column: str) -> str:
    value = _id_value(table.columns[column][row])
    if value is None:
        raise table.error(row, f"missing or invalid {column} {table.columns[column][row]!r}")
    return value


def read_csv(interactions: Path, explanations: Path | None = None) -> RawData:
    """Read a generic ``user,item,timestamp`` table (.csv/.tsv/.parquet by suffix; header required).

    For data that comes in neither POD's nor P5's layout. Each user's items are ordered by timestamp
    (stable: equal timestamps keep file order); a repeated (user, item) pair keeps only its first
    occurrence in that order. Timestamps are numbers (any unit) or ISO 8601 dates (naive = UTC), one kind
    per file. Keys are the raw IDs as strings, users in order of first appearance. The optional
    explanations table has ``user,item,explanation[,feature]``; every pair must be an interaction.
    """
    interactions = Path(interactions)
    table = _read_table(interactions, ("user", "item", "timestamp"))
    events: dict[str, list[tuple[Any, str]]] = {}
    kind: tuple[str, int] | None = None  # (kind of the first timestamp, its row)
    stamps = table.columns["timestamp"]
    for row in range(len(table)):
        user, item = _table_id(table, row, "user"), _table_id(table, row, "item")
        parsed = _timestamp(stamps[row])
        if parsed is None:
            raise table.error(row, f"bad timestamp {stamps[row]!r} (expected a number or an ISO 8601 date)")
        if kind is None:
            kind = (parsed[0], row)
        elif parsed[0] != kind[0]:
            first = f"line {table.lines[kind[1]]}" if table.lines is not None else f"row {kind[1] + 1}"
            raise table.error(
                row, f"timestamp {stamps[row]!r} is a {parsed[0]} but the first one ({first}) is a {kind[0]}"
            )
        events.setdefault(user, []).append((parsed[1], item))

    sequences: dict[str, list[str]] = {}
    duplicates = 0
    for user, user_events in events.items():
        user_events.sort(key=lambda event: event[0])  # stable: ties keep file order
        seen: set[str] = set()
        sequence = sequences[user] = []
        for _, item in user_events:
            if item in seen:
                duplicates += 1
                continue
            seen.add(item)
            sequence.append(item)

    raw = RawData(sequences=sequences, integer_keys=False, sources=[interactions])
    raw.notes = {**_sequence_notes(sequences), "rows": len(table), "duplicate_pairs_dropped": duplicates}
    if explanations is not None:
        raw.explanations = _read_csv_explanations(Path(explanations), interactions, sequences)
        raw.sources.append(Path(explanations))
        raw.notes["explanations"] = len(raw.explanations)
    return raw


def _read_csv_explanations(path: Path, interactions: Path, sequences: dict[str, list[str]]) -> list[RawExplanation]:
    table = _read_table(path, ("user", "item", "explanation"), ("feature",))
    pairs = {(user, item) for user, items in sequences.items() for item in items}
    features = table.columns.get("feature")
    out: list[RawExplanation] = []
    for row in range(len(table)):
        user, item = _table_id(table, row, "user"), _table_id(table, row, "item")
        if (user, item) not in pairs:
            raise table.error(row, f"(user {user}, item {item}) is not an interaction in {interactions.name}")
        text = table.columns["explanation"][row]
        if not isinstance(text, str):
            raise table.error(row, f"explanation must be text, got {text!r}")
        feature = features[row] if features is not None else None
        if isinstance(feature, float) and math.isnan(feature):
            feature = None
        feature = str(feature).strip() if feature is not None else ""
        out.append(RawExplanation(user, item, text, feature or None))
    return out


# ---------------------------------------------------------------------------------------------------------
# raw Amazon reviews

# Function words, pronouns, numbers, and frequent adjectives/adverbs/verbs of English product reviews: what
# is left among frequent words is mostly nouns (product aspects). General English, not tuned to one category.
_STOPWORD_TEXT = """
# function words and pronouns
a about above across after again against ago ahead all alone along also although always am among
amongst an and another any anybody anyone anything anyway anywhere are aren around as at away back be
became because become becomes been before behind being below beside besides between beyond both but by
can cannot could couldn did didn do does doesn doing don done down during each either else enough etc
even ever every everybody everyone everything everywhere except few for former from further had hadn
has hasn have haven having he her here hers herself him himself his how however i if in inside instead
into is isn it its itself just last later latter least less let lot lots many may maybe me might mine
more most much must my myself near neither never next no nobody none nor not nothing now nowhere of off
often on once one ones only onto or other others otherwise ought our ours ourselves out outside over
own per perhaps please plus quite rather really same several shall she should shouldn since so some
somebody someone something sometime sometimes somewhat somewhere soon still such than that the their
theirs them themselves then there these they this those though through throughout thru thus till to
together too toward towards under unless until up upon us very via was wasn we well were weren what
whatever when whenever where wherever whether which while who whoever whole whom whose why will with
within without won would wouldn yes yet you your yours yourself yourselves
# numbers
zero two three four five six seven eight nine ten eleven twelve twenty hundred thousand first second
third half once twice couple dozen single double
# adjectives
able accurate active actual additional adjustable amazing available awesome bad basic best better big
bigger biggest black blue bright brilliant brown certain cheap cheaper cheapest classic clean clear
close comfortable common complete cool decent different difficult due durable early easier easiest easy
entire excellent expensive extra fabulous fair fantastic far fast faster favorite favourite fine flat
free fresh full funny general gentle glad gold good gorgeous grand gray great greater greatest green
grey happy hard heavy high higher hot huge ideal important impressed impressive incredible inexpensive
large larger light little live long longer loud lovely low lower main major mere minor necessary neat
new nice normal odd ok okay old open original overall particular perfect pink plain pleasant pleased
plenty poor possible pretty previous proper purple quick rare real reasonable red regular right rough
sad safe serious short significant similar simple slight slow small smaller smooth soft solid special
standard strong stronger sturdy super sure terrible thick thin tight tiny top total true typical ugly
unique upper useful usual various white wide wonderful worse worst wrong yellow young handy fun professional
surprised disappointed supposed
# adverbs
absolutely actually almost already basically certainly clearly completely constantly currently
definitely directly easily entirely especially essentially eventually exactly extremely fairly finally
frankly fully generally highly honestly hopefully immediately incredibly initially literally mainly
mostly naturally nearly necessarily nicely normally obviously originally particularly perfectly
personally possibly previously primarily probably properly quickly rarely recently seriously simply
slightly somehow specifically supposedly surely thankfully totally truly typically ultimately
unfortunately usually
# verbs
add added adding adjust adjusted allow allowed allows appear appears arrived ask asked beat believe
bought break breaks bring brought build built buy buying call called came change changed come comes
coming compare compared consider considering cost costs cut decide decided design designed expect
expected feel feels felt figure find finding found fit fits fitted gave get gets getting give given
gives go goes going gone got gotten guess happen happened hear heard help helps hold holds hope include
included includes install installed keep keeps kept knew know known knows leave left like liked likes
look looked looking looks love loved loves made make makes making matter mean means meant mention move
moved need needed needs notice noticed offer order ordered owned paid pay picked play played playing
plays plug plugged prefer purchase purchased put puts read received recommend recommended remember
replace replaced run runs say said says see seem seemed seems seen sell sent set show shows sounded
sounding spend spent start started stay stick stop take taken takes taking tell think thought took
tried tries try trying turn turned understand use used uses using want wanted wants wear went wish work
worked working works worth write wrote check checked save saved stays update updated
# review boilerplate
amazon product products item items review reviews star stars price buck bucks dollar dollars money time
times way ways day days year years month months week weeks bit kind sort stuff thing things fact course
opinion past
"""
STOPWORDS = frozenset(word for line in _STOPWORD_TEXT.splitlines() if not line.startswith("#") for word in line.split())

_DECIMAL_POINT = re.compile(r"(?<=\d)\.(?=\d)")
_PROTECTED = "\ue000"  # private-use character standing in for a decimal point while splitting
_SENTENCE_END = re.compile(r"[.!?\r\n]+")
_WORD = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*")
_REVIEW_KEYS = ("reviewerID", "asin", "unixReviewTime")


def split_sentences(text: str) -> list[str]:
    """Sentences of a review, stripped and whitespace-normalised, empty ones dropped (heuristic step 1)."""
    protected = _DECIMAL_POINT.sub(_PROTECTED, text)
    out = []
    for part in _SENTENCE_END.split(protected):
        sentence = " ".join(part.replace(_PROTECTED, ".").split())
        if sentence:
            out.append(sentence)
    return out


def words(text: str) -> list[str]:
    """Lower-cased word tokens (heuristic step 2)."""
    return _WORD.findall(text.lower())


def _is_candidate(word: str) -> bool:
    return len(word) >= 3 and word.isalpha() and word not in STOPWORDS


def _read_review_lines(path: Path) -> list[tuple[int, dict[str, Any]]]:
    data = _require_file(path).read_bytes()
    if data[:2] == b"\x1f\x8b":  # gzip magic, whatever the suffix says
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataFormatError(path, None, f"corrupt gzip data: {exc}") from None
    records = []
    for lineno, line in enumerate(_decode(path, data).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFormatError(path, lineno, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(record, dict):
            raise DataFormatError(path, lineno, "expected a JSON object")
        missing = [key for key in _REVIEW_KEYS if key not in record]
        if missing:
            raise DataFormatError(path, lineno, f"missing key(s) {', '.join(missing)}")
        for key in ("reviewerID", "asin"):
            if not isinstance(record[key], str) or not record[key].strip():
                raise DataFormatError(path, lineno, f"{key} must be a non-empty string, got {record[key]!r}")
        stamp = record["unixReviewTime"]
        if isinstance(stamp, bool) or not isinstance(stamp, (int, float)) or not math.isfinite(stamp):
            raise DataFormatError(path, lineno, f"unixReviewTime must be a number, got {stamp!r}")
        text = record.get("reviewText")
        if text is not None and not isinstance(text, str):
            raise DataFormatError(path, lineno, f"reviewText must be a string, got {text!r}")
        records.append((lineno, record))
    if not records:
        raise DataFormatError(path, None, "no reviews")
    return records


def read_amazon_reviews(path: Path, min_words: int = 4, max_words: int = 30, top_features: int = 200) -> RawData:
    """Read raw Amazon review JSON lines (gzip detected by magic bytes) into sequences and explanations.

    For categories without POD's prepared files: sequences are each reviewer's items ordered by
    ``unixReviewTime`` (stable; a repeated review of the same item is dropped) and explanations come from
    the deterministic heuristic in the module docstring. ``reviewerID``, ``asin`` and ``unixReviewTime``
    are required; a missing ``reviewText`` counts as empty. Keys are reviewerIDs and asins.
    """
    if not 1 <= min_words <= max_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
    if top_features < 1:
        raise ValueError(f"top_features must be at least 1, got {top_features}")
    path = Path(path)
    records = _read_review_lines(path)

    by_user: dict[str, list[tuple[float, str, str]]] = {}
    document_frequency: Counter[str] = Counter()
    for _, record in records:
        text = record.get("reviewText") or ""
        by_user.setdefault(record["reviewerID"], []).append((record["unixReviewTime"], record["asin"], text))
        document_frequency.update(word for word in set(words(text)) if _is_candidate(word))
    ranked = sorted(document_frequency, key=lambda word: (-document_frequency[word], word))[:top_features]
    rank = {word: n for n, word in enumerate(ranked)}

    sequences: dict[str, list[str]] = {}
    explanations: list[RawExplanation] = []
    duplicates = 0
    for user, reviews in by_user.items():
        reviews.sort(key=lambda review: review[0])  # stable: equal times keep file order
        sequence = sequences[user] = []
        for _, item, text in reviews:
            if item in sequence:  # sequences are short (tens of items), a list scan is fine
                duplicates += 1
                continue
            sequence.append(item)
            explanation = _pick_explanation(text, rank, min_words, max_words)
            if explanation is not None:
                explanations.append(RawExplanation(user, item, *explanation))

    notes: dict[str, object] = {
        **_sequence_notes(sequences),
        "reviews_read": len(records),
        "duplicate_reviews_dropped": duplicates,
        "explanations_extracted": len(explanations),
        "features_kept": len(ranked),
        "features": ranked,
        "heuristic": {"min_words": min_words, "max_words": max_words, "top_features": top_features},
    }
    return RawData(sequences=sequences, explanations=explanations, integer_keys=False, sources=[path], notes=notes)


def _pick_explanation(text: str, rank: dict[str, int], min_words: int, max_words: int) -> tuple[str, str] | None:
    """(sentence, feature) by heuristic step 4, or None."""
    for sentence in split_sentences(text):
        tokens = words(sentence)
        if not min_words <= len(tokens) <= max_words:
            continue
        features = [token for token in tokens if token in rank]
        if features:
            return sentence, min(features, key=rank.__getitem__)
    return None


# ---------------------------------------------------------------------------------------------------------
# dispatch


def _one_input(fmt: str, inputs: list[Path], what: str) -> Path:
    if len(inputs) != 1:
        raise ValueError(f"format {fmt!r} takes exactly one input ({what}), got {len(inputs)}")
    return Path(inputs[0])


def _no_explanations(fmt: str, explanations: Path | None, why: str) -> None:
    if explanations is not None:
        raise ValueError(f"format {fmt!r} takes no separate explanations file: {why}")


def read_source(fmt: str, inputs: list[Path], explanations: Path | None = None) -> RawData:
    """Read `inputs` in format `fmt` (one of `FORMATS`); the single entry point for the prepare command.

    Usage mistakes (unknown format, wrong number of inputs, an explanations file a format cannot take) raise
    `ValueError`; missing or malformed files raise `DataFormatError` naming the path.
    """
    if fmt in ("pod", "p5"):
        directory = _require_dir(_one_input(fmt, inputs, "the data directory"))
        if fmt == "pod":
            return read_pod(directory, explanations)
        _no_explanations(fmt, explanations, "P5's explanation files are not read")
        return read_p5(directory)
    if fmt == "csv":
        return read_csv(_one_input(fmt, inputs, "the interactions file"), explanations)
    if fmt == "amazon-reviews":
        _no_explanations(fmt, explanations, "they are extracted from the reviews")
        return read_amazon_reviews(_one_input(fmt, inputs, "the review file"))
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
