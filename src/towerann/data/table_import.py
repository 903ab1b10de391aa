"""A user's own tables (Parquet or CSV) -> a dataset directory: `towerann data import`.

Three inputs, two of them optional: interactions (user id, item id, timestamp, optional weight), items
(item id, optional category and availability, any other column a feature) and users (user id, any other
column a feature). Without an items file the items are the distinct item ids of the interactions, all
available, all in category NO_CATEGORY; without a users file the users are the distinct user ids.

Types: a Parquet column keeps its type (integers and floats become float32 numeric features, bools 0/1,
strings categorical ones); a CSV column is typed by its values, all of them: every value a number ->
numeric, every value true/false -> bool (0/1), otherwise text -> categorical. A CSV column that holds
numbers and text both is refused (name it with `categorical` to read it as text). Ids are int64 where
every file that holds them has integer ids, else strings. Timestamps: integers (unix seconds), numbers
(floored), Parquet timestamps and dates, or date strings (ISO 8601 first, then pandas' guess).

Streamed: a CSV file is read twice in blocks of CSV_BLOCK_BYTES (once to type its columns, once to
convert and write), a Parquet file once in batches of PARQUET_BATCH_ROWS (a row group at most in memory);
the output is written in row groups of ROW_GROUP_ROWS. What is held besides that: the ids of the items
and users (to find duplicates and interactions that name unknown items or users, or to derive the items
and users), ~16 bytes per id plus text ids' strings. Measured (2 busy cores, peak RSS of the CLI process,
of which ~300 MiB is the `towerann` command's own imports): 10M interactions CSV alone (1M users, 200k
items derived) 540 MiB, 10 s; a 10M-item catalog CSV (5 columns) with 1M interactions 600 MiB, 31 s.

Every problem is a DataError (ConfigError for flags) of one line naming the file, the column and the
counts. The directory is written through the dataset layout's own pieces: `atomic_dir`, `write_manifest`
and `validate_dataset`, so its manifest and checks are those of every other dataset.
"""

from __future__ import annotations

import codecs
import logging
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.dataset as pds
import pyarrow.parquet as pq

from towerann.artifacts import atomic_dir
from towerann.data.dataset import INTERACTIONS, ITEMS, USERS, validate_dataset, write_manifest
from towerann.errors import ConfigError, DataError

log = logging.getLogger(__name__)

NO_CATEGORY = "<none>"  # the category of every item when the items have no category column
SOURCE = "import"
CSV_BLOCK_BYTES = 1 << 20  # pyarrow's reader keeps ~20 blocks in flight: ~40 MiB
ROW_GROUP_ROWS = 1 << 18  # output row groups: converted batches are gathered to this many rows
PARQUET_BATCH_ROWS = 1 << 18
EXAMPLES = 3
SEPARATORS_BY_SUFFIX = {".csv": ",", ".tsv": "\t", ".tab": "\t", ".psv": "|"}
SNIFFED = ("\t", "|", ",", ";")
# on trimmed text: what Arrow's cast to float64 takes; an int64 id's own text; a bool
NUMBER_RE = r"^[+-]?((\d+\.?\d*|\.\d+)(e[+-]?\d+)?|nan|inf|infinity)$"
ID_INTEGER_RE = r"^(0|-?[1-9]\d{0,17})$"
BOOL_RE = r"^(true|false)$"
MILLISECONDS = 10**11  # a "unix seconds" value above this (year 5138) is most likely milliseconds
TRUE_TEXT, FALSE_TEXT = ("true", "1"), ("false", "0")
SECONDS_PER = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


@dataclass(frozen=True)
class TableFile:
    """One input file: Parquet (a file or a folder of them) or delimited text. `columns` names the columns
    of a text file that has no header row (its first line is data)."""

    path: str | Path
    columns: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ImportOptions:
    """Which input column is which (the `towerann data import` flags), and how text files are read.

    weight/category/available None: the column of that name when the file has one, else none (no
    weight; every item in NO_CATEGORY; every item available). category_flags: 0/1 columns whose first
    set one (in this order) names the item's category, NO_CATEGORY where none is set."""

    user_id: str = "user_id"
    item_id: str = "item_id"
    timestamp: str = "timestamp"
    weight: str | None = None
    category: str | None = None
    category_flags: tuple[str, ...] = ()
    available: str | None = None
    drop: frozenset[str] = frozenset()
    categorical: frozenset[str] = frozenset()
    sep: str | None = None
    encoding: str = "utf-8"


@dataclass
class ImportResult:
    path: Path
    counts: dict[str, int]
    derived: list[str]  # "items" and/or "users" when made from the interactions
    dropped: list[str]  # "file: column" of columns empty in every row, left out
    ignored: list[str]  # interaction columns not read (no role)
    seconds: float


# ---- reading ------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _examples(values: list[Any]) -> str:
    return ", ".join(_fmt(v) for v in values[:EXAMPLES])


def _sniff(path: Path, encoding: str) -> str:
    with open(path, encoding=encoding, errors="replace") as f:
        head = [f.readline() for _ in range(5)]
    counts = {s: sum(line.count(s) for line in head) for s in SNIFFED}
    best = max(SNIFFED, key=lambda s: counts[s])
    return best if counts[best] else ","


