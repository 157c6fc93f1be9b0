"""The Lean proof screen: what a model's proof may contain, and the file it becomes.

The model supplies a proof only. The file Lean checks is always built from
the problem's own header and official statement plus that proof
(`build_source`): either the tactics that follow the statement's `:= by`, or
a whole `theorem NAME ... := proof` whose statement must equal the official
one token for token (comments and layout aside), so `claim ∨ True`, a
changed hypothesis or another name gets nothing. What the model wrote
before its `theorem` (imports, `open`s, helper lemmas) is dropped.

Before anything is compared or checked the proof is lexed properly: nested
`/- -/` block comments and `--` line comments are removed first (so a
comment cannot hide or fake a token), and string literals, `«»` names and
unterminated comments are refused outright. The remaining tokens must not
contain (`screen`):

- proof escapes: sorry, admit, sorryAx, axiom, native_decide (unless
  allowed), ofReduceBool / reduceBool,
- code that runs at elaboration time or defines syntax: any `#command`
  (#eval, #exit, #print, ...), run_cmd, run_tac, run_elab, run_meta, elab,
  elab_rules, macro, macro_rules, syntax, notation and its infix forms,
  declare_syntax_cat, initialize, attributes (`@[...]`, attribute),
- anything unsafe or external: identifiers starting with `unsafe`,
  implemented_by, extern, partial, the namespaces Lean, IO, System, EIO,
  BaseIO, ST (meta-programming and IO),
- new commands or scopes: theorem, lemma, def, example, instance, open
  (also `open ... in`), namespace, section, end, variable, universe, import,
  export, mutual, private, protected, noncomputable, local, scoped,
- set_option, except `set_option maxHeartbeats N in` / `maxRecDepth N`.
"""

from __future__ import annotations

import re

FORBIDDEN_WORDS = frozenset("""
sorry admit sorryAx axiom axioms ofReduceBool reduceBool
run_cmd run_tac run_elab run_meta elab elab_rules macro macro_rules syntax notation
infix infixl infixr prefix postfix declare_syntax_cat initialize builtin_initialize
attribute implemented_by extern partial opaque
theorem lemma def example instance abbrev structure class inductive open namespace section
end variable universe import export mutual private protected noncomputable local scoped
omit include deriving
""".split())
FORBIDDEN_NAMESPACES = ("Lean", "IO", "System", "EIO", "BaseIO", "ST", "Elab", "Meta")
ALLOWED_OPTIONS = ("maxHeartbeats", "maxRecDepth")
_IDENT = re.compile(r"[^\W\d][\w'!?₀-₉ₐ-ₜᵢ-ᵪ]*(?:\.[^\W\d][\w'!?₀-₉ₐ-ₜᵢ-ᵪ]*)*")
_TOKEN = re.compile(rf"#[A-Za-z_]\w*|@\[|{_IDENT.pattern}|\d+(?:\.\d+)?|:=|\S")
_FENCE = re.compile(r"```[ \t]*(?:lean4|lean)?[ \t]*\n(.*?)```", re.S)


class Refused(ValueError):
    """The proof is refused without running Lean (the message says why)."""


def strip_comments(text: str) -> str:
    """`text` with comments blanked out (same length and lines), strings refused."""
    out, i, n = [], 0, len(text)
    while i < n:
        if text.startswith("/-", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/-", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("-/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            if depth:
                raise Refused("unterminated /- comment")
            out.append("".join(c if c == "\n" else " " for c in text[i:j]))
            i = j
        elif text.startswith("--", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text[i] == '"':
            raise Refused("string literals are not allowed in a proof")
        elif text[i] in "«»":
            raise Refused("«quoted» names are not allowed in a proof")
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def tokens(text: str) -> list[tuple[str, int, int]]:
    """(token, start, end) of comment-free Lean text."""
    return [(m.group(), m.start(), m.end()) for m in _TOKEN.finditer(text)]


def screen(body: str, allow_native_decide: bool = False) -> None:
    """Raise Refused when the comment-free proof `body` holds a forbidden token."""
    toks = [t for t, _, _ in tokens(body)]
    for k, tok in enumerate(toks):
        if tok.startswith("#"):
            raise Refused(f"{tok}: commands are not allowed in a proof")
        if tok == "@[":
            raise Refused("attributes are not allowed in a proof")
        parts = tok.split(".")
        if tok == "native_decide" and not allow_native_decide:
            raise Refused("native_decide is not allowed (task option allow_native_decide)")
        for part in parts:
            if part in FORBIDDEN_WORDS or part.startswith("unsafe") or part.startswith("sorry"):
                raise Refused(f"{tok!r} is not allowed in a proof")
        if parts[0] in FORBIDDEN_NAMESPACES:
            raise Refused(f"{tok!r}: meta-programming and IO are not allowed in a proof")
        if tok == "set_option":
            option, value = (toks[k + 1:k + 3] + ["", ""])[:2]
            if option not in ALLOWED_OPTIONS or not value.isdigit():
                raise Refused(f"set_option {option} is not allowed in a proof")


def _statement_tokens(statement: str) -> list[str]:
    return [t for t, _, _ in tokens(strip_comments(statement))]


def build_source(header: str, statement: str, name: str, text: str,
                 allow_native_decide: bool = False) -> str:
    """The Lean file for a completion `text` (raises Refused).

    `statement` is the official theorem ending with ":= by"; the proof is the
    completion's last ```lean block, or the whole text.
    """
    blocks = _FENCE.findall(text)
    raw = blocks[-1] if blocks else text
    clean = strip_comments(raw)
    if not clean.strip():
        raise Refused("empty proof")
    toks = tokens(clean)
    words = [t for t, _, _ in toks]
    official = _statement_tokens(statement)
    if official[-2:] != [":=", "by"]:
        raise Refused("the official statement does not end with ':= by'")
    head = official[:-1]  # through ":="
    starts = [k for k in range(len(words) - 1) if words[k] == "theorem" and words[k + 1] == name]
    if starts:
        k = starts[-1]
        if words[k:k + len(head)] != head:
            raise Refused("the theorem differs from the official statement")
        body = clean[toks[k + len(head) - 1][2]:]
        if body.lstrip().startswith("by") and not re.match(r"by[\w'.!?]", body.lstrip()):
            body = body.lstrip()[2:]
        else:
            body = "exact (" + body.strip() + ")" if body.strip() else ""
    else:
        body = clean
    if not body.strip():
        raise Refused("empty proof")
    screen(body, allow_native_decide)
    lines = body.strip("\n").splitlines()
    first = next(line for line in lines if line.strip())
    if first[:1] not in (" ", "\t"):
        lines = ["  " + line for line in lines]
    return header + statement + "\n" + "\n".join(lines) + "\n"
