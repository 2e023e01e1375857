"""The agent RPC wire format: versioned, authenticated frames over one TCP connection.

Interface: a connected stream socket (``recv_into``, ``sendall``, ``sendfile``); no privileges.
Everything else here is pure: building, encoding, decoding and checking messages, unit-tested
without a network.

A frame is::

    4-byte big-endian length N | N bytes of JSON header (UTF-8) | payload_len bytes of payload

The header is one JSON object. A request::

    {"v": 1, "kind": "req", "op": "dump", "id": "3f1c...", "ts": 1732380000.25,
     "nonce": "<16 random bytes, hex>", "args": {...},
     "payload_len": 0, "payload_sha256": "<hex>", "mac": "<hex>"}

A response names the request it answers by ``id`` and by the request's nonce (``re``), so an
old response cannot be passed off as the answer to a new request::

    {"v": 1, "kind": "resp", "id": ..., "re": <request nonce>, "agent": "alpha", "ts": ...,
     "nonce": ..., "ok": true, "result": {...}, "error": null,
     "payload_len": N, "payload_sha256": ..., "mac": ...}

``mac`` is HMAC-SHA256 under the cluster key (``auth.sign``) over the canonical JSON of the
header without ``mac`` (sorted keys, no spaces, ASCII). The payload (image files) follows the
header and is bound to it by ``payload_sha256``, which the MAC covers.

A refusal is the one unauthenticated frame: sent by an agent that will not run a request (bad
MAC, replay, malformed frame, unknown version, too busy) just before it closes the connection,
so that the caller learns why instead of seeing a reset. It carries no secret and triggers
nothing; a forged one can only make a caller give up, which a reset could do as well::

    {"v": 1, "kind": "refusal", "code": "auth", "reason": "...", "hint": "...",
     "supported": [1]}

Nothing from a frame is ever executed: ``op`` selects a handler from a fixed table and ``args``
are checked against the handler's declared types (``check_type``).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import io
import json
import math
import re
import secrets
import socket
import struct
import time
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, Union, get_args, get_origin, get_type_hints

from orthros_py.agent import auth
from orthros_py.agent.errors import (
    AgentRefused,
    AuthError,
    ProtocolError,
    Refusal,
    VersionError,
)

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})
DEFAULT_PORT = 7070  # the inventory's [cluster] agent_port
MAX_HEADER = 4 << 20  # enough for the args of a 50,000-connection network lock
MAX_PAYLOAD = 1 << 40  # streamed to disk, never held in memory; bounded only as a sanity check
CHUNK = 1 << 20
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_LEN = struct.Struct("!I")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_OP = re.compile(r"[a-z][a-z0-9_]{0,63}")
_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# Image directory and file names: one path component, never hidden, never "..".
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")

T = TypeVar("T")


class Kind(enum.StrEnum):
    REQUEST = "req"
    RESPONSE = "resp"
    REFUSAL = "refusal"


# --- names and addresses -----------------------------------------------------------------------


def validate_name(name: object, what: str = "image directory name") -> str:
    """A name that is safe as one path component below the agent's images root."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ProtocolError(
            f"{what} {name!r} is not allowed: use 1-128 letters, digits, '.', '_', '+' or '-', "
            "starting with a letter or digit, without '..' or '/'", code=Refusal.BAD_REQUEST)
    return name


# --- argument types ----------------------------------------------------------------------------


def _describe(tp: Any) -> str:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if tp is type(None):
        return "null"
    return str(tp).replace("typing.", "") if get_origin(tp) else getattr(tp, "__name__", str(tp))