class _Source:
    """One input table: its columns, and its rows in batches (text: every column a string, empty -> null)."""

    def __init__(self, role: str, file: TableFile, opts: ImportOptions):
        self.role = role
        self.path = Path(file.path)
        self.name = self.path.name
        if not self.path.exists():
            raise DataError(f"{self.name}: no such file ({self.path})")
        if self.path.is_file() and self.path.stat().st_size == 0:
            raise DataError(f"{self.name}: empty file")
        if self.path.is_dir():
            self.parquet = True
        else:
            with open(self.path, "rb") as f:
                self.parquet = f.read(4) == b"PAR1"
        self.rows = 0  # counted by each pass over the file
        self.given = list(file.columns) if file.columns is not None else None
        if self.parquet:
            if self.given is not None:
                raise ConfigError(
                    f"--{role}-columns names the columns of a text file without a header; {self.name} is Parquet"
                )
            try:
                self.dataset = pds.dataset(self.path, format="parquet")
                self.schema: pa.Schema = self.dataset.schema
                self.rows = self.dataset.count_rows()
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{self.name}: not a readable Parquet file ({e})") from e
            if self.rows == 0:
                raise DataError(f"{self.name}: empty file (0 rows)")
            self.names: list[str] = list(self.schema.names)
        else:
            self.encoding = opts.encoding
            suffix_sep = SEPARATORS_BY_SUFFIX.get(self.path.suffix.lower())
            self.sep = opts.sep or suffix_sep or _sniff(self.path, opts.encoding)
            self.names = self.given or self._header()
        twice = sorted({c for c in self.names if self.names.count(c) > 1})
        if twice:
            raise DataError(f"{self.name}: column(s) {', '.join(map(repr, twice))} appear more than once")

    def _options(self, block: int, columns: list[str] | None = None) -> tuple[Any, Any, Any]:
        read = pcsv.ReadOptions(block_size=block, column_names=self.given, encoding=self.encoding)
        quote = '"' if self.sep in (",", ";", "\t") else False  # MovieLens' '|' files quote nothing
        parse = pcsv.ParseOptions(delimiter=self.sep, quote_char=quote)
        convert = pcsv.ConvertOptions(
            column_types={c: pa.string() for c in columns or ()},
            include_columns=columns,
            strings_can_be_null=True,
            null_values=[""],
        )
        return read, parse, convert

    def _csv_error(self, e: Exception) -> DataError:
        text = str(e)
        if "Empty CSV file" in text:
            return DataError(f"{self.name}: empty file")
        if "invalid UTF8" in text:
            return DataError(f"{self.name}: not {self.encoding} text; give its encoding with --encoding (e.g. latin-1)")
        width = re.search(r"Expected (\d+) columns, got (\d+): ?(.*)", text)
        if width:
            names = "the header" if self.given is None else f"--{self.role}-columns"
            return DataError(
                f"{self.name}: a row has {width.group(2)} fields where {names} has {width.group(1)} "
                f"(separator {self.sep!r}): {width.group(3)[:80]!r}"
            )
        first = text.splitlines()[0] if text else type(e).__name__
        return DataError(f"{self.name}: cannot read as text with separator {self.sep!r} ({first})")

    def _header(self) -> list[str]:
        read, parse, _ = self._options(1 << 20)
        try:
            with pcsv.open_csv(self.path, read_options=read, parse_options=parse) as reader:
                return list(reader.schema.names)
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
            raise self._csv_error(e) from e

    def batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        """The rows of `columns`, a batch at a time (text: ~20 blocks read ahead; Parquet: one batch)."""
        if self.parquet:
            try:
                yield from self.dataset.to_batches(
                    columns=columns, batch_size=PARQUET_BATCH_ROWS, batch_readahead=1, fragment_readahead=1
                )
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{self.name}: cannot read ({e})") from e
            return
        read, parse, convert = self._options(CSV_BLOCK_BYTES, columns)
        try:
            with pcsv.open_csv(self.path, read_options=read, parse_options=parse, convert_options=convert) as reader:
                yield from reader
        except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
            raise self._csv_error(e) from e

    def type_of(self, column: str) -> pa.DataType:
        """A Parquet column's type, dictionaries as their values' type; text columns are strings."""
        if not self.parquet:
            return pa.string()
        t = self.schema.field(column).type
        return t.value_type if pa.types.is_dictionary(t) else t


# ---- typing text columns ------------------------------------------------------------------------


def _count(mask: pa.Array) -> int:
    return int(pc.sum(mask).as_py() or 0)


