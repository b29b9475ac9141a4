"""A system's body_template: a jq program (the `jq` package, libjq itself) that turns the
default delivery body into the body sent. Compiled once per program text and process; a
program that does not compile is refused when the system is saved; one that fails on a
record at send time is a permanent failure, with jq's message, in the dead letter.

jq runs inside this process and holds the GIL while it runs, so a template is kept to what
maps one record: it may not read the environment (`$ENV`, `env`: the secret key is there)
or files (`import`, `include`, `input`), define functions (the way to recursion), loop
(`repeat`, `while`, `until`, `range`, `recurse`, `infinite`, `combinations`) or use regular
expressions (`test`, `match`, `split/2`…: a backtracking pattern can run for hours on one
string). Templates are checked
for those words when they are saved and again when they are compiled; the program also runs
with `env` and `$ENV` bound to `{}`, in case a word got past the check."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from typing import Any

import jq
import orjson


class MappingError(Exception):
    """The template failed on this record (jq's message), or gave no single JSON value."""


FORBIDDEN = frozenset({
    "$ENV", "env", "$__prog_args", "input", "inputs", "input_filename", "input_line_number",
    "get_search_list", "import", "include", "def", "repeat", "while", "until", "range",
    "recurse", "recurse_down", "infinite", "combinations", "test", "match", "capture",
    "scan", "splits", "split/2", "sub", "gsub", "_match_impl", "debug", "stderr", "halt",
    "halt_error",
})
_WORD = re.compile(r"\$?[A-Za-z_][A-Za-z0-9_]*")
# jq's own wrapper: the environment is empty whatever the program says
_SHIELD = "def env: {{}}; {{}} as $ENV | ({program}\n)"


def _code(program: str) -> str:
    """The program with the text of its string literals blanked (their interpolations
    `\\( … )` kept, they are code) and its comments removed."""
    out: list[str] = []
    # a stack of what we are in: "code" (with its open parentheses) or "string"
    stack: list[list[Any]] = [["code", 0]]
    i = 0
    while i < len(program):
        char, top = program[i], stack[-1]
        if top[0] == "string":
            if char == "\\" and program[i + 1:i + 2] == "(":
                stack.append(["code", 1])
                out.append(" (")
                i += 2
                continue
            if char == "\\":
                out.append("  ")
                i += 2
                continue
            if char == '"':
                stack.pop()
            out.append('"' if char == '"' else " ")
        elif char == '"':
            stack.append(["string"])
            out.append('"')
        elif char == "#":
            while i < len(program) and program[i] != "\n":
                i += 1
            continue
        else:
            if char == "(":
                top[1] += 1
            elif char == ")":
                top[1] -= 1
                if top[1] == 0 and len(stack) > 1:
                    stack.pop()
            out.append(char)
        i += 1
    return "".join(out)


def _words(program: str) -> Iterator[str]:
    """The names the program uses: not field names (`.name`), object keys (`{name: …}`)
    or the text of strings."""
    code = _code(program)
    for match in _WORD.finditer(code):
        before = code[:match.start()].rstrip()[-1:]
        after = code[match.end():].lstrip()[:2]
        # an object key is a word right after `{` or `,` and before `:` (in a slice,
        # `.[halt:]`, the word before `:` is code)
        if before == "." or (before in ("{", ",") and after[:1] == ":" and after != "::"
                             and not match.group().startswith("$")):
            continue
        word = match.group()
        if word == "split" and _two_arguments(code, match.end()):
            yield "split/2"  # split(re; flags): a regular expression
            continue
        yield word


def _two_arguments(code: str, end: int) -> bool:
    """Whether the call whose name ends at `end` has a `;` among its arguments."""
    rest = code[end:].lstrip()
    if not rest.startswith("("):
        return False
    depth = 0
    for char in rest:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
            if depth == 0:
                return False
        elif char == ";" and depth == 1:
            return True
    return False


def refused_word(template: str) -> str | None:
    """Why the template may not be used (a word it may not use), or None."""
    for word in _words(template):
        if word in FORBIDDEN:
            return (f"may not use {word!r}: a template maps one record, and may not read the "
                    "environment or files, define functions, loop or use regular "
                    "expressions (docs/connecting.md)")
    return None


@functools.lru_cache(maxsize=256)
def compiled(template: str) -> Any:
    """The compiled program (ValueError with jq's message if it does not compile, or with
    the word it may not use)."""
    refused = refused_word(template)
    if refused is not None:
        raise ValueError(refused)
    jq.compile(template)  # jq's message, about the program as written, if it does not compile
    return jq.compile(_SHIELD.format(program=template))


def check_template(template: str) -> str | None:
    """Why the template cannot be used, or None."""
    try:
        compiled(template)
    except ValueError as error:
        return str(error)
    return None


def apply_template(template: str, body: Any) -> Any:
    """The one JSON value the template makes of `body`."""
    # The input as text made by orjson: a sixth faster than input_value's json.dumps.
    return apply_template_to_text(template, orjson.dumps(body).decode())


def apply_template_to_text(template: str, text: str) -> Any:
    """The one JSON value the template makes of the JSON `text`."""
    try:
        outputs = compiled(template).input_text(text).all()
    except ValueError as error:
        raise MappingError(f"body_template failed: {error}") from None
    if len(outputs) != 1:
        raise MappingError(f"body_template gave {len(outputs)} values; it must give exactly "
                           "one (wrap a stream in [ … ])")
    return outputs[0]
