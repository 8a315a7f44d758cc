"""MkDocs hook: the settings page's tables, generated from the settings model at every build.

docs/guide/settings.md holds the line `<!-- generated: settings -->`; this hook replaces it with one
table per section of `patchdiff_core.service.settings.Settings` (the `# -- Section --` comments in
the class), one row per field: its `PATCHDIFF_*` variable, default, accepted values and the field's
`description`. A field added to the class appears by itself; a page without the marker fails the build.
"""

from __future__ import annotations

import inspect
import json
import re
import textwrap
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

MARKER = "<!-- generated: settings -->"
PAGE = "guide/settings.md"
SECTION = re.compile(r"^\s*# -- (.+?) -*\s*$")
FIELD_LINE = re.compile(r"^    (\w+)\s*:")
OTHER = "Other settings"


def field_sections(cls: type[BaseSettings]) -> dict[str, str]:
    """Field name -> the `# -- Section --` comment above it in its class's source."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not (isinstance(klass, type) and issubclass(klass, BaseSettings)) or klass is BaseSettings:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))  # a class nested in a function is indented
        except (OSError, TypeError):  # no source (built at run time): its fields land in OTHER
            continue
        section = OTHER
        for line in source.splitlines():
            if m := SECTION.match(line):
                section = m.group(1).strip()
            elif (m := FIELD_LINE.match(line)) and m.group(1) in cls.model_fields:
                found[m.group(1)] = section
    return found


def _bounds(info: FieldInfo) -> str:
    signs = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    parts = [f"{sign} {getattr(m, key)}" for m in info.metadata for key, sign in signs.items()
             if getattr(m, key, None) is not None]
    return ", ".join(parts)


def _values(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _values(args[0])
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return " or ".join(_values(a) for a in rest)
    if origin is Literal:
        return _one_of(args)
    if origin in (list, tuple, set):
        inner = get_args(args[0])[0] if args and get_origin(args[0]) is Annotated else (args[0] if args else str)
        if get_origin(inner) is Literal:
            return "comma-separated list of " + ", ".join(f"`{a}`" for a in get_args(inner))
        return "comma-separated list" + (" (secrets)" if inner is SecretStr else "")
    if origin is dict:
        return "JSON object"
    return {bool: _one_of(("true", "false")), int: "integer", float: "number", str: "text", Path: "path",
            SecretStr: "secret"}.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _one_of(choices) -> str:
    quoted = [f"`{c}`" for c in choices]
    return ", ".join(quoted[:-1]) + " or " + quoted[-1] if len(quoted) > 1 else "".join(quoted)


def _duration(seconds: float) -> str:
    for unit, size in (("day", 86400), ("hour", 3600)):
        if seconds >= size and seconds % size == 0:
            count = seconds // size
            return f" ({count:g} {unit}{'s' if count != 1 else ''})"
    return ""


def _default(name: str, info: FieldInfo, repo_root: Path) -> str:
    value = info.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, Path):
        try:
            return f"`{value.relative_to(repo_root)}` in the checkout"
        except ValueError:
            return f"`{value}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, (list, tuple)):
        return "empty" if not value else "`" + ",".join(str(v) for v in value) + "`"
    if isinstance(value, dict):
        return f"`{json.dumps(value)}`"
    if isinstance(value, SecretStr):
        return "(a secret)"
    if name.endswith("_s") and isinstance(value, (int, float)):
        return f"`{value}`{_duration(value)}"
    return f"`{value}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def settings_markdown(cls: type[BaseSettings] | None = None) -> str:
    """The tables, one `##` section per `# -- Section --` of `cls` (default: the service's Settings)."""
    from patchdiff_core.service import settings as settings_module

    cls = cls or settings_module.Settings
    prefix = cls.model_config.get("env_prefix", "")
    sections = field_sections(cls)
    grouped: dict[str, list[str]] = {}
    for name in cls.model_fields:
        grouped.setdefault(sections.get(name, OTHER), []).append(name)
    out: list[str] = []
    for section, names in grouped.items():
        out += [f"## {section}", "", "| variable | default | values | what it does |", "|---|---|---|---|"]
        for name in names:
            info = cls.model_fields[name]
            values = _values(info.annotation)
            if bounds := _bounds(info):
                values += f", {bounds}"
            # A description may name another field (`store_dir`): show the variable a reader sets.
            text = re.sub(r"`(\w+)`", lambda m: f"`{(prefix + m[1]).upper()}`" if m[1] in cls.model_fields else m[0],
                          info.description or "")
            out.append(f"| `{(prefix + name).upper()}` | {_default(name, info, settings_module.REPO_ROOT)} | "
                       f"{_cell(values)} | {_cell(text)} |")
        out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"{PAGE} must hold the line {MARKER} (the generated settings tables go there)")
    return markdown.replace(MARKER, settings_markdown())
