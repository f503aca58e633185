"""Topic rules of the bridge: which filter to take on one side, which topic to give on the other.

Pure: strings in, strings out. A rule's ``template`` has the same wildcards as its ``filter``,
in the same order; each ``+`` of the template takes the level the filter's ``+`` matched, a
final ``#`` takes what the filter's ``#`` matched (possibly nothing: ``fleet/#`` also matches
``fleet``). ``{site}`` and ``{bridge}`` are replaced by configured names first (in filters too).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Direction = Literal["up", "down"]
PLACEHOLDERS = ("site", "bridge")


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A rule ready to match topics: ``filter`` levels and the rendered ``template`` levels."""

    direction: Direction
    filter: str
    template: str
    qos: int
    retain: bool
    _filter_levels: tuple[str, ...]
    _template_levels: tuple[str, ...]

    def match(self, topic: str) -> list[str] | None:
        """The levels the wildcards matched (a ``#`` capture is one '/'-joined item), or None."""
        return _capture(self._filter_levels, topic)

    def made(self, topic: str) -> bool:
        """Whether ``topic`` is one this rule can give (its template read as a filter)."""
        return _capture(self._template_levels, topic) is not None

    @property
    def label(self) -> str:
        """How logs name the rule: ``filter -> template`` (the filter alone if they agree)."""
        return self.filter if self.filter == self.template else f"{self.filter} -> {self.template}"

    def render(self, captured: Sequence[str]) -> str:
        """The destination topic for what :meth:`match` returned."""
        out: list[str] = []
        it = iter(captured)
        for level in self._template_levels:
            if level == "+":
                out.append(next(it))
            elif level == "#":
                rest = next(it)
                if rest:
                    out.append(rest)
            else:
                out.append(level)
        return "/".join(out)

    def translate(self, topic: str) -> str | None:
        captured = self.match(topic)
        return None if captured is None else self.render(captured)


def _capture(pattern: Sequence[str], topic: str) -> list[str] | None:
    levels = topic.split("/")
    captured: list[str] = []
    for i, want in enumerate(pattern):
        if want == "#":
            if i == 0 and topic.startswith("$"):
                return None
            captured.append("/".join(levels[i:]))
            return captured
        if i >= len(levels):
            return None
        if want == "+":
            if i == 0 and levels[0].startswith("$"):
                return None
            captured.append(levels[i])
        elif want != levels[i]:
            return None
    return captured if len(levels) == len(pattern) else None


def wildcards(levels: Sequence[str]) -> list[str]:
    return [level for level in levels if level in ("+", "#")]


def substitute(template: str, names: Mapping[str, str]) -> str:
    """Replace ``{site}``/``{bridge}``; raise ValueError naming any other ``{…}``."""
    out = template
    for key, value in names.items():
        out = out.replace("{" + key + "}", value)
    if "{" in out or "}" in out:
        raise ValueError(
            f"template {template!r} has an unknown placeholder; known: "
            + ", ".join("{" + p + "}" for p in PLACEHOLDERS)
        )
    return out


def compile_rule(
    direction: Direction,
    filter: str,
    template: str | None,
    qos: int,
    retain: bool,
    names: Mapping[str, str],
) -> CompiledRule:
    """Check that ``template`` fits ``filter`` and return the compiled rule (ValueError if not)."""
    filter = substitute(filter, names)
    rendered = substitute(template if template is not None else filter, names)
    f_levels = tuple(filter.split("/"))
    t_levels = tuple(rendered.split("/"))
    if wildcards(f_levels) != wildcards(t_levels):
        raise ValueError(
            f"template {rendered!r} must have the same wildcards in the same order as filter"
            f" {filter!r} (+ and # each stand for what the filter matched)"
        )
    if "#" in t_levels and t_levels[-1] != "#":
        raise ValueError(f"template {rendered!r}: '#' must be the last level")
    return CompiledRule(direction, filter, rendered, qos, retain, f_levels, t_levels)


def maker(rules: Sequence[CompiledRule], topic: str) -> CompiledRule | None:
    """The first rule that can give the destination ``topic``: the rule a queued record came
    from (unless the templates of two rules overlap, when the first is named)."""
    for rule in rules:
        if rule.made(topic):
            return rule
    return None


def first_match(rules: Sequence[CompiledRule], topic: str) -> tuple[CompiledRule, str] | None:
    """The first rule whose filter matches ``topic``, with the topic it maps to."""
    for rule in rules:
        dest = rule.translate(topic)
        if dest is not None:
            return rule, dest
    return None
