"""Every repository path the README and docs/ mention exists, and every link between them lands.

A path is checked when it starts with a top-level folder of the repository (``edge_node/node.py``,
``docs/security.md``, ``edgewise/serving/``) or with the name of a package that the move to the
``edgewise`` namespace retired (``outbox/``, ``mqtt_session/session.py``: those must be written
with their new place). Paths relative to wherever a user works (``conv/conv.onnx``,
``./publish.sh``), topic filters (``edge/+/results``) and templates (``compose/mosquitto/{site,
cloud}/``) are not paths of the repository and are left alone. Markdown links to other files are
resolved from the document that holds them, and a ``#fragment`` must name one of the target's
headings. docs/benchmarks-history.md is a verbatim record of older runs and is not checked.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HISTORY = {REPO / "docs" / "benchmarks-history.md"}
DOCUMENTS = [
    p for p in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))] if p not in HISTORY
]
TOP_LEVEL = {p.name for p in REPO.iterdir() if p.is_dir() and not p.name.startswith(".")}
# Package names that lived at the top level before the move to the edgewise namespace.
RETIRED = {"mqtt_session", "outbox", "telemetry", "releases", "local_broker"}
# Made on demand and ignored by git: named in the docs as where things will be.
GENERATED = {"bench/.models/", "compose/secrets/"}

_EXT = r"py|md|toml|conf|json|onnx|tflite|ya?ml|sh|npz|txt|c|cfg|ini|acl|crt|key|Dockerfile"
PATH = re.compile(
    r"(?<![\w./{}$%*+#~-])"  # not the tail of a longer token, a URL or a template
    rf"((?:[\w.-]+/)+(?:[\w.-]*\.(?:{_EXT})|(?![\w.-])))"  # a file, or a folder ending in /
    r"(?![\w/{}*%+])"  # not followed by more of a template or a topic filter
)
LINK = re.compile(r"\]\(([^)\s]+)\)")
PACKAGES = ("edgewise", "edge_node", "cloud_worker", "broker_bridge", "schemas")
DOTTED = re.compile(rf"(?<![\w./-])((?:{'|'.join(PACKAGES)})(?:\.\w+)+)")


def _mentions(text: str) -> list[str]:
    out = []
    for m in PATH.finditer(text):
        path = m.group(1)
        first = path.split("/", 1)[0]
        if first in TOP_LEVEL or first in RETIRED:
            out.append(path)
    return out


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    in_code = False
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"#{1,6} (.*)", line)):
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _label(doc: Path) -> str:
    return str(doc.relative_to(REPO))


@pytest.mark.parametrize("doc", DOCUMENTS, ids=_label)
def test_every_repository_path_a_document_mentions_exists(doc: Path) -> None:
    missing = sorted(
        {
            p
            for p in _mentions(doc.read_text(encoding="utf-8"))
            if p not in GENERATED and not (REPO / p).exists()
        }
    )
    assert not missing, f"{_label(doc)} names paths that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCUMENTS, ids=_label)
def test_every_link_to_another_file_lands(doc: Path) -> None:
    broken = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, fragment = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        lands = dest.exists() and not (
            fragment and dest.suffix == ".md" and fragment not in _anchors(dest)
        )
        if not lands:
            broken.append(target)
    assert not broken, f"{_label(doc)} links to what is not there: {broken}"


def _resolves(dotted: str) -> bool:
    """``a.b.c``: the longest prefix that imports, then attributes for the rest."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


@pytest.mark.parametrize("doc", DOCUMENTS, ids=_label)
def test_every_dotted_name_a_document_mentions_imports(doc: Path) -> None:
    """``edgewise.serving.runtime.load_runtime``, ``schemas.decode_results``: a module, or a
    module's attribute, importable as written."""
    names = set(DOTTED.findall(doc.read_text(encoding="utf-8")))
    missing = sorted(n for n in names if not _resolves(n))
    assert not missing, f"{_label(doc)} names what does not import: {missing}"


def test_the_checks_see_what_they_check() -> None:
    """The patterns find paths and anchors, and skip topics, templates and users' files."""
    text = (
        "`edge_node/node.py`, docs/security.md, `edgewise/serving/`, `outbox/`, "
        "`edge/+/results`, `compose/mosquitto/{site,cloud}/`, `conv/conv.onnx`, "
        "https://example.com/edge_node/x.py"
    )
    assert _mentions(text) == [
        "edge_node/node.py",
        "docs/security.md",
        "edgewise/serving/",
        "outbox/",
    ]
    assert _slug("The outbox's bound at every instant (ADR 0075)") == (
        "the-outboxs-bound-at-every-instant-adr-0075"
    )
    assert _slug("`[mqtt]` — the broker connection") == "mqtt--the-broker-connection"
    assert DOTTED.findall("`edgewise.serving.runtime.load_runtime`, `.venv/edgewise.x`") == [
        "edgewise.serving.runtime.load_runtime"
    ]
    assert _resolves("edgewise.serving.runtime.load_runtime")
    assert not _resolves("edge_node.acks.InOrderAcker")
    assert len(DOCUMENTS) > 10
    # What is excused as generated really is ignored by git, where it is made.
    root_ignore = (REPO / ".gitignore").read_text(encoding="utf-8").splitlines()
    for path in GENERATED:
        folder, _, name = path.rstrip("/").rpartition("/")
        local = REPO / folder / ".gitignore"
        ignore = local.read_text(encoding="utf-8").splitlines() if local.exists() else []
        assert path in root_ignore or f"{name}/" in ignore, f"{path} is not ignored by git"
