"""Convert MovieLens (100k, or the "latest" CSV releases) to the dataset layout.

Every rating becomes an interaction with `weight` = rating. Items get `category` = first genre,
a numeric `year` and a 0/1 float column per genre; 100k users get age, gender, occupation and
zip3. Malformed input raises DataError naming the file, the line and what was expected.
The data is read in place: its license forbids redistributing it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from towerann.data.dataset import write_dataset
from towerann.errors import DataError

log = logging.getLogger(__name__)

ML100K_GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]
NO_GENRE = "(no genres listed)"
YEAR_IN_TITLE = re.compile(r"\((\d{4})\)\s*$")


def genre_column(name: str) -> str:
    """ "Children's" -> "genre_children_s"."""
    return "genre_" + re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")


def _line(file: Path, lineno: int, encoding: str) -> str:
    """The raw text of line `lineno` (1-based); only read on the error path."""
    with open(file, encoding=encoding, errors="replace") as f:
        for i, text in enumerate(f, 1):
            if i == lineno:
                return text.rstrip("\r\n")
    return ""


def _read_numeric_fast(
    file: Path,
    sep: str,
    names: list[str],
    int_cols: Sequence[str],
    float_cols: Sequence[str],
    encoding: str,
    header: bool,
) -> pd.DataFrame | None:
    """All-numeric files (ratings) parsed straight to numbers; None if anything is off, to diagnose slowly."""
    dtype = {c: np.int64 for c in int_cols} | {c: np.float64 for c in float_cols}
    try:
        df = pd.read_csv(
            file, sep=sep, header=0 if header else None, names=names, dtype=dtype, encoding=encoding, engine="c"
        )
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return None
    return None if df.empty or df.isna().to_numpy().any() else df


def _read_table(
    file: Path,
    sep: str,
    names: list[str],
    int_cols: Sequence[str],
    float_cols: Sequence[str] = (),
    optional: tuple[str, ...] = (),
    encoding: str = "utf-8",
    header: bool = False,
    what: str = "",
) -> pd.DataFrame:
    """Read a delimited file as strings, then check field counts and numbers (vectorised).

    Every column but `optional` must be non-empty, which is how a line cut short shows up.
    """
    if not file.is_file():
        raise DataError(f"{file}: missing")
    if set(names) == set(int_cols) | set(float_cols):
        fast = _read_numeric_fast(file, sep, names, int_cols, float_cols, encoding, header)
        if fast is not None:
            return fast
    n = len(names)
    try:
        df = pd.read_csv(
            file,
            sep=sep,
            header=0 if header else None,
            names=names,
            dtype=str,
            encoding=encoding,
            keep_default_na=False,
            na_values=[""],
            skip_blank_lines=False,
            engine="c",
            quoting=0 if sep == "," else 3,
        )
    except pd.errors.ParserError as e:
        m = re.search(r"line (\d+), saw (\d+)", str(e))
        detail = f"line {m.group(1)}: expected {n} {what}fields, got {m.group(2)}" if m else str(e)
        raise DataError(f"{file.name} {detail} ({file})") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{file}: not {encoding} text ({e})") from e
    except pd.errors.EmptyDataError as e:
        raise DataError(f"{file}: empty (no data rows)") from e
    first_line = 2 if header else 1
    missing = df.isna()
    keep = ~missing.all(axis=1).to_numpy()  # blank lines are skipped
    required = [c for c in names if c not in optional]
    short = np.flatnonzero(keep & missing[required].any(axis=1).to_numpy())
    if len(short):
        lineno = int(short[0]) + first_line
        text = _line(file, lineno, encoding)
        got = len(text.split(sep)) if sep != "," else int((~missing.iloc[short[0]]).sum())
        if got == n:
            empty = [c for c in required if missing[c].iloc[short[0]]]
            raise DataError(f"{file.name} line {lineno}: field(s) {empty} are empty ({file})")
        raise DataError(f"{file.name} line {lineno}: expected {n} {what}fields, got {got} ({file})")
    df = df.loc[keep].reset_index(drop=True)
    if df.empty:
        raise DataError(f"{file}: empty (no data rows)")
    for col, kind in [(c, "integer") for c in int_cols] + [(c, "number") for c in float_cols]:
        values = pd.to_numeric(df[col].str.strip(), errors="coerce")
        bad = values.isna().to_numpy().copy()
        if kind == "integer":
            bad |= (values % 1 != 0).to_numpy()
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            lineno = int(np.flatnonzero(keep)[i]) + first_line
            raise DataError(
                f"{file.name} line {lineno}: field '{col}' is {df[col].iloc[i]!r}, expected "
                f"{'an integer' if kind == 'integer' else 'a number'} ({file})"
            )
        df[col] = values.astype(np.int64) if kind == "integer" else values.astype(np.float64)
    return df


def _fill_year(year: pd.Series) -> pd.Series:
    fill = float(np.nanmedian(year)) if year.notna().any() else 2000.0
    return year.fillna(round(fill)).astype(np.float32)


def _check_known_items(ratings_file: Path, items_file: Path, item_ids: pd.Series, catalog: pd.Series) -> None:
    unknown = ~item_ids.isin(catalog)
    if unknown.any():
        raise DataError(
            f"{ratings_file}: {int(unknown.sum())} rating(s) name item ids missing from {items_file.name} "
            f"(e.g. {int(item_ids[unknown].iloc[0])}); use the files of one MovieLens release"
        )


def _genre_frame(flags: np.ndarray, genres: list[str]) -> tuple[pd.Series, pd.DataFrame]:
    """First flagged genre as category ("unknown" if none) and one float column per genre."""
    has = flags.any(axis=1)
    first = np.where(has, np.asarray(genres, dtype=object)[flags.argmax(axis=1)], "unknown")
    cols = pd.DataFrame({genre_column(g): flags[:, j].astype(np.float32) for j, g in enumerate(genres)})
    return pd.Series(first, dtype=object), cols


def _genres_100k(directory: Path) -> list[str]:
    file = directory / "u.genre"
    if not file.is_file():
        return ML100K_GENRES
    df = _read_table(file, "|", ["name", "index"], ["index"], encoding="latin-1", what="pipe-separated ")
    return list(df.sort_values("index")["name"])


def _convert_100k(directory: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    ratings = _read_table(
        directory / "u.data",
        "\t",
        ["user_id", "item_id", "rating", "timestamp"],
        ["user_id", "item_id", "timestamp"],
        ["rating"],
        what="tab-separated ",
    )
    genres = _genres_100k(directory)
    flag_cols = [f"g{j}" for j in range(len(genres))]
    item_file = directory / "u.item"
    raw = _read_table(
        item_file,
        "|",
        ["item_id", "title", "release", "video", "url", *flag_cols],
        ["item_id", *flag_cols],
        optional=("title", "release", "video", "url"),
        encoding="latin-1",
        what="pipe-separated ",
    )
    flags = raw[flag_cols].to_numpy() != 0
    category, genre_cols = _genre_frame(flags, genres)
    year = pd.to_datetime(raw["release"], format="%d-%b-%Y", errors="coerce").dt.year.astype(float)
    year = year.fillna(raw["title"].fillna("").str.extract(YEAR_IN_TITLE, expand=False).astype(float))
    items = pd.concat(
        [
            pd.DataFrame(
                {"item_id": raw["item_id"], "category": category, "available": True, "year": _fill_year(year)}
            ),
            genre_cols,
        ],
        axis=1,
    )
    user_file = directory / "u.user"
    u = _read_table(
        user_file,
        "|",
        ["user_id", "age", "gender", "occupation", "zip"],
        ["user_id", "age"],
        encoding="latin-1",
        what="pipe-separated ",
    )
    users = pd.DataFrame(
        {
            "user_id": u["user_id"],
            "age": u["age"].astype(np.float32),
            "gender": u["gender"],
            "occupation": u["occupation"],
            "zip3": u["zip"].str.strip().str[:3],
        }
    )
    _check_known_items(directory / "u.data", item_file, ratings["item_id"], items["item_id"])
    unknown_users = ~ratings["user_id"].isin(users["user_id"])
    if unknown_users.any():
        raise DataError(
            f"{directory / 'u.data'}: {int(unknown_users.sum())} rating(s) name users missing from "
            f"u.user (e.g. {int(ratings['user_id'][unknown_users].iloc[0])})"
        )
    return items, users, _interactions(ratings)


def _convert_latest(directory: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    ratings = _read_table(
        directory / "ratings.csv",
        ",",
        ["user_id", "item_id", "rating", "timestamp"],
        ["user_id", "item_id", "timestamp"],
        ["rating"],
        header=True,
        what="comma-separated ",
    )
    movies_file = directory / "movies.csv"
    raw = _read_table(
        movies_file, ",", ["item_id", "title", "genres"], ["item_id"], header=True, what="comma-separated "
    )
    lists = raw["genres"].str.split("|")
    genres = sorted({g for gs in lists for g in gs if g and g != NO_GENRE})
    index = {g: j for j, g in enumerate(genres)}
    flags = np.zeros((len(raw), len(genres)), bool)
    for i, gs in enumerate(lists):
        for g in gs:
            if g in index:
                flags[i, index[g]] = True
    # category = the first genre as listed in the file, not alphabetical
    category = pd.Series([next((g for g in gs if g in index), "unknown") for gs in lists], dtype=object)
    genre_cols = pd.DataFrame({genre_column(g): flags[:, j].astype(np.float32) for j, g in enumerate(genres)})
    year = raw["title"].str.strip().str.extract(YEAR_IN_TITLE, expand=False).astype(float)
    items = pd.concat(
        [
            pd.DataFrame(
                {"item_id": raw["item_id"], "category": category, "available": True, "year": _fill_year(year)}
            ),
            genre_cols,
        ],
        axis=1,
    )
    _check_known_items(directory / "ratings.csv", movies_file, ratings["item_id"], items["item_id"])
    users = pd.DataFrame({"user_id": np.unique(ratings["user_id"].to_numpy()).astype(np.int64)})
    return items, users, _interactions(ratings)


def _interactions(ratings: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": ratings["user_id"].astype(np.int64),
            "item_id": ratings["item_id"].astype(np.int64),
            "timestamp": ratings["timestamp"].astype(np.int64),
            "weight": ratings["rating"].astype(np.float32),
        }
    )


def detect(path: str | Path) -> str:
    """ "movielens-100k" or "movielens-latest", by the files present."""
    directory = Path(path)
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory; pass the folder that holds u.data (ml-100k) or ratings.csv")
    if (directory / "u.data").is_file():
        return "movielens-100k"
    if (directory / "ratings.csv").is_file():
        return "movielens-latest"
    raise DataError(f"no u.data or ratings.csv in {directory}; pass an unpacked ml-100k or ml-latest(-small) folder")


def convert(path: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Convert the MovieLens release in `path` to a dataset directory at `out`."""
    source = detect(path)
    directory = Path(path)
    items, users, interactions = (_convert_100k if source == "movielens-100k" else _convert_latest)(directory)
    if not items["item_id"].is_unique:
        raise DataError(f"{directory}: item ids in the movies file are not unique")
    interactions = interactions.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)
    log.info("%s: %d items, %d users, %d ratings", source, len(items), len(users), len(interactions))
    return write_dataset(
        out, items, users, interactions, source, overwrite=overwrite, extra={"source_path": str(directory.resolve())}
    )
