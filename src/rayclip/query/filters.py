"""`--where` filters: a small SQL-like grammar over the mapping's columns, parsed here into a
pyarrow compute expression. Nothing the user typed reaches an engine as text.

    filter     := or
    or         := and ("OR" and)*
    and        := not ("AND" not)*
    not        := "NOT" not | "(" filter ")" | condition
    condition  := column op value
                | column ["NOT"] ("LIKE" | "ILIKE") 'pattern'      (% any run, _ one character)
                | column ["NOT"] "IN" "(" value ("," value)* ")"
                | column "IS" ["NOT"] "NULL"
    op         := = | != | <> | < | <= | > | >=
    value      := number | 'text' (a quote inside is doubled: 'it''s')

Keywords are case-insensitive; column names are the mapping's (FILTER_COLUMNS). A timestamp column
compares with an ISO date or time in quotes: ingested_at >= '2026-01-01'. A row whose value is null
(clip_score of an image without a caption) matches no comparison: `clip_score >= 0.28` drops it.
"""

from __future__ import annotations

import datetime as dt
import re

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import UserError

FILTER_COLUMNS = (
    "media_id",
    "caption",
    "url",
    "path",
    "width",
    "height",
    "source",
    "source_count",
    "ingested_at",
    "embedded_at",
    "clip_score",  # the best cosine between the image and one of its captions (null: no caption scored)
)
MAX_FILTER_CHARS = 1000
_TOKEN = re.compile(
    r"\s*(?:(?P<number>-?\d+(?:\.\d+)?)(?![\w.])|(?P<string>'(?:[^']|'')*')|(?P<op><=|>=|!=|<>|=|<|>)"
    r"|(?P<punct>[(),])|(?P<word>[A-Za-z_][A-Za-z_0-9]*))"
)
_KEYWORDS = {"AND", "OR", "NOT", "LIKE", "ILIKE", "IN", "IS", "NULL"}
_COMPARE = {
    "=": pc.equal,
    "!=": pc.not_equal,
    "<>": pc.not_equal,
    "<": pc.less,
    "<=": pc.less_equal,
    ">": pc.greater,
    ">=": pc.greater_equal,
}


class _Parser:
    def __init__(self, text: str, schema: pa.Schema):
        self.text = text
        self.schema = schema
        self.tokens = self._tokens(text)
        self.at = 0

    def _tokens(self, text: str) -> list[tuple[str, object, int]]:
        tokens, position = [], 0
        while position < len(text):
            if text[position:].strip() == "":
                break
            match = _TOKEN.match(text, position)
            if not match:
                self._fail(f"unexpected {text[position:].lstrip()[:12]!r}", position)
            kind = match.lastgroup
            raw, start = match.group(kind), match.start(kind)
            value: object = raw
            if kind == "number":
                value = float(raw) if "." in raw else int(raw)
            elif kind == "string":
                value = raw[1:-1].replace("''", "'")
            elif kind == "word" and raw.upper() in _KEYWORDS:
                kind, value = "keyword", raw.upper()
            tokens.append((kind, value, start))
            position = match.end()
        return tokens

    def _fail(self, what: str, position: int | None = None):
        where = len(self.text) if position is None else position
        raise UserError(f"bad filter at character {where + 1}: {what} (in {self.text!r})")

    def _peek(self) -> tuple[str, object, int] | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def _take(self, kind: str, value: object = None, what: str | None = None):
        token = self._peek()
        if token is None or token[0] != kind or (value is not None and token[1] != value):
            expected = what or (repr(value) if value is not None else kind)
            self._fail(f"expected {expected}", token[2] if token else None)
        self.at += 1
        return token

    def _accept(self, kind: str, value: object) -> bool:
        token = self._peek()
        if token and token[0] == kind and token[1] == value:
            self.at += 1
            return True
        return False

    def parse(self) -> pc.Expression:
        if not self.tokens:
            self._fail("the filter is empty")
        expression = self._or()
        if self._peek() is not None:
            self._fail(f"unexpected {self._peek()[1]!r}", self._peek()[2])
        return expression

    def _or(self) -> pc.Expression:
        expression = self._and()
        while self._accept("keyword", "OR"):
            expression = expression | self._and()
        return expression

    def _and(self) -> pc.Expression:
        expression = self._not()
        while self._accept("keyword", "AND"):
            expression = expression & self._not()
        return expression

    def _not(self) -> pc.Expression:
        if self._accept("keyword", "NOT"):
            return ~self._not()
        if self._accept("punct", "("):
            expression = self._or()
            self._take("punct", ")")
            return expression
        return self._condition()

    def _condition(self) -> pc.Expression:
        _, name, position = self._take("word", what="a column name")
        if name not in self.schema.names:
            self._fail(f"unknown column {name!r}; filter on {', '.join(FILTER_COLUMNS)}", position)
        column = pc.field(name)
        kind = self.schema.field(name).type
        if self._accept("keyword", "IS"):
            negate = self._accept("keyword", "NOT")
            self._take("keyword", "NULL")
            test = pc.is_null(column)
            return ~test if negate else test
        negate = self._accept("keyword", "NOT")
        token = self._peek()
        if token and token[0] == "keyword" and token[1] in ("LIKE", "ILIKE"):
            self.at += 1
            if not pa.types.is_string(kind):
                self._fail(f"{token[1]} needs a text column; {name} is {kind}", token[2])
            pattern = self._take("string", what="a quoted pattern")[1]
            test = pc.match_like(column, pattern, ignore_case=token[1] == "ILIKE")
        elif self._accept("keyword", "IN"):
            self._take("punct", "(")
            values = [self._value(kind)]
            while self._accept("punct", ","):
                values.append(self._value(kind))
            self._take("punct", ")")
            test = pc.is_in(column, pa.array(values, kind))
        elif negate:
            self._fail("NOT here must be followed by LIKE, ILIKE or IN", token[2] if token else None)
        else:
            op = self._take("op", what="a comparison (=, !=, <, <=, >, >=), LIKE, IN or IS")[1]
            test = _COMPARE[op](column, pa.scalar(self._value(kind), kind))
        return ~test if negate else test

    def _value(self, kind: pa.DataType) -> object:
        token = self._peek()
        if token is None or token[0] not in ("number", "string"):
            self._fail("expected a number or a 'quoted' value", token[2] if token else None)
        self.at += 1
        _, value, position = token
        if pa.types.is_timestamp(kind):
            if not isinstance(value, str):
                self._fail("a time needs quotes: '2026-01-01' or '2026-01-01T12:00:00'", position)
            try:
                moment = dt.datetime.fromisoformat(value)
            except ValueError:
                self._fail(f"{value!r} is not an ISO date or time", position)
            return moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)
        if pa.types.is_string(kind) != isinstance(value, str):
            self._fail(f"{value!r} does not compare with {kind} values", position)
        return value


def parse_filter(text: str, schema: pa.Schema) -> pc.Expression:
    """A pyarrow expression for a filter string over these columns; UserError if it is malformed."""
    if len(text) > MAX_FILTER_CHARS:
        raise UserError(f"the filter is longer than {MAX_FILTER_CHARS} characters")
    columns = pa.schema([f for f in schema if f.name in FILTER_COLUMNS])
    return _Parser(text, columns).parse()


def matching_ids(mapping: pa.Table, text: str) -> pa.Array:
    """faiss_ids of the mapping rows the filter keeps (a null comparison keeps nothing)."""
    return mapping.filter(parse_filter(text, mapping.schema)).column("faiss_id").combine_chunks()
