#!/usr/bin/env python3
"""Put every blockattn header's code in the ISA-tagged inline namespace (issue 20, item 2).

Usage: isa_ns.py <repo root> [--check]

Rewrites, in every .hpp under <root>/include/, each top-level opening of `namespace blockattn`
(plain, or C++17 nested such as `namespace blockattn::detail` or `namespace
blockattn::detail::simd`) so that its contents live in

    namespace blockattn {
    inline namespace BLOCKATTN_ISA_NAMESPACE {
    namespace detail {
    ...
    }  // namespace detail
    }  // namespace BLOCKATTN_ISA_NAMESPACE
    }  // namespace blockattn

BLOCKATTN_ISA_NAMESPACE is defined in detail/config.hpp (isa_avx512, isa_avx2, isa_sse2, ...), so
translation units compiled with different SIMD flags never share a definition. Names spelled
blockattn::x keep working: the namespace is inline.

A header that opens the namespace but does not reach detail/config.hpp through its blockattn
includes gets `#include <blockattn/detail/config.hpp>` after its last #include (the macro must be
defined before use, or the namespace would silently be named BLOCKATTN_ISA_NAMESPACE).

Idempotent: an opening already followed by the tag is left alone, so the script can be re-run
after any merge. With --check nothing is written: the exit status is 1 when a file would change
(tests/check_isa_namespace.sh does the same check without Python). Exit 2 on a layout the script
does not understand (an opening or closing brace sharing its line with other code); fix that by
hand.
"""

import os
import re
import sys

TAG = "BLOCKATTN_ISA_NAMESPACE"
CONFIG = "blockattn/detail/config.hpp"
OPEN_RE = re.compile(r"namespace\s+(blockattn(?:\s*::\s*[A-Za-z_]\w*)*)\s*\{")
TAGGED_RE = re.compile(r"\s*(?://[^\n]*\n\s*)*inline\s+namespace\s+" + TAG + r"\s*\{")
INCLUDE_RE = re.compile(r'^\s*#\s*include\s*[<"](blockattn/[^>"]+)[>"]', re.M)


class LayoutError(Exception):
    pass


def code_mask(text):
    """A copy of text with comments, string/char literals and preprocessor lines blanked out
    (same length, newlines kept), so braces and keywords are found only in code."""
    out = list(text)
    i, n = 0, len(text)
    line_start = True

    def blank(a, b):
        for k in range(a, b):
            if out[k] != "\n":
                out[k] = " "

    while i < n:
        c = text[i]
        if line_start and c in " \t":
            i += 1
            continue
        if line_start and c == "#":  # a directive, with its continuation lines
            j = i
            while j < n:
                if text[j] == "\n" and text[j - 1] != "\\":
                    break
                j += 1
            blank(i, j)
            i = j
            continue
        line_start = False
        if c == "\n":
            line_start = True
            i += 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            blank(i, j)
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            blank(i, j)
            i = j
        elif c == "R" and text.startswith('R"', i) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            d_end = text.find("(", i + 2)
            delim = text[i + 2 : d_end]
            j = text.find(")" + delim + '"', d_end)
            j = n if j < 0 else j + len(delim) + 2
            blank(i, j)
            i = j
        elif c == '"' or (c == "'" and not (i > 0 and text[i - 1].isalnum())):  # not 1'000
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            blank(i, j + 1)
            i = j + 1
        else:
            i += 1
    return "".join(out)


def matching_brace(mask, open_pos):
    depth = 0
    for k in range(open_pos, len(mask)):
        if mask[k] == "{":
            depth += 1
        elif mask[k] == "}":
            depth -= 1
            if depth == 0:
                return k
    raise LayoutError("unbalanced braces after offset %d" % open_pos)


def depth_at(mask, pos):
    return mask.count("{", 0, pos) - mask.count("}", 0, pos)


def line_bounds(text, pos):
    a = text.rfind("\n", 0, pos) + 1
    b = text.find("\n", pos)
    return a, (len(text) if b < 0 else b)


