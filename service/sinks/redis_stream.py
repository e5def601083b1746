"""The prediction log in Redis (the local stack's embedded default): a capped Stream plus
per-id keys for the feedback join.

Keys (prefix `canary:predlog`, setting `prediction_log_key`):

| key | type | holds |
|---|---|---|
| `<prefix>:stream` | Stream, `XADD MAXLEN ~ cap` | one entry per row; every field a string: numbers as text, lists as JSON, `shadow` 0/1, `input_b64` empty when off |
| `<prefix>:req:<request id>` | string, EX label window | JSON `{"model", "model_version", "slot", "classes", "confidences", "latency_ms"}` of the prediction (not of shadow copies) |
| `<prefix>:label:<request id>` | string, EX label window | the label, a JSON list of classes: a second post of it is a duplicate |
| `<prefix>:tally:<model>` | hash | `<version>:labels` and `<version>:correct`: labelled rows and correct rows |

Stream entry ids are Redis' clock in milliseconds, so a time range is one `XRANGE`.

A batch is written by one Lua script call (`_WRITE_ROWS`): the writer thread only serialises
the rows to one JSON array (orjson; the list fields as JSON text, written as Python writes
them: shortest exact repr, NaN kept) and Redis turns each into its entry and index key. Per row
that is under a tenth of the client's CPU that one `XADD` + `SET` per row cost through
redis-py, and the writer shares the serving process's interpreter, so its CPU is taken from
requests (`make bench`, contender `bento-predlog`). Scalars are written as Lua formats them:
`time` exactly (17 significant digits: a window's bounds compare with it), other numbers to
14 significant digits.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import orjson
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from service.core.feedback import JudgedLabel, LoggedPrediction, Tally
from service.core.predlog import ROW_FIELDS
from service.core.shadow_compare import ShadowTally

_LIST_FIELDS = ("classes", "confidences", "input_shape")
_PAGE = 1000
_CLOCK_MARGIN_S = 60.0  # a row's time is the slot's clock; its entry id Redis' a little later
_FIELD_NAMES = json.dumps(ROW_FIELDS)
_JSON = json.JSONEncoder(separators=(",", ":"))  # one encoder: json.dumps with options builds one a call


def _list_text(value: Any) -> str:
    """A list field as the stream keeps it: JSON, floats at full precision (shortest repr),
    NaN as NaN. orjson first (it writes NaN and infinity as null: then the stdlib's)."""
    text = orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)
    return _JSON.encode(value) if b"null" in text else text.decode()


