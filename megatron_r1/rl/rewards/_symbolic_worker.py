"""Worker process for symbolic answer equivalence (run as a script by verifier.py; stdlib
and math-verify/sympy only, so it never imports megatron_r1 or torch).

Protocol: one JSON list per line on stdin, ``[task_id, pred, gold]``; one reply per line on
stdout, ``[task_id, equal: bool, error: str | null]``. The parent (verifier.py) kills this
process when a reply is late, so nothing here needs to be interruptible.
"""

import json
import logging
import os
import re
import resource
import signal
import sys

if __name__ == "__main__" and sys.path and os.path.samefile(sys.path[0], os.path.dirname(__file__)):
    sys.path.pop(0)  # run as a script: our sibling modules (language.py, ...) must not shadow others

MEMORY_LIMIT_ENV = "MEGATRON_R1_VERIFIER_MEMORY_BYTES"
SOFT_TIMEOUT_ENV = "MEGATRON_R1_VERIFIER_SOFT_TIMEOUT"


def _math_verify_equal(pred: str, gold: str, soft_timeout: int) -> bool:
    from math_verify import parse, verify

    # `$…$` makes math-verify read the bare answer as LaTeX (it otherwise looks for anchors
    # such as "the answer is" or \boxed); the soft timeout is math-verify's own SIGALRM,
    # which lets us survive slow-but-finite cases without a respawn.
    gold_parsed = parse(f"${_paren_sqrt(gold)}$", parsing_timeout=soft_timeout)
    pred_parsed = parse(f"${_paren_sqrt(pred)}$", parsing_timeout=soft_timeout)
    if not gold_parsed or not pred_parsed:
        return False
    if not verify(gold_parsed, pred_parsed, timeout_seconds=soft_timeout):
        return False
    return _exact_rationals_agree(gold_parsed[0], pred_parsed[0])


# math-verify reads "4\sqrt(2)" as "4" (it drops what follows a command it cannot parse), so a
# parenthesised argument is given braces first: "4\sqrt{2}" is then compared as 4*sqrt(2).
_PAREN_SQRT_RE = re.compile(r"\\sqrt\s*\(([^()]*)\)")


def _paren_sqrt(s: str) -> str:
    return _PAREN_SQRT_RE.sub(r"\\sqrt{\1}", s)


def _exact_rationals_agree(gold, pred) -> bool:
    """math-verify compares numbers after rounding, so 1/2^99 "equals" 1/2^98 and 1/2004!
    "equals" 1/2006!. When both sides are exact rationals, their exact values decide."""
    import sympy

    if not (isinstance(gold, sympy.Expr) and isinstance(pred, sympy.Expr)):
        return True
    gold, pred = gold.doit(), pred.doit()
    if gold.is_Rational and pred.is_Rational:
        return gold == pred
    return True


# sympy's parse_expr is eval(): without math-verify, a plain (non-LaTeX) answer reaches it only
# when it is made of digits, operators, single-letter symbols and these names, so an answer
# such as "__import__('os').system(...)" or "open(chr(47)+...)" is refused, never run.
_PLAIN_EXPR_RE = re.compile(r"[0-9A-Za-z\s+\-*/^().,=]*")
_PLAIN_NAMES = frozenset("sqrt pi sin cos tan cot sec csc asin acos atan sinh cosh tanh log ln exp "
                         "abs Abs oo E I factorial binomial gcd lcm floor ceiling".split())


def _check_plain_expr(s: str) -> None:
    if not _PLAIN_EXPR_RE.fullmatch(s):
        raise ValueError("not a plain math expression")
    for name in re.findall(r"[A-Za-z]{2,}", s):
        if name not in _PLAIN_NAMES:
            raise ValueError(f"name {name[:20]!r} is not allowed in a plain math expression")


def _sympy_equal(pred: str, gold: str) -> bool:
    import sympy
    from sympy.parsing.sympy_parser import (
        convert_xor,
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )

    def to_expr(s: str):
        if "\\" in s:
            from sympy.parsing.latex import parse_latex

            return parse_latex(s, backend="lark")  # the antlr backend pins antlr4 4.11
        _check_plain_expr(s)
        transformations = standard_transformations + (convert_xor, implicit_multiplication_application)
        return parse_expr(s, transformations=transformations)

    a, b = to_expr(pred), to_expr(gold)
    return sympy.simplify(a - b) == 0


def symbolic_equal(pred: str, gold: str, soft_timeout: int = 5) -> bool:
    try:
        import math_verify  # noqa: F401
    except ImportError:
        return _sympy_equal(pred, gold)
    return _math_verify_equal(pred, gold, soft_timeout)


def main() -> None:
    # Ctrl-C in a terminal reaches the whole process group: the trainer finishes its step (rewards
    # included) and saves; this worker must not die, or score a KeyboardInterrupt as "not equal".
    # The parent ends it (stdin closed, or killed when late).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    memory_limit = int(os.environ.get(MEMORY_LIMIT_ENV, "0"))
    if memory_limit > 0:
        # Bombs that allocate (huge integers) then die with MemoryError instead of
        # swapping the node to death.
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    soft_timeout = int(os.environ.get(SOFT_TIMEOUT_ENV, "5"))
    logging.disable(logging.WARNING)  # math-verify warns on every unparsable answer

    # Keep the protocol channel private: whatever a library prints, from Python or C, goes to
    # stderr, because fd 1 itself now points there.
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    symbolic_equal("1", "1", soft_timeout)  # import now, so a broken install fails at start-up
    protocol.write(json.dumps(["ready", True, None]) + "\n")
    for line in sys.stdin:
        task_id, pred, gold = json.loads(line)
        try:
            reply = [task_id, symbolic_equal(pred, gold, soft_timeout), None]
        except BaseException as e:  # noqa: BLE001 - any failure to verify means "not equal"
            reply = [task_id, False, f"{type(e).__name__}: {e}"[:200]]
        protocol.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