def _json_type(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "a list", dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def check_type(value: Any, tp: Any, where: str) -> Any:
    """``value`` (decoded JSON) checked against the annotation ``tp``, converted where JSON has
    no such type (lists to tuples, strings to enums); ProtocolError naming ``where`` otherwise.

    Supported: Any, None, bool, int, float, str, enums of strings, list[X], tuple[X, ...],
    tuple[X, Y], dict[str, X], and unions of those.
    """
    if tp is Any:
        return value
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        for arm in get_args(tp):
            try:
                return check_type(value, arm, where)
            except ProtocolError:
                continue
        raise _bad(where, tp, value)
    if tp is type(None):
        if value is None:
            return None
        raise _bad(where, tp, value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _bad(where, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _bad(where, tp, value)
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise _bad(where, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _bad(where, tp, value)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if isinstance(value, str) and member.value == value:
                return member
        raise _bad(where, tp, value)
    if origin is list:
        if not isinstance(value, list):
            raise _bad(where, tp, value)
        (item,) = get_args(tp)
        return [check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list):
            raise _bad(where, tp, value)
        items = get_args(tp)
        if len(items) == 2 and items[1] is Ellipsis:
            return tuple(check_type(v, items[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(items):
            raise _bad(where, tp, value)
        return tuple(check_type(v, t, f"{where}[{i}]")
                     for i, (v, t) in enumerate(zip(value, items, strict=True)))
    if origin is dict:
        key_t, val_t = get_args(tp)
        if key_t is not str or not isinstance(value, dict):
            raise _bad(where, tp, value)
        return {k: check_type(v, val_t, f"{where}[{k!r}]") for k, v in value.items()}
    raise TypeError(f"check_type cannot check {tp!r}")  # a mistake in an op's declaration


def _bad(where: str, tp: Any, value: object) -> ProtocolError:
    return ProtocolError(f"{where} must be {_describe(tp)}, not {_json_type(value)}",
                         code=Refusal.BAD_REQUEST)


def to_json(value: Any) -> Any:
    """Enums, tuples and dataclasses as JSON has them (the inverse of ``check_type``). Other
    values become strings, as ``--json`` output renders them (paths, addresses), and
    non-finite floats null, which JSON lacks."""
    if isinstance(value, enum.Enum):
        return to_json(value.value)
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list | tuple | set | frozenset):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return str(value)


class _Dataclass(Protocol):
    __dataclass_fields__: typing.ClassVar[dict[str, Any]]


D = TypeVar("D", bound=_Dataclass)


def options_to_args(opts: _Dataclass, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """A frozen options dataclass (DumpOptions, RestoreOptions) as a JSON object."""
    skip = set(exclude)
    return {f.name: to_json(getattr(opts, f.name)) for f in dataclasses.fields(opts)
            if f.name not in skip}


def options_from_args(cls: type[D], args: Mapping[str, Any], *, where: str,
                      exclude: Iterable[str] = ()) -> D:
    """Rebuild an options dataclass from a JSON object, every field checked against its
    annotation; fields left out keep their defaults, unknown or ``exclude``d ones are refused."""
    skip = set(exclude)
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name not in skip}
    unknown = sorted(set(args) - names)
    if unknown:
        raise ProtocolError(
            f"{where}: unknown or not settable option(s) {', '.join(unknown)} "
            f"(settable: {', '.join(sorted(names))})", code=Refusal.BAD_REQUEST)
    values = {k: check_type(v, hints[k], f"{where} option {k}") for k, v in args.items()}
    try:
        return cls(**values)
    except ValueError as err:  # the dataclass's own range and form checks
        raise ProtocolError(f"{where}: {err}", code=Refusal.BAD_REQUEST) from err


# --- messages ----------------------------------------------------------------------------------


def canonical(obj: Any) -> bytes:
    """The one byte string a header is signed as: sorted keys, no spaces, ASCII only."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def new_id() -> str:
    return secrets.token_hex(8)


@dataclass(frozen=True)
class Request:
    op: str
    args: dict[str, Any]
    id: str
    ts: float
    nonce: str
    payload_len: int = 0
    payload_sha256: str = EMPTY_SHA256
    v: int = PROTOCOL_VERSION

    def header(self) -> dict[str, Any]:
        return {"v": self.v, "kind": str(Kind.REQUEST), "op": self.op, "id": self.id,
                "ts": self.ts, "nonce": self.nonce, "args": self.args,
                "payload_len": self.payload_len, "payload_sha256": self.payload_sha256}


@dataclass(frozen=True)
class Response:
    id: str
    re: str  # the nonce of the request this answers
    agent: str
    ok: bool
    ts: float
    nonce: str
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    payload_len: int = 0
    payload_sha256: str = EMPTY_SHA256
    v: int = PROTOCOL_VERSION

    def header(self) -> dict[str, Any]:
        return {"v": self.v, "kind": str(Kind.RESPONSE), "id": self.id, "re": self.re,
                "agent": self.agent, "ok": self.ok, "ts": self.ts, "nonce": self.nonce,
                "result": self.result, "error": self.error, "payload_len": self.payload_len,
                "payload_sha256": self.payload_sha256}


@dataclass(frozen=True)
class RefusalFrame:
    code: str
    reason: str
    hint: str | None = None
    supported: tuple[int, ...] = field(default_factory=lambda: tuple(sorted(SUPPORTED_VERSIONS)))


def build_request(op: str, args: Mapping[str, Any] | None = None, *, payload_len: int = 0,
                  payload_sha256: str = EMPTY_SHA256, ts: float | None = None,
                  nonce: str | None = None, id: str | None = None) -> Request:
    """A fresh request: new id and nonce, the current time (all overridable for tests)."""
    if not _OP.fullmatch(op):
        raise ValueError(f"{op!r} is not an operation name")
    return Request(op=op, args=dict(to_json(dict(args or {}))), id=id or new_id(),
                   ts=time.time() if ts is None else ts, nonce=nonce or auth.new_nonce(),
                   payload_len=payload_len, payload_sha256=payload_sha256)


def build_response(req: Request, agent: str, *, result: dict[str, Any] | None = None,
                   error: dict[str, Any] | None = None, payload_len: int = 0,
                   payload_sha256: str = EMPTY_SHA256) -> Response:
    return Response(id=req.id, re=req.nonce, agent=agent, ok=error is None,
                    ts=time.time(), nonce=auth.new_nonce(),
                    result=to_json(result) if error is None else None, error=to_json(error),
                    payload_len=payload_len, payload_sha256=payload_sha256)


def _frame(header: dict[str, Any]) -> bytes:
    data = canonical(header)
    if len(data) > MAX_HEADER:
        raise ProtocolError(f"a header of {len(data)} bytes exceeds {MAX_HEADER}",
                            code=Refusal.OVERSIZE)
    return _LEN.pack(len(data)) + data


def _signed(key: bytes, header: dict[str, Any]) -> bytes:
    return _frame({**header, "mac": auth.sign(key, canonical(header))})


def encode_request(key: bytes, req: Request) -> bytes:
    """The signed frame of ``req`` (its payload, if any, is sent right after it)."""
    return _signed(key, req.header())


def encode_response(key: bytes, resp: Response) -> bytes:
    return _signed(key, resp.header())


def encode_refusal(refusal: RefusalFrame) -> bytes:
    return _frame({"v": PROTOCOL_VERSION, "kind": str(Kind.REFUSAL), "code": refusal.code,
                   "reason": refusal.reason, "hint": refusal.hint,
                   "supported": list(refusal.supported)})


def refusal_for(err: ProtocolError) -> RefusalFrame:
    return RefusalFrame(code=str(err.code), reason=err.msg, hint=err.hint)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two values for one key would let a frame mean one thing to us and another to a checker.
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ProtocolError(f"the header repeats the key {k!r}")
        out[k] = v
    return out


def _no_constants(name: str) -> Any:
    raise ProtocolError(f"the header holds {name}, which JSON does not allow")


def decode_header(raw: bytes) -> dict[str, Any]:
    """Parse a header's bytes into its JSON object and check its version; nothing is trusted
    yet (the MAC is checked by ``open_request``/``open_response``)."""
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates,
                         parse_constant=_no_constants)
    except UnicodeDecodeError as err:
        raise ProtocolError(f"the header is not UTF-8 ({err.reason})") from err
    except json.JSONDecodeError as err:
        raise ProtocolError(f"the header is not JSON: {err.msg} at byte {err.pos}") from err
    except RecursionError as err:
        raise ProtocolError("the header nests too deeply") from err
    if not isinstance(obj, dict):
        raise ProtocolError(f"the header is {_json_type(obj)}, not a JSON object")
    v = obj.get("v")
    if not isinstance(v, int) or isinstance(v, bool):
        raise ProtocolError("the header has no protocol version ('v')")
    if v not in SUPPORTED_VERSIONS:
        raise VersionError(
            f"protocol version {v} is not supported here (this side speaks "
            f"{', '.join(map(str, sorted(SUPPORTED_VERSIONS)))})",
            hint="run the same orthros version on every host")
    return obj


def _field(header: Mapping[str, Any], name: str, tp: type[T]) -> T:
    value = header.get(name)
    ok = isinstance(value, tp) and not (tp is not bool and isinstance(value, bool))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ProtocolError(f"the header's {name!r} must be {tp.__name__}, "
                            f"not {_json_type(value)}")
    return typing.cast(T, value)


def _check_mac(key: bytes, header: dict[str, Any]) -> None:
    mac = header.get("mac")
    if not isinstance(mac, str) or not _HEX64.fullmatch(mac):
        raise AuthError("the frame is not signed (no valid 'mac')")
    body = {k: v for k, v in header.items() if k != "mac"}
    if not auth.verify(key, canonical(body), mac):
        raise AuthError("the frame's signature does not verify with this host's cluster key",
                        hint="every host must use the same cluster key file")


def _payload_fields(header: Mapping[str, Any]) -> tuple[int, str]:
    n = _field(header, "payload_len", int)
    digest = _field(header, "payload_sha256", str)
    if not 0 <= n <= MAX_PAYLOAD:
        raise ProtocolError(f"payload_len {n} is out of range", code=Refusal.OVERSIZE)
    if not _HEX64.fullmatch(digest):
        raise ProtocolError("payload_sha256 is not a SHA-256 in lowercase hex")
    return n, digest


def open_request(key: bytes, header: dict[str, Any],
                 guard: auth.ReplayGuard | None) -> Request:
    """Verify a decoded request header: signature first, then fields, then the replay window
    (only signed frames reach the nonce cache). Raises AuthError, ReplayError, ProtocolError."""
    _check_mac(key, header)
    if header.get("kind") != Kind.REQUEST:
        raise ProtocolError(f"expected a request, got a frame of kind {header.get('kind')!r}")
    op = _field(header, "op", str)
    if not _OP.fullmatch(op):
        raise ProtocolError(f"{op[:64]!r} is not an operation name", code=Refusal.BAD_REQUEST)
    rid = _field(header, "id", str)
    if not _ID.fullmatch(rid):
        raise ProtocolError("the request id must be 1-64 letters, digits or '._:-'")
    nonce = _field(header, "nonce", str)
    if not _HEX32.fullmatch(nonce):
        raise ProtocolError("the nonce must be 16 bytes in lowercase hex")
    ts = _field(header, "ts", float)
    args = _field(header, "args", dict)
    n, digest = _payload_fields(header)
    if guard is not None:
        guard.check(ts, nonce)
    return Request(op=op, args=args, id=rid, ts=ts, nonce=nonce, payload_len=n,
                   payload_sha256=digest, v=int(header["v"]))


def open_response(key: bytes, header: dict[str, Any], req: Request) -> Response:
    """Verify a decoded response header against the request it must answer. A refusal becomes
    AgentRefused (unauthenticated: it says why the agent would not run the request)."""
    if header.get("kind") == Kind.REFUSAL:
        reason = header.get("reason")
        hint = header.get("hint")
        raise AgentRefused(
            f"the agent refused the {req.op} request: "
            f"{reason if isinstance(reason, str) else 'no reason given'}",
            code=str(header.get("code", "")), hint=hint if isinstance(hint, str) else None)
    _check_mac(key, header)
    if header.get("kind") != Kind.RESPONSE:
        raise ProtocolError(f"expected a response, got a frame of kind {header.get('kind')!r}")
    if header.get("re") != req.nonce or header.get("id") != req.id:
        raise AuthError("the response does not answer this request (its id or nonce differs)")
    ok = _field(header, "ok", bool)
    result = header.get("result")
    error = header.get("error")
    if ok and not isinstance(result, dict):
        raise ProtocolError("a successful response carries no result object")
    if not ok and not isinstance(error, dict):
        raise ProtocolError("a failed response carries no error object")
    n, digest = _payload_fields(header)
    return Response(id=req.id, re=req.nonce, agent=str(header.get("agent", "")), ok=ok,
                    ts=_field(header, "ts", float), nonce=_field(header, "nonce", str),
                    result=result if ok else None, error=error if not ok else None,
                    payload_len=n, payload_sha256=digest, v=int(header["v"]))


# --- framing over a socket ---------------------------------------------------------------------


class Stream(Protocol):
    """What framing needs of a socket (a real one, or a test double)."""

    def recv_into(self, buffer: bytearray | memoryview, nbytes: int = ..., /) -> int: ...

    def sendall(self, data: bytes, /) -> None: ...


def recv_exact(sock: Stream, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ProtocolError(f"the connection closed in the middle of a frame "
                                f"({got} of {n} bytes)")
        got += k
    return bytes(buf)


def read_frame(sock: Stream, max_header: int = MAX_HEADER) -> bytes | None:
    """The header bytes of the next frame; None if the peer closed cleanly between frames."""
    first = bytearray(1)
    if sock.recv_into(first, 1) == 0:
        return None
    (n,) = _LEN.unpack(bytes(first) + recv_exact(sock, _LEN.size - 1))
    if n == 0:
        raise ProtocolError("an empty frame")
    if n > max_header:
        raise ProtocolError(f"a header of {n} bytes exceeds the limit of {max_header}",
                            code=Refusal.OVERSIZE)
    return recv_exact(sock, n)


class PayloadReader:
    """The payload that follows a header, read in chunks and checked against its SHA-256."""

    def __init__(self, sock: Stream, length: int, sha256: str) -> None:
        self.sock = sock
        self.length = length
        self.sha256 = sha256
        self.remaining = length
        self._hash = hashlib.sha256()

    @property
    def consumed(self) -> bool:
        return self.remaining == 0

    def chunks(self) -> Iterator[bytes]:
        """Yield the payload; after the last chunk, raise AuthError if it is not the one the
        signed header promised (a damaged or tampered transfer)."""
        buf = bytearray(min(CHUNK, max(self.remaining, 1)))
        view = memoryview(buf)
        while self.remaining:
            want = min(len(buf), self.remaining)
            k = self.sock.recv_into(view[:want], want)
            if k == 0:
                raise ProtocolError(f"the connection closed with {self.remaining} bytes of "
                                    "payload still to come")
            self.remaining -= k
            self._hash.update(view[:k])
            yield bytes(view[:k])
        if self._hash.hexdigest() != self.sha256:
            raise AuthError("the payload does not match the SHA-256 in its signed header",
                            hint="the transfer was damaged or tampered with; send it again")

    def copy_to(self, out: SinkFile) -> int:
        for chunk in self.chunks():
            out.write(chunk)
        return self.length

    def discard(self) -> None:
        for _ in self.chunks():
            pass


class SourceFile(Protocol):
    """An open file a payload is sent from (what ``open(path, "rb")`` returns)."""

    def read(self, size: int = ..., /) -> bytes: ...

    def seek(self, offset: int, whence: int = ..., /) -> int: ...

    def fileno(self) -> int: ...

    def close(self) -> None: ...


class SinkFile(Protocol):
    """An open file a payload is written to."""

    def write(self, data: bytes, /) -> int: ...


def file_digest(f: SourceFile) -> tuple[int, str]:
    """(size, sha256) of an open file from its start; leaves it positioned at 0."""
    f.seek(0)
    h = hashlib.sha256()
    size = 0
    while chunk := f.read(CHUNK):
        h.update(chunk)
        size += len(chunk)
    f.seek(0)
    return size, h.hexdigest()


def send_payload(sock: socket.socket, f: SourceFile, size: int) -> None:
    """Stream ``size`` bytes of ``f`` from its start (sendfile(2) where the kernel can)."""
    if size and isinstance(f, io.BytesIO):
        # In memory already: one write (socket.sendfile would send it 8 KiB at a time).
        data = f.getbuffer()[:size]
        if len(data) != size:
            raise ProtocolError(f"the payload is {len(data)} bytes, not {size}")
        sock.sendall(data)
        return
    if size:
        sent = sock.sendfile(f, 0, size)
        if sent != size:
            raise ProtocolError(f"the file shrank while being sent ({sent} of {size} bytes)")
