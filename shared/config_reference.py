"""The configuration reference (docs/config-reference.md), generated from the schema itself.

Walks a msgspec ``Struct`` type tree (``shared.config.Config`` by default) through
``msgspec.inspect.type_info``, so the descriptions, bounds and choices attached with
``Annotated[tp, Meta(description=..., ge=...)]`` (``shared.config._doc``) are the only source: no list
of sections is kept here, and a section moved into another module, a new nested struct, a list of
structs or a tagged union of structs (one section per variant, keyed by its tag) appears without a
change to this file.

    python -m shared.config_reference            # print the Markdown
    python -m shared.config_reference --write    # rewrite docs/config-reference.md (atomically)

``tests/test_config_reference.py`` fails when the committed file differs from what this prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi

OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "config-reference.md"
REGENERATE = "python -m shared.config_reference --write"

_SCALARS = {mi.IntType: "int", mi.FloatType: "float", mi.StrType: "str", mi.BoolType: "bool",
            mi.NoneType: "None", mi.AnyType: "any", mi.BytesType: "bytes"}
_BOUNDS = (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"), ("multiple_of", "multiple of"),
           ("min_length", "length ≥"), ("max_length", "length ≤"), ("pattern", "matches"))


def _unwrap(t: mi.Type) -> tuple[mi.Type, str]:
    """(the type inside any Metadata wrappers, the innermost non-empty description)."""
    desc = ""
    while isinstance(t, mi.Metadata):
        desc = (t.extra_json_schema or {}).get("description", desc)
        t = t.type
    return t, desc


def _structs(t: mi.Type) -> list[mi.StructType]:
    """The struct types a field's value may be (itself, or the struct members of a union)."""
    t, _ = _unwrap(t)
    if isinstance(t, mi.StructType):
        return [t]
    if isinstance(t, mi.UnionType):
        return [s for m in t.types for s in _structs(m)]
    return []


def type_name(t: mi.Type) -> str:
    """A short spelling of a field's type: ``int``, ``list[int | str]``, ``dict[str, any]``, ``float | None``."""
    t, _ = _unwrap(t)
    if type(t) in _SCALARS:
        return _SCALARS[type(t)]
    if isinstance(t, mi.LiteralType):
        return " | ".join(sorted({type(v).__name__ for v in t.values}))
    if isinstance(t, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)):
        return f"list[{type_name(t.item_type)}]"
    if isinstance(t, mi.DictType):
        return f"dict[{type_name(t.key_type)}, {type_name(t.value_type)}]"
    if isinstance(t, mi.UnionType):
        return " | ".join(type_name(m) for m in t.types)
    if isinstance(t, mi.StructType):
        return t.cls.__name__
    return type(t).__name__.removesuffix("Type").lower()


def bounds(t: mi.Type) -> str:
    """Constraints and choices: ``≥ 1, ≤ 256``; ``"adapter", "merge"``; a union joins its members' with ``or``."""
    t, _ = _unwrap(t)
    if isinstance(t, mi.LiteralType):
        return ", ".join(json.dumps(v) for v in t.values)
    if isinstance(t, mi.UnionType):
        return " or ".join(b for b in (bounds(m) for m in t.types) if b)
    return ", ".join(f"{sign} {json.dumps(getattr(t, k)) if k == 'pattern' else getattr(t, k)}"
                     for k, sign in _BOUNDS if getattr(t, k, None) is not None)


def _default(field: mi.Field) -> Any:
    if field.default is not mi.NODEFAULT:
        return field.default
    if field.default_factory is not mi.NODEFAULT:
        return field.default_factory()
    return mi.NODEFAULT


def default_text(field: mi.Field) -> str:
    """The default as TOML-like JSON (``"auto"``, ``true``, ``[]``, ``0.002``); ``(required)`` when none."""
    value = _default(field)
    if value is mi.NODEFAULT:
        return "(required)"
    if value is None:
        return "unset"
    return json.dumps(msgspec.to_builtins(value), ensure_ascii=False)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _variant_label(s: mi.StructType) -> str:
    return f"{s.tag_field} = {json.dumps(s.tag)}" if s.tag_field else s.cls.__name__


def sections(root: mi.StructType, path: str = "", title: str = "", note: str = "") -> list[tuple[str, str, list[list[str]]]]:
    """Depth first: (title, summary, rows of [key, type, default, bounds, description]) per struct.

    A field whose value is one struct is not a row of its parent's table but a section of its own,
    titled by its dotted path. A field that may hold several structs (a union, tagged or not), or
    structs inside a list or dict, is a row (its tags as the choices) and each struct a section:
    keys ``a.b[].c`` for list items, ``a.b.<name>.c`` for dict values, titles ``a.b (kind = "x")``
    for the variants of a union."""
    rows: list[list[str]] = []
    children: list[tuple[mi.StructType, str, str, str]] = []
    for f in root.fields:
        key = f"{path}.{f.name}" if path else f.name
        t, desc = _unwrap(f.type)
        if isinstance(t, mi.StructType):
            children.append((t, key, key, desc))
            continue
        if isinstance(t, (mi.ListType, mi.VarTupleType)):
            structs, sub = _structs(t.item_type), key + "[]"
        elif isinstance(t, mi.DictType):
            structs, sub = _structs(t.value_type), key + ".<name>"
        else:
            structs, sub = _structs(t), key
        tags = [json.dumps(s.tag) for s in structs if s.tag_field]
        extra = f"{structs[0].tag_field}: {', '.join(tags)}" if tags else ""
        rows.append([f"`{key}`", type_name(f.type), default_text(f), ", ".join(b for b in (bounds(f.type), extra) if b),
                     desc])
        whose = "Each item of " if sub.endswith("[]") else ("Each value of " if sub != key else "")
        for s in structs:
            label = f" ({_variant_label(s)})" if len(structs) > 1 or s.tag_field else ""
            children.append((s, sub, sub + label, f"{whose}`{key}`" + (f" when {_variant_label(s)}" if label else "")))
    doc = " ".join((root.cls.__doc__ or "").strip().split("\n\n")[0].split())
    out = [(title or "top level", ": ".join(t for t in (note, doc) if t), rows)] if rows else []
    for s, sub_path, sub_title, sub_note in children:
        out += sections(s, sub_path, sub_title, sub_note)
    return out


def reference(root: type | None = None) -> str:
    """The whole Markdown page for the struct type ``root`` (``shared.config.Config`` when None)."""
    if root is None:
        from shared.config import Config

        root = Config
    info = mi.type_info(root)
    lines = [
        "# Configuration reference",
        "",
        f"Generated from the schema's own descriptions (`{root.__module__}.{root.__qualname__}`) by "
        f"`{REGENERATE}`; do not edit by hand. How files, overrides and errors work: "
        "[configuration.md](configuration.md).",
        "",
        "Every key can be set in a TOML table (`[trainer.loss]` → `kl_coef = 0.5`) or on the command line "
        "(`--trainer.loss.kl_coef 0.5`). Bounds are checked when the config is loaded; a value outside them "
        "is a one-line error naming the key.",
    ]
    for title, doc, rows in sections(info):
        lines += ["", f"## {title}", ""]
        if doc:
            lines += [_cell(doc), ""]
        lines += ["| key | type | default | bounds / choices | description |", "|---|---|---|---|---|"]
        lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite {OUTPUT.relative_to(OUTPUT.parent.parent)}")
    args = parser.parse_args(argv)
    text = reference()
    if args.write:
        from shared.fsutil import atomic_write_text

        atomic_write_text(OUTPUT, text)
        print(f"wrote {OUTPUT}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
