"""A reader of the `.ts` time-series classification format of sktime and aeon, in which the
UCR/UEA archives are distributed (Bagnall et al. 2018, "The UEA multivariate time series
classification archive"; Dau et al. 2019, "The UCR time series archive").

A file is a header, then one case per line:

    # comment lines (anywhere; '%' also starts one) and blank lines are skipped
    @problemName GunPoint
    @timeStamps false            true is rejected here (DataError)
    @missing false
    @univariate true
    @dimensions 1                also spelled @dimension
    @equalLength true
    @seriesLength 150            checked against each case when @equalLength is true
    @classLabel true 1 2         the class names, in the order that maps them to 0..C-1
    @data
    -0.64,-0.64,-0.63,...:1      dimensions separated by ':', values by ',', the label last

Tags are case-insensitive (aeon's own files spell @timestamps, @equallength ...); a repeated
tag keeps its last value. '?' (or 'NaN') is a missing value: an error, unless the caller
allows missing values (then they are read as NaN). Within a case every dimension must have the
same length; cases may differ in length (@equalLength false). Regression files
(@targetLabel true) and files without class labels are rejected: the ucr task classifies.
Every problem names the file and the line number (DataError).
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diagssm.tasks.cache import DataError

BOOL_TAGS = ("timestamps", "missing", "univariate", "equallength")
INT_TAGS = ("dimension", "dimensions", "serieslength")
TAGS = ("problemname", "classlabel", "targetlabel", "data") + BOOL_TAGS + INT_TAGS


@dataclass
class TsFile:
    """A parsed .ts file. series[i] is case i, (length_i, n_dims) float64 (NaN where missing);
    labels[i] its class index into `classes` (the @classLabel order); line[i] its line number."""

    path: str
    problem: str
    classes: tuple
    n_dims: int
    series: list
    labels: np.ndarray
    lines: list


def _bool(value, path, number, tag):
    if value.lower() not in ("true", "false"):
        raise DataError(f"{path}, line {number}: @{tag} must be true or false; got {value!r}")
    return value.lower() == "true"


def _header_line(header, words, path, number):
    """Record one @tag line (split into words) in `header`; DataError for what is not allowed."""
    tag, rest = words[0][1:].lower(), words[1:]
    if tag not in TAGS:
        raise DataError(f"{path}, line {number}: unknown tag {words[0]!r}; known: "
                        f"{', '.join('@' + t for t in TAGS)}")
    if tag == "data":
        return
    if tag != "problemname" and not rest:
        raise DataError(f"{path}, line {number}: @{tag} needs a value")
    if tag == "problemname":
        header[tag] = " ".join(rest)
    elif tag in BOOL_TAGS:
        header[tag] = _bool(rest[0], path, number, tag)
    elif tag in INT_TAGS:
        if not rest[0].isdigit() or int(rest[0]) < 1:
            raise DataError(f"{path}, line {number}: @{tag} must be an integer >= 1; got {rest[0]!r}")
        header["dimensions" if tag == "dimension" else tag] = int(rest[0])
    elif tag == "targetlabel" and _bool(rest[0], path, number, tag):
        raise DataError(f"{path}, line {number}: @targetLabel true marks a regression problem; the ucr task "
                        f"reads classification files (@classLabel true <labels>)")
    elif tag == "classlabel":
        if not _bool(rest[0], path, number, tag) or len(rest) < 2:
            raise DataError(f"{path}, line {number}: expected '@classLabel true <label> <label> ...' (the ucr "
                            f"task needs class labels); got {' '.join(words)!r}")
        if len(set(rest[1:])) != len(rest) - 1:
            raise DataError(f"{path}, line {number}: @classLabel lists a label twice: {' '.join(rest[1:])}")
        header["classlabel"] = tuple(rest[1:])
    if header.get("timestamps"):
        raise DataError(f"{path}, line {number}: @timeStamps true (timestamped values) is not supported; "
                        f"convert the file to plain values")


def read_header(lines, path):
    """(header dict, index of the line after @data). Tags lower-cased; see the module docstring."""
    header = {}
    for i, line in enumerate(lines):
        text = line.strip()
        if not text or text.startswith(("#", "%")):
            continue
        if not text.startswith("@"):
            raise DataError(f"{path}, line {i + 1}: expected a @tag, a comment or a blank line before @data; "
                            f"got {text[:40]!r}")
        words = text.split()
        _header_line(header, words, path, i + 1)
        if words[0].lower() == "@data":
            if "classlabel" not in header:
                raise DataError(f"{path}, line {i + 1}: @data before any '@classLabel true <labels>' line")
            if header.get("univariate") and header.get("dimensions", 1) != 1:
                raise DataError(f"{path}, line {i + 1}: @univariate true but @dimensions {header['dimensions']}")
            return header, i + 1
    raise DataError(f"{path}: no @data line (a .ts file has a header ending in @data, then one case per line)")


def parse_case(text, header, n_dims, path, number, allow_missing):
    """One data line -> (values (length, n_dims) float64, label string)."""
    *dims, label = text.split(":")
    if len(dims) != n_dims:
        raise DataError(f"{path}, line {number}: {len(dims)} dimension(s) before the label; expected {n_dims} "
                        f"(dimensions separated by ':', the class label last)")
    label = label.strip()
    if label not in header["classlabel"]:
        raise DataError(f"{path}, line {number}: label {label!r} is not one of @classLabel "
                        f"{' '.join(header['classlabel'])}")
    try:
        values = [np.array(d.replace("?", "nan").split(","), dtype=np.float64) for d in dims]
    except ValueError as err:
        raise DataError(f"{path}, line {number}: a value is not a number ({err})") from err
    if len({len(v) for v in values}) != 1:
        raise DataError(f"{path}, line {number}: the dimensions have different lengths "
                        f"{[len(v) for v in values]}; each case's dimensions must have one length")
    series = np.stack(values, axis=1)  # (length, n_dims)
    if not allow_missing and np.isnan(series).any():
        raise DataError(f"{path}, line {number}: missing value ('?' or NaN); pass missing='mean' to fill "
                        f"missing values with the training mean")
    if header.get("equallength") and "serieslength" in header and len(series) != header["serieslength"]:
        raise DataError(f"{path}, line {number}: {len(series)} values; @seriesLength says {header['serieslength']}")
    return series, label


def read_ts(path, allow_missing=False):
    """The .ts file at `path` (module docstring) as a TsFile.

    Shapes: series[i] (length_i, n_dims) float64; labels (n,) int64 in [0, len(classes))
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (a .ts time-series file expected)")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: skips a byte-order mark (Windows)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not a text file in UTF-8 ({err})") from err
    header, start = read_header(lines, path)
    n_dims = 1 if header.get("univariate") else header.get("dimensions")
    series, labels, numbers = [], [], []
    for i in range(start, len(lines)):
        text = lines[i].strip()
        if not text or text.startswith(("#", "%")):
            continue
        if n_dims is None:  # neither @univariate true nor @dimensions: the first case decides
            n_dims = text.count(":")
        values, label = parse_case(text, header, n_dims, path, i + 1, allow_missing)
        series.append(values)
        labels.append(header["classlabel"].index(label))
        numbers.append(i + 1)
    if not series:
        raise DataError(f"{path}: no cases after @data")
    return TsFile(str(path), header.get("problemname", path.stem), header["classlabel"], n_dims, series,
                  np.array(labels, dtype=np.int64), numbers)
