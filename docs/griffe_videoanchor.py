"""Griffe extension for the API reference (loaded by mkdocstrings, see mkdocs.yml).

Two jobs, so that ``mkdocs build --strict`` checks the docstrings instead of hiding them:

- The house docstring style (as flash-attention's) documents parameters that share a meaning
  on one line: ``k, v: (B, Hkv, Skv, D) ...``. Griffe's Google parser reads one name per
  entry; this splits such an entry into one entry per name, each with the shared text, so
  griffe can still warn about a documented parameter that is not in the signature.
- Sphinx roles (``:func:`x```, ``:class:`~a.b.C```) are shown as code (``x``, ``C``) instead
  of their raw markup, and a reST literal-block marker (``text::``) as ``text:`` (the
  indented block after it is already a Markdown code block).
- Every object a module exports (``__all__``) that is a function or a class, and every public
  method or property of such a class, must have a docstring: a missing one is a warning
  (an error under ``--strict``).
"""

from __future__ import annotations

import re

import griffe

_SECTION = re.compile(
    r"^(\s*)(Args|Arguments|Parameters|Params|Keyword Args|Other Parameters):\s*$"
)
_ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|exc|obj):`(~?)([^`]+)`")
_GROUPED = re.compile(r"^(\s+)(\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)+)\s*:\s?(.*)$")


def split_grouped_params(text: str) -> str:
    """Rewrite ``a, b: text`` entries of the parameter sections as one entry per name."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        header = _SECTION.match(lines[i])
        out.append(lines[i])
        i += 1
        if not header:
            continue
        base = len(header.group(1))
        item_indent = None
        while i < len(lines):
            line = lines[i]
            if line.strip() and len(line) - len(line.lstrip()) <= base:
                break  # the section ended
            if not line.strip():
                out.append(line)
                i += 1
                continue
            indent = len(line) - len(line.lstrip())
            if item_indent is None:
                item_indent = indent
            grouped = _GROUPED.match(line) if indent == item_indent else None
            if not grouped:
                out.append(line)
                i += 1
                continue
            body = [grouped.group(3)]
            i += 1
            while i < len(lines) and (
                not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > item_indent
            ):
                body.append(lines[i])
                i += 1
            while body and not body[-1].strip():
                body.pop()
            names = [n.strip() for n in grouped.group(2).split(",")]
            for name in names:
                out.append(f"{grouped.group(1)}{name}: {body[0]}")
                out.extend(body[1:])
    return "\n".join(out)


def plain_roles(text: str) -> str:
    """``:func:`a.b``` -> ```a.b```; ``:class:`~a.b.C``` -> ```C```; ``text::`` -> ``text:``."""
    text = re.sub(r"(?<=\S)::[ \t]*$", ":", text, flags=re.M)
    return _ROLE.sub(
        lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", text
    )


def method_links(text: str) -> str:
    """``docs/method.md`` in a docstring -> a link to the method page (the API pages sit one
    folder below it); a "section N" that follows stays as text after the link."""
    return re.sub(r"(?<![\w/\[(])docs/method\.md", "[the method page](../method.md)", text)


def _public_members(cls: griffe.Class):
    for name, member in cls.members.items():
        if name.startswith("_") or member.is_alias:
            continue
        if member.is_function or (member.is_attribute and "property" in member.labels):
            yield name, member


class VideoanchorDocstrings(griffe.Extension):
    """Split grouped parameter entries; warn about exported objects without a docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = method_links(
                plain_roles(split_grouped_params(obj.docstring.value))
            )

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        for module in _modules(pkg):
            for name in module.exports or ():
                name = str(name)
                member = module.members.get(name)
                if member is None:
                    griffe.logger.warning(f"{module.path}.__all__ names {name!r}, not defined")
                    continue
                if member.is_alias:
                    continue  # documented where it is defined
                if not (member.is_function or member.is_class):
                    continue
                if not member.docstring:
                    griffe.logger.warning(f"{member.path}: exported but has no docstring")
                if member.is_class:
                    for mname, m in _public_members(member):
                        if not m.docstring:
                            griffe.logger.warning(f"{member.path}.{mname}: public, no docstring")


def _modules(module: griffe.Module):
    yield module
    for member in module.members.values():
        if not member.is_alias and member.is_module:
            yield from _modules(member)