# One batch of rows: an entry per row in the capped stream and, except for shadow copies, the
# row's index key for the feedback join. KEYS[1] stream; ARGV: cap, label window (s), index key
# prefix, field names (JSON), rows (JSON, each a list of values in field-name order; the list
# fields already JSON text, written as Python wrote them: full precision, NaN kept).
_WRITE_ROWS = """
local names = cjson.decode(ARGV[4])
local rows = cjson.decode(ARGV[5])
local LISTS = {classes = true, confidences = true, input_shape = true}
local function text(name, v)
  if LISTS[name] then return type(v) == 'string' and v or 'null' end
  if v == nil or v == cjson.null then return '' end
  if type(v) == 'boolean' then return v and '1' or '0' end
  if type(v) == 'number' then
    if name == 'time' then return string.format('%.17g', v) end  -- exact: windows compare it
    if v == math.floor(v) and math.abs(v) < 1e15 then return string.format('%d', v) end
    return string.format('%.14g', v)
  end
  return tostring(v)
end
for _, values in ipairs(rows) do
  local fields, row = {}, {}
  for i, name in ipairs(names) do
    local t = text(name, values[i])
    fields[#fields + 1] = name
    fields[#fields + 1] = t
    row[name] = t
  end
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(fields))
  if row.shadow ~= '1' then
    local joined = '{"model":' .. cjson.encode(row.model) .. ',"model_version":' .. cjson.encode(row.model_version)
      .. ',"slot":' .. cjson.encode(row.slot) .. ',"classes":' .. row.classes
      .. ',"confidences":' .. row.confidences .. ',"latency_ms":' .. (row.latency_ms ~= '' and row.latency_ms or 'null') .. '}'
    redis.call('SET', ARGV[3] .. row.request_id, joined, 'EX', ARGV[2])
  end
end
return #rows
"""
# The shadow diff, done where stable's answers are: each copy [id, classes, confidences,
# latency_ms] against the index key stable's log wrote for the same id. ARGV: index key prefix,
# model, copies (JSON). Returns JSON {"tallies": {version: [requests, rows, agreed, confidence
# candidate, confidence stable, latency candidate s, latency stable s]}, "done": [copy index],
# "mismatched": n}; a copy whose id has no answer yet is not done (it waits).
_COMPARE_SHADOW = """
local function finite_list(v)  -- a list of finite numbers (NaN, inf, null: not summed)
  if type(v) ~= 'table' then return false end
  for _, x in ipairs(v) do
    if type(x) ~= 'number' or x ~= x or x == math.huge or x == -math.huge then return false end
  end
  return true
end
local copies = cjson.decode(ARGV[3])
local tallies, done, mismatched = {}, {}, 0
for i, copy in ipairs(copies) do
  local blob = redis.call('GET', ARGV[1] .. copy[1])
  if blob then
    local stable = cjson.decode(blob)
    if stable.model == ARGV[2] then
      done[#done + 1] = i - 1
      local mine, theirs = copy[2], stable.classes
      if #theirs ~= #mine then
        mismatched = mismatched + 1
      else
        local version = tostring(stable.model_version)
        local t = tallies[version]
        if not t then
          t = {0, 0, 0, 0, 0, 0, 0}
          tallies[version] = t
        end
        t[1] = t[1] + 1
        t[2] = t[2] + #mine
        for k = 1, #mine do
          if mine[k] == theirs[k] then t[3] = t[3] + 1 end
        end
        local sc, mc = stable.confidences, copy[3]
        if finite_list(sc) and finite_list(mc) and #sc == #mc then
          for k = 1, #sc do
            t[4] = t[4] + mc[k]
            t[5] = t[5] + sc[k]
          end
        end
        if type(stable.latency_ms) == 'number' then
          t[6] = t[6] + copy[4] / 1000
          t[7] = t[7] + stable.latency_ms / 1000
        end
      end
    end
  end
end
return cjson.encode({tallies = tallies, done = done, mismatched = mismatched})
"""
# Store a label once: SET NX (idempotent), then count it in the tally, atomically.
_ADD_LABEL = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  redis.call('HINCRBY', KEYS[2], ARGV[3] .. ':labels', ARGV[4])
  redis.call('HINCRBY', KEYS[2], ARGV[3] .. ':correct', ARGV[5])
  return 1