def rewrite(text, path):
    """One pass: returns the rewritten text (equal to text when nothing needs tagging)."""
    mask = code_mask(text)
    edits = []  # (start, end, replacement), non-overlapping
    for m in OPEN_RE.finditer(mask):
        if depth_at(mask, m.start()) != 0:
            raise LayoutError("%s: `%s` inside another scope" % (path, m.group(0)))
        before = mask[: m.start()].rstrip()
        if before.endswith("using") or before.endswith("inline"):
            continue
        parts = [p.strip() for p in m.group(1).split("::")]
        brace = m.end() - 1
        close = matching_brace(mask, brace)
        if len(parts) == 1 and TAGGED_RE.match(text, brace + 1):
            continue  # already tagged
        # The opening and the closing brace must each stand on their own line (comments aside).
        oa, ob = line_bounds(text, m.start())
        ca, cb = line_bounds(text, close)
        if mask[oa:ob].strip() != mask[m.start() : m.end()].strip() or mask[ca:cb].strip() != "}":
            raise LayoutError(
                "%s:%d: `%s` or its closing brace shares a line with other code; split it by hand"
                % (path, text.count("\n", 0, m.start()) + 1, m.group(0))
            )
        inner = "::".join(parts[1:])
        opening = "namespace blockattn {\ninline namespace %s {" % TAG
        closing = "}  // namespace %s\n}  // namespace blockattn" % TAG
        if inner:
            opening += "\nnamespace %s {" % inner
            closing = "}  // namespace %s\n" % inner + closing
        edits.append((oa, ob, opening))
        edits.append((ca, cb, closing))
    for a, b, rep in sorted(edits, reverse=True):
        text = text[:a] + rep + text[b:]
    return text


def includes_of(text):
    return INCLUDE_RE.findall(code_mask_keep_directives(text))


def code_mask_keep_directives(text):
    # Drop comments only (an #include inside a block comment does not count).
    return re.sub(r"/\*.*?\*/", lambda m: re.sub(r"[^\n]", " ", m.group(0)), text, flags=re.S)


def reaches_config(rel, graph, seen=None):
    if rel == CONFIG:
        return True
    seen = set() if seen is None else seen
    if rel in seen:
        return False
    seen.add(rel)
    return any(reaches_config(dep, graph, seen) for dep in graph.get(rel, ()))


def add_config_include(text):
    """Adds the config include after the last #include outside any #if (before the first
    namespace otherwise), as its own block unless the previous include is a blockattn one."""
    lines = text.split("\n")
    depth, last, pragma = 0, None, None
    for k, line in enumerate(lines):
        d = re.match(r"\s*#\s*(\w+)", line)
        if not d:
            continue
        if d.group(1) in ("if", "ifdef", "ifndef"):
            depth += 1
        elif d.group(1) == "endif":
            depth -= 1
        elif d.group(1) == "include" and depth == 0:
            last = k
        elif d.group(1) == "pragma" and "once" in line and pragma is None:
            pragma = k
    if last is not None and "<blockattn/" in lines[last]:
        new = ["#include <%s>" % CONFIG]
    else:
        new = ["", "#include <%s>" % CONFIG]
    at = last if last is not None else pragma
    if at is None:
        raise LayoutError("no #include or #pragma once to put the config include after")
    lines[at + 1 : at + 1] = new
    return "\n".join(lines)


def main(argv):
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0 if len(argv) >= 2 else 2
    root = argv[1]
    check = "--check" in argv[2:]
    include = os.path.join(root, "include")
    files = {}
    for dirpath, _, names in os.walk(include):
        for name in sorted(names):
            if name.endswith((".hpp", ".h", ".hh", ".hxx", ".inl")):
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, include).replace(os.sep, "/")
                with open(full, encoding="utf-8") as f:
                    files[rel] = f.read()
    if CONFIG not in files:
        print("isa_ns.py: %s not found under %s" % (CONFIG, include), file=sys.stderr)
        return 2
    graph = {rel: includes_of(text) for rel, text in files.items()}
    changed = []
    for rel in sorted(files):
        text = files[rel]
        try:
            new = rewrite(text, rel)
        except LayoutError as e:
            print("isa_ns.py: %s" % e, file=sys.stderr)
            return 2
        if rel != CONFIG and TAG in code_mask(new) and not reaches_config(rel, graph):
            try:
                new = add_config_include(new)
            except LayoutError as e:
                print("isa_ns.py: %s: %s" % (rel, e), file=sys.stderr)
                return 2
        if new != text:
            changed.append(rel)
            if not check:
                with open(os.path.join(include, rel), "w", encoding="utf-8") as f:
                    f.write(new)
    for rel in changed:
        print(("needs tagging: " if check else "tagged: ") + "include/" + rel)
    if check:
        return 1 if changed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
