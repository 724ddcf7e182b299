"""The model spec grammar: ``arch(key=value, ...)+plugin(key=value, ...)+...``.

Terms are joined by ``+``; the first may be an architecture, the rest are plugins applied left
to right. Arguments are keyword literals only (int, float, str, bool, None, lists/tuples of
these). Parsing uses Python's tokenizer and ``ast`` and never evaluates code.
``str(spec)`` is the canonical form: lower-case names, parameters in schema order, values
normalised to their declared types, so that ``parse_spec(str(s)) == s``.
"""

from __future__ import annotations

import ast
import difflib
import io
import math
import re
import tokenize
from dataclasses import dataclass
from typing import Any

from ..errors import SpecError
from .registry import Entry, all_entries, get_entry

LITERAL_TYPES = (int, float, str, bool, type(None))
# Limits checked before anything is parsed (a spec is a short line, never a program).
MAX_LENGTH = 2000  # characters
MAX_TERMS = 32  # architecture + plugins
MAX_DEPTH = 3  # bracket nesting: term(...), a list [...], a list inside it
MAX_ITEMS = 64  # values in one list
QUOTE = 60  # characters of the offending text an error message quotes


@dataclass(frozen=True)
class Term:
    """One ``name(key=value, ...)``; ``params`` are (name, value) pairs in schema order."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    def __str__(self) -> str:
        if not self.params:
            return self.name
        args = ",".join(f"{k}={format_value(v)}" for k, v in self.params)
        return f"{self.name}({args})"


@dataclass(frozen=True)
class Spec:
    """A parsed, validated spec: an optional architecture term and the plugin terms in order."""

    arch: Term | None
    plugins: tuple[Term, ...] = ()

    @property
    def terms(self) -> tuple[Term, ...]:
        return ((self.arch,) if self.arch else ()) + self.plugins

    def __str__(self) -> str:
        return "+".join(str(t) for t in self.terms)

    def with_arch_params(self, **overrides) -> "Spec":
        """A copy whose architecture term has ``overrides`` merged in (validated)."""
        if self.arch is None:
            raise SpecError("the spec names no architecture")
        merged = {**self.arch.kwargs, **overrides}
        entry = get_entry(self.arch.name)
        return Spec(_validated_term(entry, merged, {}, None), self.plugins)


def format_value(v) -> str:
    if isinstance(v, tuple):
        inner = ",".join(format_value(x) for x in v)
        return f"[{inner}]"
    return repr(v)


def parse_spec(text: str, require_arch: bool = True) -> Spec:
    """Parse and validate a spec string against the registry; raise SpecError on any fault.

    With ``require_arch=False`` a spec of plugins only (``"lfa+frem"``) is accepted, as
    ``apply_plugins`` needs.
    """
    if not isinstance(text, str):
        raise SpecError(f"expected a string, got {type(text).__name__}")
    if not text.strip():
        raise SpecError("empty spec; expected e.g. 'unet' or 'unet+lfa(m=7)'", column=1)
    check_limits(text)
    try:
        tree = ast.parse("(" + text + "\n)", mode="eval")
    except SyntaxError as e:
        dangling = re.search(r"\+\s*(?=\+|$)", text)  # 'unet+', 'unet++', 'unet++lfa'
        if dangling:
            hint = (" (smp's Unet++ is 'unetplusplus')"
                    if text[:dangling.start()].strip().lower().endswith("unet") else "")
            raise SpecError(f"a '+' with no term after it{hint}; expected e.g. 'unet+lfa(m=7)'",
                            column=dangling.start() + 1) from None
        col = max(1, (e.offset or 2) - 1) if (e.lineno or 1) == 1 else None
        raise SpecError(f"syntax error: {e.msg}", column=col) from None
    nodes = _flatten(tree.body)
    terms: list[Term] = []
    for i, node in enumerate(nodes):
        name, col, args, kwargs = _term_parts(node)
        entry = get_entry(name)
        if entry is None:
            raise SpecError(f"unknown name {quote(name)}{_did_you_mean(name)}", col, name)
        if i == 0 and require_arch and entry.kind != "arch":
            raise SpecError(
                f"a spec starts with an architecture, got plugin {name!r} "
                f"(e.g. 'unet+{name}')", col, name)
        if i > 0 and entry.kind == "arch":
            raise SpecError(
                f"{name!r} is an architecture; only the first term may be one", col, name)
        if args:
            raise SpecError(
                f"positional argument not allowed; use name=value ({_valid_names(entry)})",
                args[0].col_offset, name)
        terms.append(_validated_term(entry, _literal_kwargs(entry, kwargs), kwargs, col))
        _check_combination(terms, entry, col)
    arch = terms[0] if get_entry(terms[0].name).kind == "arch" else None
    return Spec(arch, tuple(terms[1:] if arch else terms))


def quote(text: str) -> str:
    """``text`` for an error message: at most :data:`QUOTE` characters, repr-quoted."""
    return repr(text if len(text) <= QUOTE else text[:QUOTE - 1] + "…")


def check_limits(text: str) -> None:
    """Refuse, before parsing, what is not a spec or is larger than the stated limits."""
    if len(text) > MAX_LENGTH:
        raise SpecError(f"the spec is {len(text)} characters long; the limit is {MAX_LENGTH}")
    bad = next((i for i, ch in enumerate(text) if not ch.isprintable() and ch not in " \t"), None)
    if bad is not None:
        raise SpecError(f"character {text[bad]!r} is not allowed in a spec", bad + 1)
    terms = 1
    opened: list[tuple[str, int]] = []  # (bracket, column) of the brackets not yet closed
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            col = tok.start[1] + 1
            if tok.type == tokenize.COMMENT:
                raise SpecError(f"comments are not allowed in a spec: {quote(tok.string)}", col)
            if tok.type == tokenize.ERRORTOKEN and tok.string[:1] in ("'", '"'):
                raise SpecError(f"the quote {tok.string[:1]} is never closed", col)
            if tok.type == tokenize.OP and tok.string in "([{":
                opened.append((tok.string, col))
                if len(opened) > MAX_DEPTH:
                    raise SpecError(f"brackets nest deeper than {MAX_DEPTH}", col)
            elif tok.type == tokenize.OP and tok.string in ")]}":
                if not opened or "([{"[")]}".index(tok.string)] != opened[-1][0]:
                    raise SpecError(f"unmatched {tok.string!r}", col)
                opened.pop()
            elif tok.type == tokenize.OP and tok.string == "+" and not opened:
                terms += 1
                if terms > MAX_TERMS:
                    raise SpecError(f"more than {MAX_TERMS} terms", col)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass  # the parser says where
    if opened:
        raise SpecError(f"{opened[-1][0]!r} was never closed", opened[-1][1])


def _flatten(node) -> list:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _flatten(node.left) + _flatten(node.right)
    return [node]


def _column(node) -> int:
    # The text was wrapped in "(": col_offset of the first line is one too far right, and
    # col_offset is 0-based, so the 1-based column is col_offset itself.
    return node.col_offset if node.lineno == 1 else node.col_offset + 1


def _term_parts(node):
    if isinstance(node, ast.Name):
        return node.id.lower(), _column(node), [], []
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        return node.func.id.lower(), _column(node), node.args, node.keywords
    raise SpecError(f"expected name or name(key=value, ...) joined by '+', got "
                    f"{quote(ast.unparse(node))}", _column(node))


def _literal_kwargs(entry: Entry, keywords) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kw in keywords:
        col = _column(kw.value) if kw.arg is None else _column(kw)
        if kw.arg is None:
            raise SpecError("'**' arguments are not allowed", col, entry.name)
        try:
            value = ast.literal_eval(kw.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise SpecError(
                f"{quote(kw.arg + '=' + ast.unparse(kw.value))}: only literal values are "
                "allowed (numbers, strings, True/False/None, lists)", col, entry.name) from None
        if not _is_plain_literal(value):
            raise SpecError(
                f"{quote(kw.arg + '=' + ast.unparse(kw.value))}: only finite numbers, strings, "
                "True/False/None and lists of these are allowed", col, entry.name)
        if isinstance(value, (list, tuple)) and len(value) > MAX_ITEMS:
            raise SpecError(f"{kw.arg}: a list of {len(value)} values; the limit is "
                            f"{MAX_ITEMS}", col, entry.name)
        param = entry.param(kw.arg)
        if param is None:
            raise SpecError(f"unknown parameter {quote(kw.arg)} ({_valid_names(entry, kw.arg)})",
                            col, entry.name)
        if param.name in out:
            raise SpecError(f"parameter {param.name!r} given twice", col, entry.name)
        out[param.name] = value
    return out


def _is_plain_literal(value) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_plain_literal(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, LITERAL_TYPES)


def _validated_term(entry: Entry, values: dict[str, Any], keywords, col) -> Term:
    cols = {kw.arg.lower(): _column(kw) for kw in keywords if kw.arg}
    params = []
    for p in entry.params:
        if p.name in values:
            try:
                params.append((p.name, p.check(values[p.name])))
            except ValueError as e:
                raise SpecError(f"{p.name}: {e}", cols.get(p.name.lower(), col),
                                entry.name) from None
    for name in values:
        if entry.param(name) is None:
            raise SpecError(f"unknown parameter {quote(name)} ({_valid_names(entry, name)})", col,
                            entry.name)
    missing = [p.name for p in entry.params if p.required and p.name not in values]
    if missing:
        raise SpecError(f"missing required parameter(s) {', '.join(missing)}", col, entry.name)
    return Term(entry.name, tuple(params))


def _check_combination(terms: list[Term], entry: Entry, col: int | None, built: int = 0) -> None:
    """The rules for ``entry``, the last of ``terms``: an architecture it supports, once only,
    one plugin of an exclusive group. The first ``built`` terms are on the model already
    (:func:`check_added`)."""
    arch = terms[0].name if get_entry(terms[0].name).kind == "arch" else None
    if entry.kind != "plugin":
        return
    if arch is not None and not entry.supports_arch(arch):
        raise SpecError(
            f"plugin {entry.name!r} does not support arch {arch!r}; "
            f"it supports: {', '.join(entry.supported_archs())}", col, entry.name)

    def there(index: int) -> str:
        return f"; the model has {terms[index].name!r} already" if index < built else ""

    names = [t.name for t in terms]
    if not entry.repeatable and names.count(entry.name) > 1:
        raise SpecError(f"plugin {entry.name!r} may appear only once"
                        f"{there(names.index(entry.name))}", col, entry.name)
    if entry.exclusive:
        rivals = [i for i, t in enumerate(terms[:-1]) if t.name != entry.name
                  and get_entry(t.name).exclusive == entry.exclusive]
        if rivals:
            raise SpecError(f"plugin {entry.name!r} cannot be combined with "
                            f"{names[rivals[0]]!r} (both are {entry.exclusive} plugins)"
                            f"{there(rivals[0])}", col, entry.name)


def check_added(applied: tuple[str, ...], plugins: tuple[Term, ...]) -> None:
    """Raise SpecError where ``plugins``, applied to a model that has the plugins named
    ``applied`` already (``apply_plugins`` again), break a rule a spec enforces."""
    terms = [Term(name, ()) for name in applied]
    for term in plugins:
        terms.append(term)
        _check_combination(terms, get_entry(term.name), None, len(applied))


def _did_you_mean(name: str) -> str:
    names = [e.name for e in all_entries()]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    if close:
        return f"; did you mean {' or '.join(repr(c) for c in close)}?"
    return "; run 'cellseg list' to see all names"


def _valid_names(entry: Entry, name: str | None = None) -> str:
    """The parameters to choose from: all of them when they fit in a short line, else the
    closest to ``name`` and where to see the rest."""
    if not entry.params:
        return f"{entry.name!r} takes no parameters"
    names = [p.name for p in entry.params]
    if len(", ".join(names)) <= 80:
        return "valid: " + ", ".join(names)
    close = difflib.get_close_matches((name or "").lower(), names, n=2, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return f"{hint}'cellseg list {entry.name}' shows all {len(names)}"