end
return 0
"""


def from_fields(fields: dict[bytes, bytes]) -> dict[str, Any]:
    """A stream entry back as a row (every field was written as text)."""
    text = {k.decode(): v.decode() for k, v in fields.items()}
    row: dict[str, Any] = dict(text)
    for name in _LIST_FIELDS:
        if name in text:
            row[name] = json.loads(text[name])
    row["time"] = float(text.get("time") or 0)
    row["rows"] = int(text.get("rows") or 0)
    row["latency_ms"] = float(text.get("latency_ms") or 0)
    row["shadow"] = text.get("shadow") == "1"
    row["input_b64"] = text.get("input_b64") or None
    return row


class RedisPredictionStore:
    """`PredictionLogStore` on Redis. Calls raise `redis.RedisError` on a fault (the log's
    writer counts the batch as dropped; the feedback desk answers 503)."""

    def __init__(
        self, url: str, *, password: str | None = None, max_len: int = 100_000, label_window_s: int = 86_400,
        timeout_s: float = 1.0, key_prefix: str = "canary:predlog",
    ) -> None:  # fmt: skip
        if max_len < 1 or label_window_s < 1:
            raise ValueError("max_len and label_window_s must be at least 1")
        self.max_len, self.label_window_s, self.prefix = max_len, label_window_s, key_prefix
        self.stream = f"{key_prefix}:stream"
        self._client = redis.Redis.from_url(
            url, password=password, socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )  # fmt: skip
        self._add_label = self._client.register_script(_ADD_LABEL)
        self._write_rows = self._client.register_script(_WRITE_ROWS)
        self._compare_shadow = self._client.register_script(_COMPARE_SHADOW)

    def _key(self, kind: str, name: str) -> str:
        return f"{self.prefix}:{kind}:{name}"

    # -- sink ----------------------------------------------------------------------------
    def write(self, rows: list[dict[str, Any]]) -> None:
        """One script call per batch: an entry per row in the stream (trimmed to about
        `max_len`), and each non-shadow row indexed by its request id for the label window."""
        if not rows:
            return
        values = orjson.dumps(
            [[_list_text(row[n]) if n in _LIST_FIELDS else row[n] for n in ROW_FIELDS] for row in rows],
            option=orjson.OPT_SERIALIZE_NUMPY,
        )
        self._write_rows(keys=[self.stream], args=[self.max_len, self.label_window_s, self._key("req", ""),
                                                   _FIELD_NAMES, values])  # fmt: skip

    def close(self) -> None:
        self._client.close()

    # -- the feedback join ---------------------------------------------------------------
    def lookup(self, model: str, ids: list[str]) -> dict[str, LoggedPrediction]:
        found = {}
        for request_id, blob in zip(ids, self._client.mget([self._key("req", i) for i in ids]), strict=True):
            if blob is None:
                continue
            entry = json.loads(blob)  # (not orjson: a NaN confidence is written as NaN)
            if entry["model"] == model:
                found[request_id] = LoggedPrediction(
                    entry["model"], entry["model_version"], entry["slot"], tuple(entry["classes"]),
                    tuple(entry.get("confidences") or ()), entry.get("latency_ms"),
                )  # fmt: skip
        return found

    def compare_shadow(
        self, model: str, copies: list[tuple[str, list[int], list[float], float]]
    ) -> tuple[list[ShadowTally], list[str], int]:
        """The shadow diff's pairing (`service.core.shadow_compare.pair_with_stable`) in one
        script call: (tallies per stable version, ids done, how many had other row counts)."""
        answer = orjson.loads(self._compare_shadow(args=[self._key("req", ""), model, orjson.dumps(copies)]))
        tallies = answer["tallies"] or {}  # cjson writes an empty table as {}
        done = [copies[int(i)][0] for i in (answer["done"] or ())]
        paired = [ShadowTally(str(v), int(t[0]), int(t[1]), int(t[2]), *map(float, t[3:])) for v, t in tallies.items()]
        return paired, done, int(answer["mismatched"])

    def labels_of(self, ids: list[str]) -> dict[str, tuple[int, ...]]:
        blobs = self._client.mget([self._key("label", i) for i in ids])
        return {i: tuple(json.loads(b)) for i, b in zip(ids, blobs, strict=True) if b is not None}

    def add_labels(self, labels: list[JudgedLabel]) -> int:
        pipe = self._client.pipeline(transaction=False)
        for label in labels:
            self._add_label(
                keys=[self._key("label", label.request_id), self._key("tally", label.model)],
                args=[json.dumps(list(label.values)), self.label_window_s, label.model_version, len(label.values),
                      label.correct],
                client=pipe,
            )  # fmt: skip
        return sum(int(added) for added in pipe.execute())

    def tallies(self, model: str) -> dict[str, Tally]:
        counts: dict[str, dict[str, int]] = {}
        raw: dict[bytes, bytes] = self._client.hgetall(self._key("tally", model))  # type: ignore[assignment]
        for field, value in raw.items():
            version, _, kind = field.decode().rpartition(":")
            counts.setdefault(version, {})[kind] = int(value)
        return {v: Tally(c.get("labels", 0), c.get("correct", 0)) for v, c in sorted(counts.items())}

    # -- export --------------------------------------------------------------------------
    def read_range(self, since: float, until: float) -> Iterator[dict[str, Any]]:
        """Rows whose `time` lies in [since, until), oldest first, a page at a time."""
        start = f"{max(0, int((since - _CLOCK_MARGIN_S) * 1000))}-0"
        end = f"{int((until + _CLOCK_MARGIN_S) * 1000)}"
        while True:
            page: list[tuple[bytes, dict[bytes, bytes]]] = self._client.xrange(  # type: ignore[assignment]
                self.stream, min=start, max=end, count=_PAGE
            )
            for _entry_id, fields in page:
                row = from_fields(fields)
                if since <= row["time"] < until:
                    yield row
            if len(page) < _PAGE:
                return
            last = page[-1][0].decode()
            start = "(" + last  # exclusive: the next page starts after it
