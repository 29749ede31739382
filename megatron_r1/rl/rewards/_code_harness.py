"""Assert-test harness, run inside the sandbox as ``python -I harness.py CHANNEL_FD CHECK.json``
(stdlib only; copied into the sandbox's working directory by code.py).

It runs the program's definitions, then ONE test, and writes one JSON line to the channel fd
(never to stdout, which belongs to the program):

- ``{"value": V}`` for a *value test* (``assert f(x) == <literal>``): V is the tagged encoding of
  ``f(x)``. The literal never enters the sandbox; the parent compares, so a program cannot pass
  by printing, exiting early, or returning an object whose ``__eq__`` says yes (only plain
  built-in data can be encoded).
- ``{"ok": true}`` for a *truth test* (any other assert): the assert ran with every comparison,
  ``not``, ``and``/``or`` and the final truth value forced through ``_mr1_cmp``/``_mr1_truth``,
  which accept plain built-in data only, and with pristine builtins (a program that replaced
  ``builtins.sorted`` does not change what the test calls).
- ``{"error": "..."}`` when the test raised.

A ``SystemExit`` (or any exception) in the program's own top level does not stop the test: the
test then runs against whatever the program had defined.
"""

import builtins
import json
import os
import sys

_PLAIN_SCALARS = (type(None), bool, int, float, str, bytes)
_PLAIN_CONTAINERS = (list, tuple, dict, set, frozenset)
_MAX_DEPTH = 64
_write, _exit, _dumps, _type, _len = os.write, os._exit, json.dumps, type, len


def _plain(v, depth=0) -> bool:
    t = _type(v)
    if t in _PLAIN_SCALARS:
        return True
    if depth > _MAX_DEPTH or t not in _PLAIN_CONTAINERS:
        return False
    if t is dict:
        return all(_plain(k, depth + 1) and _plain(x, depth + 1) for k, x in v.items())
    return all(_plain(x, depth + 1) for x in v)


def encode(v, depth=0):
    t = _type(v)
    if depth > _MAX_DEPTH:
        raise ValueError("value nested too deeply")
    if t is type(None):
        return ["N"]
    if t is bool:
        return ["b", v]
    if t is int:
        return ["i", str(v)]  # str() refuses > 4300 digits: a test error, not a hang
    if t is float:
        return ["f", repr(v)]
    if t is str:
        return ["s", v]
    if t is bytes:
        return ["y", v.hex()]
    if t is dict:
        return ["d", [[encode(k, depth + 1), encode(x, depth + 1)] for k, x in v.items()]]
    tag = {list: "l", tuple: "t", set: "S", frozenset: "F"}.get(t)
    if tag is None:
        raise TypeError(f"test value of type {t.__name__!r} is not plain data")
    return [tag, [encode(x, depth + 1) for x in v]]


_OPS = {
    "Eq": lambda a, b: a == b, "NotEq": lambda a, b: a != b, "Lt": lambda a, b: a < b,
    "LtE": lambda a, b: a <= b, "Gt": lambda a, b: a > b, "GtE": lambda a, b: a >= b,
    "Is": lambda a, b: a is b, "IsNot": lambda a, b: a is not b,
    "In": lambda a, b: a in b, "NotIn": lambda a, b: a not in b,
}


def _mr1_cmp(ops, operands):
    for v in operands:
        if not _plain(v):
            raise AssertionError(f"compared a {_type(v).__name__}, not plain data")
    for op, a, b in zip(ops, operands, operands[1:]):
        if not _OPS[op](a, b):
            return False
    return True


def _mr1_truth(v):
    if not _plain(v):
        raise AssertionError(f"truth value of a {_type(v).__name__}, not plain data")
    return bool(v)


def main() -> None:
    channel = int(sys.argv[1])
    with open(sys.argv[2], encoding="utf-8") as f:
        check = json.load(f)
    with open(check["program"], encoding="utf-8") as f:
        program = f.read()
    pristine = dict(builtins.__dict__)
    g = {"__name__": "solution", "__builtins__": builtins}
    try:
        exec(compile(program, "solution.py", "exec"), g)
    except BaseException:  # noqa: BLE001 - the tests judge what got defined
        pass
    tg = dict(g)
    tg["__builtins__"] = pristine
    tg["_mr1_cmp"], tg["_mr1_truth"] = _mr1_cmp, _mr1_truth
    try:
        exec(compile(check["setup"], "tests.py", "exec"), tg)
        if check["kind"] == "value":
            reply = {"value": encode(eval(compile(check["source"], "tests.py", "eval"), tg))}
        else:
            exec(compile(check["source"], "tests.py", "exec"), tg)
            reply = {"ok": True}
    except BaseException as e:  # noqa: BLE001 - any failure is a failed test
        reply = {"error": f"{_type(e).__name__}: {e}"[:300]}
    try:
        line = _dumps(reply) + "\n"
    except BaseException as e:  # noqa: BLE001
        line = _dumps({"error": f"unencodable result: {_type(e).__name__}"}) + "\n"
    data = line.encode("utf-8", "replace")
    while data:
        data = data[_write(channel, data):]
    _exit(0)


if __name__ == "__main__":
    main()
