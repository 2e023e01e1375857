"""The agent's fixed table of operations, and the dispatch of a request through it.

Each operation is a function registered with ``@op``; its parameters, with their annotations and
defaults, are the operation's arguments, and every request's ``args`` are checked against them
before the function runs (``Op.bind``). Nothing else can be called: an op name that is not in
``OPS`` is refused. The operations live in ``orthros_py.agent.ops``, one module per interface;
``OPS`` is filled by importing that package (the server does). To add an operation, write a
function ``(call: Call, ...) -> dict | Reply`` in the module of its interface and decorate it.

No privileges here; the operations say what they need.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar, get_type_hints

from orthros_py.agent.errors import ProtocolError, Refusal
from orthros_py.agent.protocol import (
    EMPTY_SHA256,
    PayloadReader,
    Request,
    SourceFile,
    check_type,
)
from orthros_py.agent.state import Agent
from orthros_py.errors import MissingFeatureError


@dataclass
class Call:
    """What a handler gets besides its arguments."""

    agent: Agent
    peer: str
    payload: PayloadReader | None = None


@dataclass
class Reply:
    """A result, optionally with a file streamed after it (``send_file``)."""

    result: dict[str, Any]
    payload: SourceFile | None = None
    payload_len: int = 0
    payload_sha256: str = EMPTY_SHA256


Handler = Callable[..., "dict[str, Any] | Reply"]
F = TypeVar("F", bound=Handler)
_REQUIRED: Any = inspect.Parameter.empty


@dataclass(frozen=True)
class Param:
    name: str
    tp: Any
    default: Any = _REQUIRED

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


@dataclass(frozen=True)
class Op:
    name: str
    handler: Handler
    params: tuple[Param, ...]
    payload: bool = False  # does a request carry a payload (a file) for this op?
    doc: str = ""

    def bind(self, args: dict[str, Any]) -> dict[str, Any]:
        """``args`` checked against the handler's parameters, defaults filled in."""
        known = {p.name for p in self.params}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ProtocolError(
                f"{self.name} takes no argument(s) {', '.join(unknown)} "
                f"(it takes: {', '.join(sorted(known)) or 'none'})", code=Refusal.BAD_REQUEST)
        bound: dict[str, Any] = {}
        for p in self.params:
            if p.name in args:
                bound[p.name] = check_type(args[p.name], p.tp, f"argument {p.name} of {self.name}")
            elif p.required:
                raise ProtocolError(f"{self.name} needs the argument {p.name}",
                                    code=Refusal.BAD_REQUEST)
            else:
                bound[p.name] = p.default
        return bound

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "payload": self.payload, "doc": self.doc,
                "params": [{"name": p.name, "type": str(p.tp), "required": p.required}
                           for p in self.params]}


OPS: dict[str, Op] = {}


def op(name: str, *, payload: bool = False) -> Callable[[F], F]:
    """Register a handler as operation ``name``; its signature declares the arguments."""

    def register(fn: F) -> F:
        hints = get_type_hints(fn)
        params = tuple(Param(p.name, hints[p.name], p.default)
                       for p in list(inspect.signature(fn).parameters.values())[1:])
        if name in OPS:
            raise ValueError(f"operation {name} is registered twice")
        doc = (inspect.getdoc(fn) or "").split("\n\n")[0].replace("\n", " ")
        OPS[name] = Op(name, fn, params, payload, doc)
        return fn

    return register


def dispatch(agent: Agent, req: Request, payload: PayloadReader | None, peer: str) -> Reply:
    """Run an authenticated request through the table."""
    entry = OPS.get(req.op)
    if entry is None:
        raise ProtocolError(f"unknown operation {req.op!r}", code=Refusal.BAD_REQUEST,
                            hint="this agent knows: " + ", ".join(sorted(OPS)))
    if req.payload_len and not entry.payload:
        raise ProtocolError(f"{req.op} takes no payload", code=Refusal.BAD_REQUEST)
    kwargs = entry.bind(req.args)
    if kwargs.get("netns") is not None:
        # Every op that enters a namespace takes it as ``netns``: one check for all of them.
        kwargs["netns"] = agent.option_policy.netns(kwargs["netns"])
    out = entry.handler(Call(agent, peer, payload if entry.payload else None), **kwargs)
    return out if isinstance(out, Reply) else Reply(out)


def feature(module: str, what: str) -> ModuleType:
    """Import ``module`` on first use; MissingFeatureError if this orthros lacks it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingFeatureError(
            f"this agent cannot {what}: {module} is not available here ({err})",
            hint="install the same orthros version, with its dependencies, on every host",
        ) from err


def bad_request(msg: str) -> ProtocolError:
    return ProtocolError(msg, code=Refusal.BAD_REQUEST)