@dataclass
class _TextStats:
    """What the values of one text column look like (nulls are empty fields). A number is what Arrow casts
    to float64 once trimmed (nan and inf included); an integer id is one whose text is its int64 value."""

    values: int = 0
    numbers: int = 0
    id_integers: int = 0
    bools: int = 0
    text_example: str | None = None

    def add(self, a: pa.Array) -> None:
        n = len(a) - a.null_count
        if n == 0:
            return
        self.values += n
        t = pc.utf8_trim_whitespace(a)
        try:  # the common case, every value a number: one cast, no regular expression
            t.cast(pa.float64())
        except pa.ArrowInvalid:
            is_number = pc.match_substring_regex(t, NUMBER_RE, ignore_case=True)
            self.numbers += _count(is_number)
            self.id_integers += _count(pc.match_substring_regex(t, ID_INTEGER_RE))
            self.bools += _count(pc.match_substring_regex(t, BOOL_RE, ignore_case=True))
            if self.text_example is None:
                text = a.filter(pc.invert(is_number))
                self.text_example = text[0].as_py() if len(text) else None
            return
        self.numbers += n
        try:
            self.id_integers += _count(pc.equal(t.cast(pa.int64()).cast(pa.string()), t))
        except pa.ArrowInvalid:  # some fractions: count the integers one by one
            self.id_integers += _count(pc.match_substring_regex(t, ID_INTEGER_RE))

    @property
    def texts(self) -> int:
        return self.values - self.numbers


def _scan(src: _Source, columns: list[str]) -> dict[str, _TextStats]:
    """One pass over a text file: the stats of `columns` and the row count."""
    stats = {c: _TextStats() for c in columns}
    rows = 0
    for batch in src.batches(columns):
        rows += batch.num_rows
        for c in columns:
            stats[c].add(batch.column(c))
    if rows == 0:
        raise DataError(f"{src.name}: empty file (a header, no rows)")
    src.rows = rows
    return stats


# ---- column plans -------------------------------------------------------------------------------

# Kinds of output column: "int_id" / "str_id"; "seconds" (integers) / "floor" (numbers, text numbers too) /
# "date" (dates, date strings): timestamps -> int64 unix seconds;
# "float" (numbers, Parquet bools), "bool01" (text true/false -> 0/1), "str" (text); "bool" (availability);
# "flags" (category = the first set flag column); "const" (one value for every row).
ID_KIND = {"int": "int_id", "str": "str_id"}


@dataclass
class _Col:
    out: str  # the output column
    src: str | None  # the input column (None: const, flags)
    kind: str
    flag: str = ""  # the flag that names it, for messages
    required: bool = False  # an empty value is an error
    value: Any = None  # const
    flags: tuple[tuple[str, str], ...] = ()  # flags: (column, "float" | "bool01")

    @property
    def arrow_type(self) -> pa.DataType:
        if self.kind in ("int_id", "seconds", "floor", "date"):
            return pa.int64()
        if self.kind in ("float", "bool01"):
            return pa.float32()
        if self.kind == "bool" or (self.kind == "const" and isinstance(self.value, bool)):
            return pa.bool_()
        return pa.string()

    def where(self) -> str:
        return f"'{self.src}'" + (f" ({self.flag})" if self.flag else "")

    def describe(self) -> Any:
        """What the manifest records as this column's source."""
        if self.flags:
            return {"first_set_of": [f for f, _ in self.flags], "none": NO_CATEGORY}
        return self.src if self.src is not None else self.value


@dataclass
class _Plan:
    src: _Source
    cols: list[_Col] = field(default_factory=list)

    @property
    def reads(self) -> list[str]:
        seen: list[str] = []
        for c in self.cols:
            for name in (c.src, *(f for f, _ in c.flags)):
                if name is not None and name not in seen:
                    seen.append(name)
        return seen

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([pa.field(c.out, c.arrow_type) for c in self.cols])


def _need(src: _Source, column: str, flag: str) -> str:
    if column not in src.names:
        raise DataError(f"{src.name}: no column '{column}' for {flag} (columns: {', '.join(src.names)})")
    return column


def _optional(src: _Source, given: str | None, default: str, flag: str) -> str | None:
    """The column a flag names (it must exist), else the column of the default name if there is one."""
    if given is not None:
        return _need(src, given, flag)
    return default if default in src.names else None


def _is_str(t: pa.DataType) -> bool:
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t))


def _is_number(t: pa.DataType) -> bool:
    return bool(pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t))


def _mixed(src: _Source, column: str, s: _TextStats, hint: str) -> DataError:
    return DataError(
        f"{src.name}: column '{column}' mixes numbers and text ({s.texts} of {s.values} rows are text, "
        f"e.g. {s.text_example!r}); {hint}"
    )


def _id_kind(src: _Source, column: str, flag: str, stats: dict[str, _TextStats]) -> str:
    """ "int" or "str"."""
    if not src.parquet:
        s = stats[column]
        return "int" if s.values and s.id_integers == s.values else "str"
    t = src.type_of(column)
    if pa.types.is_integer(t):
        return "int"
    if _is_str(t):
        return "str"
    raise DataError(f"{src.name}: column '{column}' ({flag}) has type {t}; ids must be integers or text")


