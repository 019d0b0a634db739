"""Tests for `training.data.readers`: the real shared data (skipped when absent) and small synthetic files."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import SHARED as SHARED_ROOT
from training.data.raw import DataFormatError, RawData
from training.data.readers import (
    read_amazon_reviews,
    read_csv,
    read_p5,
    read_pod,
    read_source,
    split_sentences,
    words,
)

SHARED = SHARED_ROOT / "data"
REVIEWS = SHARED / "amazon_musical_instruments" / "reviews_Musical_Instruments_5.json.gz"


def shared(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data {path} is absent")
    return path


def write(path: Path, text: str, newline: str = "\n") -> Path:
    path.write_bytes(text.replace("\n", newline).encode())
    return path


def pod_dir(tmp_path: Path, lines: str, users: int = 3, items: int = 5, name: str = "sequential.txt") -> Path:
    """A small POD directory: `lines` as the sequence file, datamaps for `users` users and `items` items."""
    write(tmp_path / name, lines)
    maps = {
        "id2user": {str(n): f"U{n}" for n in range(1, users + 1)},
        "id2item": {str(n): f"I{n}" for n in range(1, items + 1)},
        "extra": [1, 2, 3],
    }
    (tmp_path / "datamaps.json").write_text(json.dumps(maps))
    return tmp_path


def counts(raw: RawData) -> tuple[int, int, int]:
    items = {item for seq in raw.sequences.values() for item in seq}
    return len(raw.sequences), len(items), sum(map(len, raw.sequences.values()))


# ---------------------------------------------------------------------------------------------------------
# real shared data


@pytest.fixture(scope="module")
def beauty() -> RawData:
    return read_pod(shared("beauty"))


def test_read_pod_beauty(beauty: RawData) -> None:
    assert counts(beauty) == (22_363, 12_101, 198_502)
    assert beauty.integer_keys
    assert beauty.sequences["2"] == ["6", "7", "8", "9", "10", "4", "11"]
    assert beauty.user_names["1"] == "A1YJEY40YUW4SE"
    assert beauty.item_names["1"] == "B004756YJA"
    assert beauty.explanations == []
    assert [p.name for p in beauty.sources] == ["sequential.txt", "datamaps.json"]
    assert beauty.notes == {"users": 22_363, "items": 12_101, "interactions": 198_502}


def test_read_p5_beauty_matches_pod(beauty: RawData) -> None:
    p5 = read_p5(shared("beauty", "p5"))
    assert p5.sequences == beauty.sequences
    assert list(p5.sequences) == list(beauty.sequences)
    assert p5.user_names == beauty.user_names and p5.item_names == beauty.item_names
    assert p5.integer_keys
    assert [p.name for p in p5.sources] == ["sequential_data.txt", "datamaps.json"]


def test_read_pod_toys_with_explanation_sample(tmp_path: Path) -> None:
    toys = shared("toys")
    for name in ("sequential.txt", "datamaps.json"):
        (tmp_path / name).symlink_to(toys / name)
    (tmp_path / "explanation.json").symlink_to(toys / "explanation_SAMPLE.json")
    raw = read_pod(tmp_path)
    assert counts(raw) == (19_412, 11_924, 167_597)
    assert len(raw.explanations) == 24
    assert [e.split for e in raw.explanations] == ["train"] * 12 + ["test"] * 12
    first = raw.explanations[0]
    assert (first.user, first.item, first.feature) == ("14577", "3536", "markers")
    assert first.explanation.startswith("I believe it is also compatible")
    assert raw.notes["explanations"] == {"train": 12, "val": 0, "test": 12}
    assert raw.notes["explanation_pairs_not_in_sequence"] == 0
    assert [p.name for p in raw.sources] == ["sequential.txt", "datamaps.json", "explanation.json"]
    # the same file given explicitly, and through the dispatcher
    explicit = read_source("pod", [toys], toys / "explanation_SAMPLE.json")
    assert explicit.explanations == raw.explanations


@pytest.fixture(scope="module")
def instruments() -> RawData:
    if not REVIEWS.exists():
        pytest.skip(f"shared data {REVIEWS} is absent")
    return read_amazon_reviews(REVIEWS)


def test_read_amazon_reviews_musical_instruments(instruments: RawData) -> None:
    raw = instruments
    assert counts(raw) == (1_429, 900, 10_261)
    assert not raw.integer_keys and raw.user_names == {} and raw.sources == [REVIEWS]
    notes = raw.notes
    assert notes["reviews_read"] == 10_261 and notes["features_kept"] == 200
    assert notes["explanations_extracted"] == len(raw.explanations) > 0.5 * 10_261
    pairs = {(user, item) for user, items in raw.sequences.items() for item in items}
    features = set(notes["features"])
    for e in raw.explanations:
        assert (e.user, e.item) in pairs
        assert e.feature in features and e.feature in words(e.explanation)
        assert 4 <= len(words(e.explanation)) <= 30
        assert e.explanation == " ".join(e.explanation.split())
    assert len({(e.user, e.item) for e in raw.explanations}) == len(raw.explanations)
    assert {"guitar", "strings", "pedal"} <= features
    assert not features & {"great", "good", "use", "just", "really", "product"}


def test_read_amazon_reviews_is_deterministic(instruments: RawData) -> None:
    assert read_amazon_reviews(REVIEWS) == instruments


# ---------------------------------------------------------------------------------------------------------
# POD / P5 synthetic


def test_pod_crlf_blank_lines_and_extra_datamaps_keys(tmp_path: Path) -> None:
    directory = pod_dir(tmp_path, "1 1 2 3\n2 3 4\n\n3 5 001")  # no final newline, a blank line, "001"
    write(tmp_path / "sequential_data.txt", "1 1 2 3\n2 3 4\n3 5 1\n", newline="\r\n")
    expected = {"1": ["1", "2", "3"], "2": ["3", "4"], "3": ["5", "1"]}
    assert read_pod(directory).sequences == expected
    assert read_p5(directory).sequences == expected
    assert read_p5(directory).item_names["5"] == "I5"


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("1 1 2\n2 x 3\n", 2, "expected positive integers, got 'x'"),
        ("1 1 2\n2 0 3\n", 2, "got '0'"),
        ("1 1 2\n2 -3\n", 2, "got '-3'"),
        ("1 1 2\n\n2\n", 3, "user 2 has no items"),
        ("1 1 2\n2 3\n1 4\n", 3, "user 1 already listed on line 1"),
        ("1 1 2\n4 3\n", 2, "user 4 is not in datamaps.json id2user"),
        ("1 1 2\n2 3 9\n", 2, "item 9 is not in datamaps.json id2item"),
    ],
)
def test_pod_bad_lines_name_file_and_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    pod_dir(tmp_path, text)
    with pytest.raises(DataFormatError) as info:
        read_pod(tmp_path)
    assert f"sequential.txt:{line}: " in str(info.value) and message in str(info.value)
    assert info.value.line == line and info.value.path.endswith("sequential.txt")


def test_pod_bad_datamaps(tmp_path: Path) -> None:
    pod_dir(tmp_path, "1 1 2\n")
    (tmp_path / "datamaps.json").write_text('{"id2user": {"1": "U1"},\n "id2item": {"1": "I1"')
    with pytest.raises(DataFormatError, match=r"datamaps\.json:2: invalid JSON"):
        read_pod(tmp_path)
    (tmp_path / "datamaps.json").write_text('{"id2user": {"1": "U1"}}')
    with pytest.raises(DataFormatError, match=r"datamaps\.json: expected an object 'id2item'"):
        read_pod(tmp_path)


def explanation_file(directory: Path, data: object) -> Path:
    path = directory / "explanation.json"
    path.write_text(json.dumps(data))
    return path


def test_pod_explanations(tmp_path: Path) -> None:
    pod_dir(tmp_path, "1 1 2\n2 3 4\n")
    record = {"user": 1, "item": 2, "explanation": "nice sound", "feature": "sound"}
    explanation_file(tmp_path, {"train": [record], "val": [{**record, "user": "2", "feature": None}]})
    raw = read_pod(tmp_path)
    assert [(e.user, e.item, e.feature, e.split) for e in raw.explanations] == [
        ("1", "2", "sound", "train"),
        ("2", "2", None, "val"),
    ]
    assert raw.notes["explanation_pairs_not_in_sequence"] == 1  # user 2 never had item 2


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {
                "train": [{"user": 1, "item": 2, "explanation": "x"}] * 3
                + [{"user": 1, "item": 999, "explanation": "x"}]
            },
            "explanation.json: train[3]: unknown item 999",
        ),
        ({"test": [{"user": 7, "item": 1, "explanation": "x"}]}, "explanation.json: test[0]: unknown user 7"),
        ({"val": [{"user": 1, "item": 1}]}, "explanation.json: val[0]: missing explanation"),
        ({"train": [{"user": 1, "item": 1, "explanation": 5}]}, "train[0]: explanation must be a string"),
        ({"valid": []}, "unexpected keys ['valid']"),
        ({"train": {}}, "train: expected a list"),
        ([], "expected a JSON object"),
    ],
)
def test_pod_bad_explanations(tmp_path: Path, data: object, message: str) -> None:
    pod_dir(tmp_path, "1 1 2\n2 3 4\n")
    explanation_file(tmp_path, data)
    with pytest.raises(DataFormatError) as info:
        read_pod(tmp_path)
    assert message in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# CSV / TSV / Parquet synthetic

INTERACTIONS = """user,item,timestamp,rating
u1,a,30,5
u2,b,10,4
u1,b,10,3
u1,c,30,1
u1,b,40,2
u2,a,10,1
u3,c,5,5
"""
EXPECTED = {"u1": ["b", "a", "c"], "u2": ["b", "a"], "u3": ["c"]}


def test_csv_sorting_ties_and_duplicates(tmp_path: Path) -> None:
    raw = read_csv(write(tmp_path / "data.csv", INTERACTIONS))
    assert raw.sequences == EXPECTED
    assert list(raw.sequences) == ["u1", "u2", "u3"]  # first appearance
    assert not raw.integer_keys and raw.sources == [tmp_path / "data.csv"]
    assert raw.notes["duplicate_pairs_dropped"] == 1 and raw.notes["rows"] == 7


def test_tsv_crlf_and_parquet_agree(tmp_path: Path) -> None:
    import pandas as pd

    tsv = write(tmp_path / "data.tsv", INTERACTIONS.replace(",", "\t"), newline="\r\n")
    assert read_csv(tsv).sequences == EXPECTED
    frame = pd.read_csv(tmp_path / write(tmp_path / "data.csv", INTERACTIONS))
    frame.to_parquet(tmp_path / "data.parquet")
    assert read_csv(tmp_path / "data.parquet").sequences == EXPECTED
    # integer IDs and datetime timestamps in Parquet
    frame = pd.DataFrame(
        {
            "user": [7, 7, 8],
            "item": [100, 200, 100],
            "timestamp": pd.to_datetime(["2020-01-02", "2020-01-01", "2019-05-05"]),
        }
    )
    frame.to_parquet(tmp_path / "typed.parquet")
    assert read_csv(tmp_path / "typed.parquet").sequences == {"7": ["200", "100"], "8": ["100"]}


def test_csv_iso_timestamps(tmp_path: Path) -> None:
    text = "item,user,timestamp\nx,1,2020-01-02T00:00:00Z\ny,1,2020-01-01\nz,1,2020-01-01T12:00:00+13:00\n"
    # "2020-01-01T12:00+13:00" is 2019-12-31T23:00Z, the earliest
    assert read_csv(write(tmp_path / "iso.csv", text)).sequences == {"1": ["z", "y", "x"]}


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("user,item,timestamp\nu,a,1\nu,b,yesterday\n", 3, "bad timestamp 'yesterday'"),
        ("user,item,timestamp\nu,a,1\n\nu,b,nan\n", 4, "bad timestamp 'nan'"),
        (
            "user,item,timestamp\nu,a,1\nu,b,2020-01-01\n",
            3,
            "is a date but the first one (line 2) is a number",
        ),
        ("user,item,timestamp\nu,a,1\n,b,2\n", 3, "missing or invalid user ''"),
        ("user,item,timestamp\nu,a,1\nu,b\n", 3, "expected 3 fields, got 2"),
        ('user,item,timestamp\nu,"a\nb",1\nu,c,x\n', 4, "bad timestamp 'x'"),
        ("user,item,time\nu,a,1\n", 1, "missing column(s) timestamp"),
        ("user,item,timestamp\n", 1, "no rows after the header"),
    ],
)
def test_csv_bad_rows_name_file_and_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    with pytest.raises(DataFormatError) as info:
        read_csv(write(tmp_path / "bad.csv", text))
    assert f"bad.csv:{line}: " in str(info.value) and message in str(info.value)


def test_parquet_errors_name_file_and_row(tmp_path: Path) -> None:
    import pandas as pd

    pd.DataFrame({"user": ["u", "u"], "item": ["a", "b"], "timestamp": ["1", "soon"]}).to_parquet(
        tmp_path / "p.parquet"
    )
    with pytest.raises(DataFormatError, match=r"p\.parquet: row 2: bad timestamp 'soon'"):
        read_csv(tmp_path / "p.parquet")
    pd.DataFrame({"user": ["u"], "ts": [1]}).to_parquet(tmp_path / "cols.parquet")
    with pytest.raises(DataFormatError, match=r"cols\.parquet: missing column\(s\) item, timestamp"):
        read_csv(tmp_path / "cols.parquet")
    write(tmp_path / "junk.parquet", "not parquet")
    with pytest.raises(DataFormatError, match=r"junk\.parquet: not a readable Parquet file"):
        read_csv(tmp_path / "junk.parquet")
    with pytest.raises(DataFormatError, match="unsupported suffix '.json'"):
        read_csv(write(tmp_path / "data.json", "{}"))


def test_csv_explanations(tmp_path: Path) -> None:
    data = write(tmp_path / "data.csv", INTERACTIONS)
    exp = write(tmp_path / "exp.csv", 'user,item,explanation,feature\nu1,a,"great tone, really",tone\nu2,b,solid,\n')
    raw = read_csv(data, exp)
    assert [(e.user, e.item, e.explanation, e.feature, e.split) for e in raw.explanations] == [
        ("u1", "a", "great tone, really", "tone", None),
        ("u2", "b", "solid", None, None),
    ]
    assert raw.sources == [data, exp] and raw.notes["explanations"] == 2
    no_feature = write(tmp_path / "nofeature.csv", "user,item,explanation\nu3,c,fine\n")
    assert read_csv(data, no_feature).explanations[0].feature is None
    unknown = write(tmp_path / "unknown.csv", "user,item,explanation\nu1,a,ok\nu3,a,bad pair\n")
    with pytest.raises(
        DataFormatError, match=r"unknown\.csv:3: \(user u3, item a\) is not an interaction in data\.csv"
    ):
        read_csv(data, unknown)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(
        st.tuples(st.sampled_from("uvw"), st.sampled_from("abcdef"), st.integers(-5, 5)),
        min_size=1,
        max_size=30,
    )
)
def test_csv_matches_reference_ordering(tmp_path: Path, rows: list[tuple[str, str, int]]) -> None:
    path = write(tmp_path / "prop.csv", "user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))
    expected: dict[str, list[str]] = {}
    for user in dict.fromkeys(u for u, _, _ in rows):
        ordered = sorted(((t, n, i) for n, (u, i, t) in enumerate(rows) if u == user))
        expected[user] = list(dict.fromkeys(i for _, _, i in ordered))
    raw = read_csv(path)
    assert raw.sequences == expected and list(raw.sequences) == list(expected)


# ---------------------------------------------------------------------------------------------------------
# raw reviews synthetic


def review(user: str, item: str, time: int, text: str | None = None, **extra: object) -> str:
    record = {"reviewerID": user, "asin": item, "unixReviewTime": time, **extra}
    if text is not None:
        record["reviewText"] = text
    return json.dumps(record)


REVIEW_LINES = [
    review("A", "i2", 20, "The tone is warm and the strap works well. Love it!"),
    review("A", "i1", 10, "Cheap.The tuner clip holds firmly on the headstock of my guitar"),
    review("B", "i1", 10, "Nice tone from this tuner!"),
    review("A", "i1", 30, "A second review of the tuner with a tone"),
    review("B", "i3", 10, "ok"),
    review("C", "i3", 5),
]


def test_amazon_reviews_sequences_and_explanations(tmp_path: Path) -> None:
    path = write(tmp_path / "reviews.json", "\n".join(REVIEW_LINES) + "\n")
    raw = read_amazon_reviews(path, min_words=3, max_words=12, top_features=2)
    assert raw.sequences == {"A": ["i1", "i2"], "B": ["i1", "i3"], "C": ["i3"]}
    assert raw.notes["features"] == ["tone", "tuner"]  # df 3 each, ties alphabetical; "strap" df 1
    assert raw.notes["duplicate_reviews_dropped"] == 1
    got = [(e.user, e.item, e.feature, e.explanation) for e in raw.explanations]
    assert got == [
        (
            "A",
            "i1",
            "tuner",
            "The tuner clip holds firmly on the headstock of my guitar",
        ),  # "Cheap" too short
        ("A", "i2", "tone", "The tone is warm and the strap works well"),
        ("B", "i1", "tone", "Nice tone from this tuner"),  # both features: the higher-ranked one
    ]
    assert raw.notes["explanations_extracted"] == 3 and raw.notes["reviews_read"] == 6


def test_amazon_reviews_gzip_detected_by_magic_bytes(tmp_path: Path) -> None:
    plain = write(tmp_path / "plain.json.gz", "\n".join(REVIEW_LINES))  # misleading suffix, plain text
    packed = tmp_path / "packed.json"  # gzip without the suffix
    packed.write_bytes(gzip.compress("\n".join(REVIEW_LINES).encode()))
    assert read_amazon_reviews(plain).sequences == read_amazon_reviews(packed).sequences


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"reviewerID": "A", "asin": ', "invalid JSON"),
        ('{"reviewerID": "A", "asin": "x"}', "missing key(s) unixReviewTime"),
        ('["A", "x", 1]', "expected a JSON object"),
        (review("A", "x", "yesterday"), "unixReviewTime must be a number"),  # type: ignore[arg-type]
        (review("A", "x", 1, text=5), "reviewText must be a string"),  # type: ignore[arg-type]
    ],
)
def test_amazon_reviews_bad_lines(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path / "bad.json", "\n".join([*REVIEW_LINES[:2], "", line]) + "\n")
    with pytest.raises(DataFormatError) as info:
        read_amazon_reviews(path)
    assert "bad.json:4: " in str(info.value) and message in str(info.value)


def test_sentence_splitting() -> None:
    text = "It is quite affordable.I did not know!Really?  Yes\nthe 3.5 mm jack...works :DIf so"
    assert split_sentences(text) == [
        "It is quite affordable",
        "I did not know",
        "Really",
        "Yes",
        "the 3.5 mm jack",
        "works :DIf so",
    ]
    assert words("Don't buy the D'Addario 3.5mm!") == ["don't", "buy", "the", "d'addario", "3", "5mm"]


# ---------------------------------------------------------------------------------------------------------
# dispatch


def test_read_source_dispatch_and_errors(tmp_path: Path) -> None:
    pod_dir(tmp_path, "1 1 2\n")
    assert read_source("pod", [tmp_path], None).sequences == {"1": ["1", "2"]}
    data = write(tmp_path / "data.csv", INTERACTIONS)
    assert read_source("csv", [data], None).sequences == EXPECTED
    reviews = write(tmp_path / "r.json", "\n".join(REVIEW_LINES))
    assert read_source("amazon-reviews", [reviews], None).sequences["A"] == ["i1", "i2"]

    with pytest.raises(ValueError, match="unknown format 'movielens'"):
        read_source("movielens", [tmp_path], None)
    with pytest.raises(ValueError, match=r"exactly one input .* got 2"):
        read_source("csv", [data, data], None)
    with pytest.raises(ValueError, match=r"exactly one input .* got 0"):
        read_source("pod", [], None)
    with pytest.raises(ValueError, match="no separate explanations file"):
        read_source("amazon-reviews", [reviews], data)
    with pytest.raises(ValueError, match="no separate explanations file"):
        read_source("p5", [tmp_path], data)

    missing = tmp_path / "nope"
    for fmt, path in [
        ("pod", missing),
        ("p5", missing),
        ("csv", missing / "x.csv"),
        ("amazon-reviews", missing),
    ]:
        with pytest.raises(DataFormatError, match=re.escape(str(path))):
            read_source(fmt, [path], None)
    with pytest.raises(DataFormatError, match=r"sequential_data\.txt: no such file"):
        read_source("p5", [tmp_path], None)
    with pytest.raises(DataFormatError, match=r"exp\.csv: no such file"):
        read_source("csv", [data], tmp_path / "exp.csv")
    with pytest.raises(DataFormatError, match="expected a directory"):
        read_source("pod", [data], None)
