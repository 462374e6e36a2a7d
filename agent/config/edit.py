"""One key of a config file changed in place (`vps-agentctl enforce`): only the value's characters are
replaced, or one line (one flow entry) added, so the admin's comments, order, quoting and every other key
stay byte-identical. The caller validates the result before it replaces the file."""

from __future__ import annotations

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode

from agent.config.nodes import is_null


class UneditableConfig(ValueError):
    """The text is not a mapping of sections where the key could go (a config the loader refuses too)."""


def set_key(text: str, section: str, key: str, value: str) -> str:
    """The text with section.key set to the plain scalar value; the text itself when it already is."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        raise UneditableConfig(f"not YAML: {err}") from err
    if root is None or is_null(root):
        return _append_section(text, section, key, value, indent=0)
    if not isinstance(root, MappingNode):
        raise UneditableConfig("the file is not a mapping of sections")
    found = _entry(root, section)
    if found is None:
        if root.flow_style:
            return _insert_flow(text, root, f"{section}: {{{key}: {value}}}")
        return _append_section(text, section, key, value, indent=root.value[0][0].start_mark.column)
    section_key, body = found
    if is_null(body):
        # `firewall:` with nothing under it, or `firewall: ~`: the value becomes a flow mapping
        start, end = body.start_mark.index, body.end_mark.index
        filler = f"{{{key}: {value}}}" if end > start else f" {{{key}: {value}}}"
        return text[:start] + filler + text[end:]
    if not isinstance(body, MappingNode):
        raise UneditableConfig(f"{section} is not a mapping")
    entry = _entry(body, key)
    if entry is not None:
        old = entry[1]
        if not isinstance(old, ScalarNode):
            raise UneditableConfig(f"{section}.{key} is not a single value")
        if old.value == value and old.style is None:
            return text
        return text[: old.start_mark.index] + value + text[old.end_mark.index :]
    if body.flow_style:
        return _insert_flow(text, body, f"{key}: {value}")
    # a new first line of the section, indented as its other keys: right under the section's own line,
    # so a comment above the first key stays with that key
    indent = body.value[0][0].start_mark.column
    line_end = text.find("\n", section_key.end_mark.index)
    at = len(text) if line_end < 0 else line_end + 1
    prefix = "\n" if line_end < 0 else ""
    return text[:at] + f"{prefix}{' ' * indent}{key}: {value}\n" + text[at:]


def _entry(mapping: MappingNode, name: str) -> tuple[Node, Node] | None:
    for key, value in mapping.value:
        if isinstance(key, ScalarNode) and key.value == name:
            return key, value
    return None


def _insert_flow(text: str, mapping: MappingNode, entry: str) -> str:
    """`{a: 1}` -> `{entry, a: 1}`."""
    at = mapping.start_mark.index + 1  # after the "{"
    return text[:at] + entry + (", " if mapping.value else "") + text[at:]


def _append_section(text: str, section: str, key: str, value: str, *, indent: int) -> str:
    lead = "" if not text or text.endswith("\n") else "\n"
    pad = " " * indent
    return f"{text}{lead}{pad}{section}:\n{pad}  {key}: {value}\n"