def _timestamp_kind(src: _Source, column: str, stats: dict[str, _TextStats]) -> str:
    if not src.parquet:
        s = stats[column]
        if s.numbers == s.values:
            return "floor"
        if s.numbers:
            raise _mixed(src, column, s, "timestamps are unix seconds or dates, one or the other")
        return "date"
    t = src.type_of(column)
    if pa.types.is_integer(t):
        return "seconds"
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "floor"
    if pa.types.is_timestamp(t) or pa.types.is_date(t) or _is_str(t):
        return "date"
    raise DataError(f"{src.name}: column '{column}' (--timestamp) has type {t}; expected unix seconds or dates")


def _number_kind(src: _Source, column: str, flag: str, stats: dict[str, _TextStats]) -> str:
    """A column that must hold numbers or bools (a weight, a category flag): "float" or "bool01"."""
    if not src.parquet:
        s = stats[column]
        if s.values and s.bools == s.values:
            return "bool01"
        if s.numbers and s.texts:
            raise _mixed(src, column, s, f"{flag} needs numbers")
        if s.texts:
            raise DataError(
                f"{src.name}: column '{column}' ({flag}) is text (e.g. {s.text_example!r}); expected numbers"
            )
        return "float"
    t = src.type_of(column)
    if _is_number(t) or pa.types.is_boolean(t):
        return "float"
    raise DataError(f"{src.name}: column '{column}' ({flag}) has type {t}; expected numbers")


def _feature_kind(src: _Source, column: str, opts: ImportOptions, stats: dict[str, _TextStats]) -> str | None:
    """ "float", "bool01", "str", or None for a column empty in every row (left out)."""
    if not src.parquet:
        s = stats[column]
        if s.values == 0:
            return None
        if column in opts.categorical:
            return "str"
        if s.numbers == s.values:
            return "float"
        if s.bools == s.values:
            return "bool01"
        if s.numbers:
            raise _mixed(
                src, column, s, f"fix those rows, --drop {column}, or --categorical {column} to keep it as text"
            )
        return "str"
    t = src.type_of(column)
    if pa.types.is_null(t):
        return None
    if _is_str(t) or (column in opts.categorical and (_is_number(t) or pa.types.is_boolean(t))):
        return "str"
    if _is_number(t) or pa.types.is_boolean(t):
        return "float"
    raise DataError(
        f"{src.name}: column '{column}' has type {t}; features are numbers, bools or text - --drop {column}"
    )


def _features(
    src: _Source, taken: set[str], reserved: set[str], opts: ImportOptions, stats: dict[str, _TextStats]
) -> tuple[list[_Col], list[str]]:
    """Every column not taken by a role nor dropped, typed; and the columns left out as empty."""
    cols, dropped = [], []
    for name in src.names:
        if name in taken or name in opts.drop:
            continue
        if name in reserved:
            raise DataError(
                f"{src.name}: column '{name}' is not the one the flags name as {name} and a feature cannot "
                f"have that name; --drop {name}"
            )
        kind = _feature_kind(src, name, opts, stats)
        if kind is None:
            dropped.append(f"{src.name}: {name}")
        else:
            cols.append(_Col(name, name, kind))
    return cols, dropped


@dataclass
class _Plans:
    interactions: _Plan
    items: _Plan | None
    users: _Plan | None
    dropped: list[str]  # empty columns left out
    ignored: list[str]  # interaction columns with no role


def _plans(opts: ImportOptions, inter: _Source, items: _Source | None, users: _Source | None) -> _Plans:
    """The columns each output file takes from its input, typed (text files are scanned here, once)."""
    user_col = _need(inter, opts.user_id, "--user-id")
    item_col = _need(inter, opts.item_id, "--item-id")
    ts_col = _need(inter, opts.timestamp, "--timestamp")
    weight_col = _optional(inter, opts.weight, "weight", "--weight")
    inter_reads = [c for c in (user_col, item_col, ts_col, weight_col) if c is not None]
    category_col = available_col = None
    if items is not None:
        _need(items, opts.item_id, "--item-id")
        if not opts.category_flags:
            category_col = _optional(items, opts.category, "category", "--category")
        available_col = _optional(items, opts.available, "available", "--available")
        for f in opts.category_flags:
            _need(items, f, "--category-flags")
    if users is not None:
        _need(users, opts.user_id, "--user-id")

    def scan(src: _Source | None, columns: list[str] | None = None) -> dict[str, _TextStats]:
        if src is None or src.parquet:
            return {}
        return _scan(src, columns if columns is not None else [c for c in src.names if c not in opts.drop])

    inter_stats, item_stats, user_stats = scan(inter, inter_reads), scan(items), scan(users)

    # ids are int64 where every file that holds them has integer ids, else strings
    item_kinds = {_id_kind(inter, item_col, "--item-id", inter_stats)}
    if items is not None:
        item_kinds.add(_id_kind(items, opts.item_id, "--item-id", item_stats))
    user_kinds = {_id_kind(inter, user_col, "--user-id", inter_stats)}
    if users is not None:
        user_kinds.add(_id_kind(users, opts.user_id, "--user-id", user_stats))
    item_kind = ID_KIND["int" if item_kinds == {"int"} else "str"]
    user_kind = ID_KIND["int" if user_kinds == {"int"} else "str"]

    inter_cols = [
        _Col("user_id", user_col, user_kind, "--user-id", required=True),
        _Col("item_id", item_col, item_kind, "--item-id", required=True),
        _Col("timestamp", ts_col, _timestamp_kind(inter, ts_col, inter_stats), "--timestamp", required=True),
    ]
    if weight_col is not None:
        kind = _number_kind(inter, weight_col, "--weight", inter_stats)
        inter_cols.append(_Col("weight", weight_col, kind, "--weight", required=True))
    plans = _Plans(
        _Plan(inter, inter_cols), None, None, [], [f"{inter.name}: {c}" for c in inter.names if c not in inter_reads]
    )

    if items is not None:
        cols = [_Col("item_id", opts.item_id, item_kind, "--item-id", required=True)]
        if category_col is not None:
            cols.append(_Col("category", category_col, "str", "--category", required=True))
        elif opts.category_flags:
            flags = tuple((f, _number_kind(items, f, "--category-flags", item_stats)) for f in opts.category_flags)
            cols.append(_Col("category", None, "flags", flags=flags))
        else:
            cols.append(_Col("category", None, "const", value=NO_CATEGORY))
        if available_col is not None:
            cols.append(_Col("available", available_col, "bool", "--available", required=True))
        else:
            cols.append(_Col("available", None, "const", value=True))
        taken = {opts.item_id, *(c for c in (category_col, available_col) if c is not None)}
        features, gone = _features(items, taken, {"item_id", "category", "available"}, opts, item_stats)
        plans.items = _Plan(items, cols + features)
        plans.dropped += gone
    if users is not None:
        features, gone = _features(users, {opts.user_id}, {"user_id"}, opts, user_stats)
        plans.users = _Plan(users, [_Col("user_id", opts.user_id, user_kind, "--user-id", required=True), *features])
        plans.dropped += gone
    return plans


