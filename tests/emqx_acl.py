"""An evaluator of EMQX 5 file authorization rules (``acl.conf``), for the subset of the syntax
compose/emqx/acl.conf uses, so a test can check every cell of the rights table against it (no
EMQX runs here).

What it models, after EMQX's own code (emqx_authz_rule, emqx_topic, emqx_channel):

* the file is Erlang terms, each ending with ``.``; ``%`` starts a comment;
* a rule is ``{allow|deny, Who, Action, Topics}`` or ``{allow|deny, all}``; the first rule
  whose Who, Action and one of its Topics match decides; nothing matching means ``no_match``
  (compose/emqx/emqx.conf: deny);
* Who: ``all``, ``{username, "u"}`` / ``{user, ...}``, ``{clientid, "c"}`` / ``{client, ...}``
  (a string is exact, ``{re, "regex"}`` is searched, as Erlang's ``re:run``), ``{'and', [...]}``,
  ``{'or', [...]}``;
* Action: ``publish``, ``subscribe``, ``all``;
* Topics: a filter string (``${username}``/``${clientid}`` rendered) matched the way
  ``emqx_topic:match/2`` matches, or ``{eq, "t"}`` (exactly that string);
* a subscription is authorized on its real topic: ``$share/<group>/<filter>`` as ``<filter>``;
  what is authorized for a subscription is its filter, once (EMQX never checks reads again per
  message), so matching a filter against a rule's filter is EMQX's filter-vs-filter match
  (``a/#`` passes a rule ``a/+``: the tests use the filters the services really subscribe to).

Anything outside this subset raises :class:`Unsupported`, so a new construct in acl.conf fails
the test until the evaluator models it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeAlias

Action = Literal["publish", "subscribe"]
Decision = Literal["allow", "deny"]


class Unsupported(ValueError):
    """acl.conf uses syntax this evaluator does not model."""


@dataclass(frozen=True)
class Atom:
    name: str


Term: TypeAlias = str | Atom | tuple["Term", ...] | list["Term"]

_TOKEN = re.compile(
    r"\s+|%[^\n]*"  # blanks, comments
    r"|(?P<punct>[{}\[\],.])"
    r'|"(?P<str>(?:[^"\\]|\\.)*)"'
    r"|(?P<atom>[a-z][A-Za-z0-9_@]*)|'(?P<qatom>[^']*)'"
)


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise Unsupported(f"acl.conf: cannot read {text[pos : pos + 30]!r}")
        pos = m.end()
        if m.group("punct") is not None:
            out.append(("punct", m.group("punct")))
        elif m.group("str") is not None:
            out.append(("str", re.sub(r"\\(.)", r"\1", m.group("str"))))
        elif m.group("atom") is not None:
            out.append(("atom", m.group("atom")))
        elif m.group("qatom") is not None:
            out.append(("atom", m.group("qatom")))
    return out


def parse_terms(text: str) -> list[Term]:
    """The top-level terms of an Erlang terms file (``file:consult`` format)."""
    toks = _tokens(text)
    pos = 0

    def term() -> Term:
        nonlocal pos
        kind, value = toks[pos]
        pos += 1
        if kind == "str":
            return value
        if kind == "atom":
            return Atom(value)
        if value in "{[":
            close = "}" if value == "{" else "]"
            items: list[Term] = []
            if toks[pos] != ("punct", close):
                while True:
                    items.append(term())
                    if toks[pos] == ("punct", ","):
                        pos += 1
                        continue
                    break
            if toks[pos] != ("punct", close):
                raise Unsupported(f"acl.conf: expected {close!r}, got {toks[pos][1]!r}")
            pos += 1
            return tuple(items) if close == "}" else items
        raise Unsupported(f"acl.conf: unexpected {value!r}")

    terms: list[Term] = []
    while pos < len(toks):
        terms.append(term())
        if pos >= len(toks) or toks[pos] != ("punct", "."):
            raise Unsupported("acl.conf: a term must end with '.'")
        pos += 1
    return terms


def _words(topic: str) -> list[str]:
    return topic.split("/")


def topic_match(name: str, filter: str) -> bool:
    """``emqx_topic:match(Name, Filter)``, clause for clause (no backtracking)."""
    if name.startswith("$") and filter[:1] in ("+", "#"):
        return False

    def match(n: list[str], f: list[str]) -> bool:
        if not n and not f:
            return True
        if n and f and n[0] == f[0]:
            return match(n[1:], f[1:])
        if n and f and f[0] == "+":
            return match(n[1:], f[1:])
        return f == ["#"]

    return match(_words(name), _words(filter))


def real_topic(topic: str) -> str:
    """What EMQX authorizes for a subscription: ``$share/<group>/<filter>`` as ``<filter>``."""
    if topic.startswith("$share/"):
        group_and_filter = topic[len("$share/") :]
        if "/" not in group_and_filter:
            raise Unsupported(f"bad shared subscription {topic!r}")
        return group_and_filter.split("/", 1)[1]
    return topic


@dataclass(frozen=True)
class Client:
    username: str
    clientid: str


def _who(who: Term, client: Client) -> bool:
    if who == Atom("all"):
        return True
    if isinstance(who, tuple) and len(who) == 2 and isinstance(who[0], Atom):
        kind, arg = who[0].name, who[1]
        if kind in ("username", "user", "clientid", "client"):
            value = client.username if kind in ("username", "user") else client.clientid
            if isinstance(arg, str):
                return value == arg
            if isinstance(arg, tuple) and len(arg) == 2 and arg[0] == Atom("re"):
                assert isinstance(arg[1], str)
                return re.search(arg[1], value) is not None
        if kind in ("and", "or") and isinstance(arg, list):
            results = [_who(w, client) for w in arg]
            return all(results) if kind == "and" else any(results)
    raise Unsupported(f"acl.conf: who {who!r}")


def _action(action: Term, asked: Action) -> bool:
    if isinstance(action, Atom) and action.name in ("publish", "subscribe", "all"):
        return action.name in (asked, "all")
    raise Unsupported(f"acl.conf: action {action!r}")


def _topic(rule_topic: Term, topic: str, client: Client) -> bool:
    if isinstance(rule_topic, tuple) and len(rule_topic) == 2 and rule_topic[0] == Atom("eq"):
        assert isinstance(rule_topic[1], str)
        return topic == rule_topic[1]
    if isinstance(rule_topic, str):
        if rule_topic.startswith("$share/"):
            raise Unsupported("a rule topic never matches $share/...: EMQX checks the real topic")
        rendered = rule_topic.replace("${username}", client.username)
        rendered = rendered.replace("${clientid}", client.clientid)
        if "${" in rendered or "%u" in rendered or "%c" in rendered:
            raise Unsupported(f"acl.conf: placeholder in {rule_topic!r}")
        return topic_match(topic, rendered)
    raise Unsupported(f"acl.conf: topic {rule_topic!r}")


PERMISSIONS: dict[Term, Decision] = {Atom("allow"): "allow", Atom("deny"): "deny"}


@dataclass(frozen=True)
class Acl:
    rules: tuple[Term, ...]
    no_match: Decision = "deny"

    @classmethod
    def load(cls, path: Path, no_match: Decision = "deny") -> Acl:
        return cls(tuple(parse_terms(path.read_text(encoding="utf-8"))), no_match)

    def authorize(self, client: Client, action: Action, topic: str) -> Decision:
        """The decision for ``client`` to publish to a topic or subscribe to a filter."""
        checked = real_topic(topic) if action == "subscribe" else topic
        for rule in self.rules:
            if not (isinstance(rule, tuple) and rule and isinstance(rule[0], Atom)) or (
                rule[0] not in PERMISSIONS
            ):
                raise Unsupported(f"acl.conf: rule {rule!r}")
            permission = PERMISSIONS[rule[0]]
            if len(rule) == 2 and rule[1] == Atom("all"):
                return permission
            if len(rule) != 4 or not isinstance(rule[3], list):
                raise Unsupported(f"acl.conf: rule {rule!r}")
            _, who, rule_action, topics = rule
            assert isinstance(topics, list)
            if (
                _who(who, client)
                and _action(rule_action, action)
                and any(_topic(t, checked, client) for t in topics)
            ):
                return permission
        return self.no_match

    def allows(self, username: str, action: Action, topic: str) -> bool:
        client = Client(username, f"{username}:probe")
        return self.authorize(client, action, topic) == "allow"