# ---- converting ---------------------------------------------------------------------------------


def _plain(a: pa.Array) -> pa.Array:
    if pa.types.is_dictionary(a.type):
        a = a.cast(a.type.value_type)
    if pa.types.is_large_string(a.type):
        a = a.cast(pa.string())
    return a


def _bool_text(a: pa.Array) -> pa.Array:
    """true/false/1/0 (any case, spaces around) -> bool; anything else -> null."""
    low = pc.utf8_lower(pc.utf8_trim_whitespace(a))
    value = pc.is_in(low, value_set=pa.array(TRUE_TEXT))
    known = pc.or_(value, pc.is_in(low, value_set=pa.array(FALSE_TEXT)))
    return pc.if_else(known, value, pa.scalar(None, pa.bool_()))


def _parse_dates(a: pa.Array) -> pa.Array:
    """Date strings -> int64 unix seconds (no zone: UTC); null where unparseable. ISO 8601 first, then the
    format pandas infers from the values."""
    s = pd.Series(a.to_numpy(zero_copy_only=False), dtype=object)
    t = pd.to_datetime(s, utc=True, format="ISO8601", errors="coerce")
    retry = t.isna() & s.notna()
    if retry.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "could not infer format": then each value is guessed alone
            t = t.where(~retry, pd.to_datetime(s.where(retry), utc=True, errors="coerce"))
    secs = ((t - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.float64, na_value=np.nan)
    return _floor_seconds(secs)


def _floor_seconds(v: np.ndarray) -> pa.Array:
    missing = ~np.isfinite(v)
    return pa.array(np.floor(np.where(missing, 0, v)).astype(np.int64), mask=missing)


def _floor_div(a: pa.Array, d: int) -> pa.Array:
    """int64 values floor-divided by d (a time unit -> seconds), nulls kept."""
    missing = a.is_null().to_numpy(zero_copy_only=False)
    v = a.fill_null(0).to_numpy(zero_copy_only=False)
    return pa.array(np.floor_divide(v, d), mask=missing if missing.any() else None)


def _to_seconds(a: pa.Array, kind: str) -> pa.Array:
    t = a.type
    if pa.types.is_timestamp(t):
        return _floor_div(a.cast(pa.int64()), SECONDS_PER[t.unit])
    if pa.types.is_date32(t):
        return pc.multiply(a.cast(pa.int32()).cast(pa.int64()), 86_400)
    if pa.types.is_date64(t):
        return _floor_div(a.cast(pa.int64()), 1000)
    if pa.types.is_string(t):
        if kind == "date":
            return _parse_dates(a)
        a = pc.utf8_trim_whitespace(a)
    if pa.types.is_integer(a.type):
        return a.cast(pa.int64())
    return _floor_seconds(a.cast(pa.float64()).to_numpy(zero_copy_only=False))


def _to_float(a: pa.Array, kind: str) -> pa.Array:
    if kind == "bool01":
        return _bool_text(a).cast(pa.float32())
    if pa.types.is_string(a.type):
        return pc.utf8_trim_whitespace(a).cast(pa.float64()).cast(pa.float32())
    return a.cast(pa.float64()).cast(pa.float32())


def _category_from_flags(batch: pa.RecordBatch, flags: tuple[tuple[str, str], ...]) -> pa.Array:
    on = np.column_stack(
        [np.nan_to_num(_to_float(_plain(batch.column(f)), k).to_numpy(zero_copy_only=False)) != 0 for f, k in flags]
    )
    first = np.where(on.any(axis=1), on.argmax(axis=1), len(flags)).astype(np.int32)
    return pa.DictionaryArray.from_arrays(pa.array(first), pa.array([f for f, _ in flags] + [NO_CATEGORY])).cast(
        pa.string()
    )


def _convert(col: _Col, batch: pa.RecordBatch) -> pa.Array:
    if col.kind == "const":
        return pa.repeat(pa.scalar(col.value), batch.num_rows)
    if col.kind == "flags":
        return _category_from_flags(batch, col.flags)
    a = _plain(batch.column(col.src))
    if col.kind in ("int_id", "str_id"):
        if pa.types.is_string(a.type):
            a = pc.utf8_trim_whitespace(a)  # " 12" and "12" are one id
        return a.cast(pa.int64() if col.kind == "int_id" else pa.string())
    if col.kind in ("seconds", "floor", "date"):
        return _to_seconds(a, col.kind)
    if col.kind in ("float", "bool01"):
        return _to_float(a, col.kind)
    if col.kind == "bool":
        if pa.types.is_boolean(a.type):
            return a
        if pa.types.is_string(a.type):
            return _bool_text(a)
        return pc.not_equal(a.cast(pa.float64()), 0.0)
    return a.cast(pa.string())


class _Problems:
    """Empty and unreadable values of required columns, counted over the whole file; one line at its end."""

    BAD = {
        "date": "are neither unix seconds nor dates",
        "bool": "are not true/false/1/0",
        "ms": "look like milliseconds, not unix seconds",
    }

    def __init__(self, src: _Source):
        self.src = src
        self.found: dict[tuple[str, str], tuple[int, list[Any]]] = {}  # (column, "empty" | kind) -> count, examples

    def add(self, key: tuple[str, str], count: int, examples: list[Any]) -> None:
        n, seen = self.found.get(key, (0, []))
        self.found[key] = (n + count, seen + examples[: EXAMPLES - len(seen)])

    def check(self, col: _Col, before: pa.Array, after: pa.Array, offset: int) -> None:
        if not after.null_count:
            return
        was = before.is_null().to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(after.is_null().to_numpy(zero_copy_only=False) & ~was)
        empty = np.flatnonzero(was)
        if len(empty):
            self.add((col.where(), "empty"), len(empty), [f"row {offset + i + 1}" for i in empty[:EXAMPLES]])
        if len(bad):
            self.add((col.where(), col.kind), len(bad), before.take(pa.array(bad[:EXAMPLES])).to_pylist())

    def raise_any(self) -> None:
        messages = []
        for (where, what), (count, examples) in self.found.items():
            if what == "empty":
                messages.append(
                    f"column {where} is empty in {count} of {self.src.rows} rows (e.g. {', '.join(examples)}); "
                    "fill them or leave those rows out"
                )
            else:
                why = self.BAD.get(what, "cannot be read")
                messages.append(f"column {where} has {count} values that {why} (e.g. {_examples(examples)})")
        if messages:
            more = f" (+{len(messages) - 1} more problem(s))" if len(messages) > 1 else ""
            raise DataError(f"{self.src.name}: {messages[0]}{more}")


def _convert_batch(plan: _Plan, batch: pa.RecordBatch, problems: _Problems, offset: int) -> pa.RecordBatch:
    arrays = []
    for col in plan.cols:
        try:
            out = _convert(col, batch)
        except pa.ArrowInvalid as e:  # a number too large for its type, say
            raise DataError(f"{plan.src.name}: column {col.where()}: {str(e).splitlines()[0]}") from e
        if col.required and col.src is not None:
            problems.check(col, batch.column(col.src), out, offset)
        if col.out == "timestamp" and col.kind in ("seconds", "floor"):
            large = pc.greater(out, MILLISECONDS).fill_null(False)
            if pc.any(large).as_py():
                problems.add(
                    (col.where(), "ms"), _count(large), batch.column(col.src).filter(large)[:EXAMPLES].to_pylist()
                )
        arrays.append(out)
    return pa.RecordBatch.from_arrays(arrays, schema=plan.schema)


# ---- id sets ------------------------------------------------------------------------------------


def _hash(a: pa.Array) -> np.ndarray:
    out = np.empty(len(a), np.uint64)
    step = 1 << 20
    for i in range(0, len(a), step):
        part = a.slice(i, step).to_numpy(zero_copy_only=False).astype(object)
        out[i : i + len(part)] = pd.util.hash_array(part)
    return out


class _IdSet:
    """The ids of the items (or users), sorted once: int64 ids as they are, text ids by a 64-bit hash (the
    strings themselves settle equal hashes). Finds duplicates, and answers batch by batch which ids of a
    batch it holds, by binary search: no hash table rebuilt per batch, ~16 bytes per id besides the strings."""

    def __init__(self, chunks: list[pa.Array], t: pa.DataType):
        self.ints = pa.types.is_integer(t)
        self.exact = False  # two different text ids share a hash: look text ids up by value instead
        if self.ints:
            self.keys = np.concatenate([c.to_numpy(zero_copy_only=False) for c in chunks]) if chunks else np.array([])
            self.keys.sort()
        else:
            self.ids = pa.concat_arrays(chunks) if chunks else pa.array([], pa.string())
            h = np.concatenate([_hash(c) for c in chunks]) if chunks else np.array([], np.uint64)
            self.rows = np.argsort(h, kind="stable")
            self.keys = h[self.rows]

    def duplicates(self) -> tuple[int, list[Any]]:
        """How many ids occur more than once, and the first few of them (smallest ints; text in file order)."""
        same = self.keys[1:] == self.keys[:-1]
        if not same.any():
            return 0, []
        if self.ints:
            dup = np.unique(self.keys[1:][same])
            return len(dup), dup[:EXAMPLES].tolist()
        rows = np.unique(np.concatenate([self.rows[1:][same], self.rows[:-1][same]]))  # file order
        candidates = self.ids.take(pa.array(rows))
        counts = pc.value_counts(candidates)
        dup = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
        self.exact = len(pc.unique(candidates)) > len(np.unique(self.keys[1:][same]))
        return len(dup), dup[:EXAMPLES].to_pylist()

    def contains(self, a: pa.Array) -> np.ndarray:
        if len(self.keys) == 0:
            return np.zeros(len(a), bool)
        if self.ints:
            v = a.to_numpy(zero_copy_only=False)
            pos = np.minimum(np.searchsorted(self.keys, v), len(self.keys) - 1)
            return np.asarray(self.keys[pos] == v)
        if self.exact:
            return np.asarray(pc.is_in(a, value_set=self.ids).to_numpy(zero_copy_only=False))
        h = _hash(a)
        pos = np.minimum(np.searchsorted(self.keys, h), len(self.keys) - 1)
        same = pc.equal(a, self.ids.take(pa.array(self.rows[pos]))).to_numpy(zero_copy_only=False)
        return np.asarray((self.keys[pos] == h) & same)


class _Distinct:
    """The distinct values of a stream of arrays, in order of first appearance, kept compact."""

    def __init__(self, t: pa.DataType):
        self.done: pa.Array = pa.array([], t)
        self.pending: list[pa.Array] = []
        self.pending_rows = 0

    def add(self, a: pa.Array) -> None:
        u = pc.unique(a)
        self.pending.append(u)
        self.pending_rows += len(u)
        if self.pending_rows > max(1 << 20, len(self.done)):
            self.result()

    def result(self) -> pa.Array:
        if self.pending:
            self.done = pc.unique(pa.concat_arrays([self.done, *self.pending]))
            self.pending, self.pending_rows = [], 0
        return self.done


class _Unknown:
    """Interactions that name ids the items (or users) file lacks: counted, with a few examples."""

    def __init__(self, known: _IdSet, column: str):
        self.known, self.column = known, column
        self.count = 0
        self.examples: list[Any] = []

    def add(self, batch: pa.RecordBatch) -> None:
        ids = batch.column(self.column)
        missing = ~self.known.contains(ids)
        if not missing.any():
            return
        self.count += int(missing.sum())
        for v in pc.unique(ids.filter(pa.array(missing))).to_pylist():
            if len(self.examples) < EXAMPLES and v not in self.examples:
                self.examples.append(v)

    def raise_any(self, inter: _Source, other: _Source, what: str) -> None:
        if self.count:
            raise DataError(
                f"{inter.name}: {self.count} interactions name {what} not in {other.name} "
                f"(e.g. {_examples(self.examples)})"
            )


# ---- the import ---------------------------------------------------------------------------------


def _check_flags(opts: ImportOptions, inter: _Source, items: _Source | None, users: _Source | None) -> None:
    for flag, value in (("--category", opts.category), ("--available", opts.available)):
        if value is not None and items is None:
            raise ConfigError(
                f"{flag} {value}: names a column of the items file; give --items FILE (without one, the items are "
                f"the interactions' item ids, all available, all in category {NO_CATEGORY!r})"
            )
    if opts.category_flags and items is None:
        raise ConfigError("--category-flags names columns of the items file; give --items FILE")
    if opts.category is not None and opts.category_flags:
        raise ConfigError("give --category COL or --category-flags COLS, not both")
    roles = {
        "--user-id": opts.user_id,
        "--item-id": opts.item_id,
        "--timestamp": opts.timestamp,
        "--weight": opts.weight,
        "--category": opts.category,
        "--available": opts.available,
    }
    for flag, value in roles.items():
        if value is not None and value in opts.drop:
            raise ConfigError(f"--drop {value}: it is the {flag} column")
    sources = [s for s in (inter, items, users) if s is not None]
    for flag, names in (("--drop", opts.drop), ("--categorical", opts.categorical)):
        for name in sorted(names):
            if not any(name in s.names for s in sources):
                raise ConfigError(f"{flag} {name}: no such column in {', '.join(s.name for s in sources)}")


def _write(plan: _Plan, file: Path, on_batch: Any = None) -> None:
    """Convert and write one input, a batch at a time; `on_batch(batch)` sees each converted batch."""
    problems = _Problems(plan.src)
    rows = 0
    group: list[pa.RecordBatch] = []
    with pq.ParquetWriter(file, plan.schema) as writer:
        for batch in plan.src.batches(plan.reads):
            out = _convert_batch(plan, batch, problems, rows)
            rows += batch.num_rows
            if on_batch is not None and not problems.found:
                on_batch(out)
            group.append(out)
            if sum(b.num_rows for b in group) >= ROW_GROUP_ROWS:
                writer.write_table(pa.Table.from_batches(group), row_group_size=ROW_GROUP_ROWS)
                group = []
        if group:
            writer.write_table(pa.Table.from_batches(group), row_group_size=ROW_GROUP_ROWS)
    plan.src.rows = rows
    problems.raise_any()


def _write_keyed(plan: _Plan, file: Path, key: str, what: str) -> _IdSet:
    """Write items or users, whose ids must be unique; return their id set."""
    chunks: list[pa.Array] = []
    _write(plan, file, lambda b: chunks.append(b.column(key)))
    ids = _IdSet(chunks, plan.schema.field(key).type)
    chunks.clear()  # the set holds its own copy
    count, examples = ids.duplicates()
    if count:
        raise DataError(f"{plan.src.name}: {count} duplicate {what} ids (e.g. {_examples(examples)})")
    return ids


def _table_file(x: TableFile | str | Path | None) -> TableFile | None:
    return x if isinstance(x, TableFile) or x is None else TableFile(x)


def import_tables(
    out: str | Path,
    interactions: TableFile | str | Path,
    items: TableFile | str | Path | None = None,
    users: TableFile | str | Path | None = None,
    options: ImportOptions | None = None,
    overwrite: bool = False,
) -> ImportResult:
    """Import interactions (and optionally items and users) into a new dataset directory `out`."""
    t0 = time.perf_counter()
    opts = options or ImportOptions()
    try:
        codecs.lookup(opts.encoding)
    except LookupError as e:
        raise ConfigError(f"--encoding {opts.encoding}: not an encoding Python knows (e.g. utf-8, latin-1)") from e
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another --out or pass --overwrite")
    inter_file, item_file, user_file = _table_file(interactions), _table_file(items), _table_file(users)
    assert inter_file is not None
    inter = _Source("interactions", inter_file, opts)
    item_src = _Source("items", item_file, opts) if item_file is not None else None
    user_src = _Source("users", user_file, opts) if user_file is not None else None
    _check_flags(opts, inter, item_src, user_src)
    plans = _plans(opts, inter, item_src, user_src)

    derived = []
    with atomic_dir(out, overwrite=overwrite) as tmp:
        known_items = _write_keyed(plans.items, tmp / ITEMS, "item_id", "item") if plans.items else None
        known_users = _write_keyed(plans.users, tmp / USERS, "user_id", "user") if plans.users else None
        schema = plans.interactions.schema
        new_items = _Distinct(schema.field("item_id").type) if known_items is None else None
        new_users = _Distinct(schema.field("user_id").type) if known_users is None else None
        unknown_items = _Unknown(known_items, "item_id") if known_items is not None else None
        unknown_users = _Unknown(known_users, "user_id") if known_users is not None else None

        def seen(batch: pa.RecordBatch) -> None:
            for unknown in (unknown_items, unknown_users):
                if unknown is not None:
                    unknown.add(batch)
            if new_items is not None:
                new_items.add(batch.column("item_id"))
            if new_users is not None:
                new_users.add(batch.column("user_id"))

        _write(plans.interactions, tmp / INTERACTIONS, seen)
        if unknown_items is not None and item_src is not None:
            unknown_items.raise_any(inter, item_src, "items")
        if unknown_users is not None and user_src is not None:
            unknown_users.raise_any(inter, user_src, "users")
        if new_items is not None:
            ids = new_items.result()
            category = pa.repeat(pa.scalar(NO_CATEGORY), len(ids))
            available = pa.repeat(pa.scalar(True), len(ids))
            pq.write_table(pa.table({"item_id": ids, "category": category, "available": available}), tmp / ITEMS)
            derived.append("items")
        if new_users is not None:
            pq.write_table(pa.table({"user_id": new_users.result()}), tmp / USERS)
            derived.append("users")
        record = {
            "files": {s.role: str(s.path.resolve()) for s in (inter, item_src, user_src) if s is not None},
            "columns": {
                p.src.role: {c.out: c.describe() for c in p.cols}
                for p in (plans.interactions, plans.items, plans.users)
                if p is not None
            },
            "derived": derived,
            "dropped_empty_columns": plans.dropped,
        }
        manifest = write_manifest(tmp, SOURCE, {"import": record})
        validate_dataset(tmp)
    seconds = time.perf_counter() - t0
    log.info("imported %s in %.1fs", out, seconds)
    return ImportResult(out, dict(manifest["counts"]), derived, plans.dropped, plans.ignored, seconds)
