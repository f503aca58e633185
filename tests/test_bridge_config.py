"""The bridge's pure parts and its configuration: rules and templates, the echo ledger, config
errors that name the key, the CLI's exit status."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker_bridge import BridgeConfig, ConfigError, compile_rule
from broker_bridge.echo import EchoLedger
from tests.bridgeharness import REPO

NAMES = {"site": "s1", "bridge": "br"}


# -- rules ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filter", "template", "topic", "expected"),
    [
        (
            "edge/+/results",
            "sites/{site}/edge/+/results",
            "edge/gw-1/results",
            "sites/s1/edge/gw-1/results",
        ),
        ("fleet/#", None, "fleet/cam/models/digits", "fleet/cam/models/digits"),
        ("fleet/#", "x/#", "fleet", "x"),
        ("sites/{site}/edge/+/cmd", "edge/+/cmd", "sites/s1/edge/gw-2/cmd", "edge/gw-2/cmd"),
        ("a/+/b/+", "+/z/+", "a/1/b/2", "1/z/2"),
        ("edge/+/results", None, "edge/gw-1/status", None),
        ("edge/+/results", None, "edge/gw-1/results/x", None),
        ("#", None, "$SYS/broker/uptime", None),
        ("+/x", None, "$SYS/x", None),
        ("sites/{site}/edge/+/cmd", "edge/+/cmd", "sites/s2/edge/gw-2/cmd", None),
    ],
)
def test_rule_maps_topics(
    filter: str, template: str | None, topic: str, expected: str | None
) -> None:
    rule = compile_rule("up", filter, template, 1, True, NAMES)
    assert rule.translate(topic) == expected


@pytest.mark.parametrize(
    ("filter", "template", "message"),
    [
        ("edge/+/results", "sites/{site}/results", "same wildcards"),
        ("edge/+/results", "sites/#", "same wildcards"),
        ("edge/#", "x/+", "same wildcards"),
        ("edge/+/results", "sites/{nope}/+/results", "unknown placeholder"),
    ],
)
def test_template_that_does_not_fit_its_filter_refused(
    filter: str, template: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        compile_rule("up", filter, template, 1, True, NAMES)


level = st.text(alphabet="abcxyz019-_", min_size=1, max_size=6)


@given(st.lists(level, min_size=1, max_size=5))
def test_identity_rule_with_hash_maps_every_topic_to_itself(levels: list[str]) -> None:
    rule = compile_rule("down", "#", None, 1, True, NAMES)
    topic = "/".join(levels)
    assert rule.translate(topic) == topic


@given(level, level, st.lists(level, max_size=3))
def test_prefix_template_round_trips(a: str, b: str, rest: list[str]) -> None:
    up = compile_rule("up", "edge/+/#", "sites/{site}/edge/+/#", 1, True, NAMES)
    down = compile_rule("down", "sites/{site}/edge/+/#", "edge/+/#", 1, True, NAMES)
    topic = "/".join(["edge", a, b, *rest])
    there = up.translate(topic)
    assert there is not None and there.startswith("sites/s1/")
    assert down.translate(there) == topic


# -- echo ledger ------------------------------------------------------------------------------


def test_ledger_consumes_one_echo_per_publish() -> None:
    ledger = EchoLedger(ttl_s=10, max_entries=100)
    ledger.sent("t", b"x", now=0)
    ledger.sent("t", b"x", now=0)
    assert ledger.is_echo("t", b"x", now=1)
    assert ledger.is_echo("t", b"x", now=1)
    assert not ledger.is_echo("t", b"x", now=1)  # a third copy is someone else's
    assert not ledger.is_echo("u", b"x", now=1)  # another topic
    assert not ledger.is_echo("t", b"y", now=1)  # other bytes


def test_ledger_forgets_after_ttl_and_at_its_bound() -> None:
    ledger = EchoLedger(ttl_s=5, max_entries=2)
    ledger.sent("t", b"1", now=0)
    ledger.sent("t", b"2", now=3)
    assert ledger.is_echo("t", b"1", now=4)
    ledger.sent("t", b"3", now=4)
    assert not ledger.is_echo("t", b"2", now=8.5)  # expired at 8
    assert ledger.expired == 1
    ledger.sent("t", b"4", now=9)
    ledger.sent("t", b"5", now=9)  # over max_entries: the oldest still held (3) goes
    assert not ledger.is_echo("t", b"3", now=9)
    assert ledger.is_echo("t", b"4", now=9) and ledger.is_echo("t", b"5", now=9)
    assert len(ledger) == 0


def test_consumed_entry_does_not_shorten_a_later_identical_one() -> None:
    ledger = EchoLedger(ttl_s=5, max_entries=10)
    ledger.sent("t", b"x", now=0)
    ledger.sent("t", b"x", now=4)
    assert ledger.is_echo("t", b"x", now=1)  # consumes the first
    assert ledger.is_echo("t", b"x", now=6)  # the second lives until 9


# -- configuration ----------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bridge.toml"
    path.write_text(text)
    return path


RULE = '[[rules]]\ndirection = "up"\nfilter = "edge/+/results"\n'
CLOUD = '[cloud_broker]\nhost = "cloud.example"\n'


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("", "rules"),
        (RULE + "[forward]\nwindow = 0\n", "forward.window"),
        (RULE + "[queue]\nup_max_bytes = 10\n", "queue.up_max_bytes"),
        (RULE + "[site_broker]\nport = 70000\n", "site_broker.port"),
        (RULE + '[cloud_broker]\nhostt = "x"\n', "cloud_broker.hostt"),
        ('[[rules]]\ndirection = "sideways"\nfilter = "a"\n', "rules.0.direction"),
        ('[[rules]]\ndirection = "up"\nfilter = "a/#/b"\n', "rules.0.filter"),
        ('[[rules]]\ndirection = "up"\nfilter = "a/+"\ntemplate = "b"\n', "rules[0]"),
        (RULE + 'bridge_id = "a/b"\n', "bridge_id"),
        (RULE + "[cloud_broker]\nport = 1883\n[site_broker]\nport = 1883\n", "same broker"),
        (RULE + CLOUD + '[acks]\nenabled = true\ntemplate = "edge/acks"\n', "acks"),
        (RULE + CLOUD + '[acks]\nfilter = "edge/#/x"\n', "acks.filter"),
        (RULE + CLOUD + "[acks]\nmax_ids = 5000\n", "acks.max_ids"),
    ],
)
def test_bad_config_fails_at_start_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace(".", r"\.")):
        BridgeConfig.load(write(tmp_path, text))


def test_missing_password_file_named(tmp_path: Path) -> None:
    text = RULE + CLOUD + 'username = "bridge"\npassword_file = "/nonexistent/pw"\n'
    with pytest.raises(ConfigError, match=r"cloud_broker\.password_file"):
        BridgeConfig.load(write(tmp_path, text))


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEWISE_CLOUD_BROKER__PASSWORD", "from-env")
    monkeypatch.setenv("EDGEWISE_QUEUE__DIR", str(tmp_path / "q"))
    cfg = BridgeConfig.load(write(tmp_path, RULE + CLOUD))
    assert cfg.cloud_broker.resolved_password() == "from-env"
    assert cfg.queue.dir == tmp_path / "q"
    assert "from-env" not in repr(cfg)


def test_config_is_frozen(tmp_path: Path) -> None:
    cfg = BridgeConfig.load(write(tmp_path, RULE))
    with pytest.raises(ValueError, match="frozen"):
        cfg.site = "other"  # type: ignore[misc]


def test_cli_exits_2_and_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, RULE + "[forward]\nmax_rate_per_s = -1\n")
    done = subprocess.run(
        [sys.executable, "-m", "edgewise.cli.app", "bridge", "--config", str(path)],
        capture_output=True,
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if not k.startswith("EDGEWISE_")},
        timeout=60,
    )
    assert done.returncode == 2
    assert "forward.max_rate_per_s" in done.stderr.decode()


def test_cli_help_answers() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "edgewise.cli.app", "bridge", "--help"],
        capture_output=True,
        cwd=REPO,
        timeout=60,
    )
    assert done.returncode == 0
    out = done.stdout.decode()
    assert "--config" in out and "SIGTERM" in out


# -- docs/bridge.md stays true to the code ----------------------------------------------------

BRIDGE_MD = (REPO / "docs" / "bridge.md").read_text()


def test_every_setting_is_documented() -> None:
    from broker_bridge import AcksConfig, ForwardConfig, QueueConfig, RuleConfig

    documented = set(re.findall(r"^\| `([a-z_]+)` \|", BRIDGE_MD, re.M))
    for model in (BridgeConfig, QueueConfig, ForwardConfig, RuleConfig, AcksConfig):
        for name in model.model_fields:
            if name in ("site_broker", "cloud_broker", "queue", "forward", "acks"):
                assert f"[{name}]" in BRIDGE_MD  # a table: its keys are checked one by one
                continue
            assert name in documented, f"{model.__name__}.{name} missing from docs/bridge.md"


def test_documented_defaults_match_the_code() -> None:
    from broker_bridge import ForwardConfig, QueueConfig

    rows = dict(re.findall(r"^\| `([a-z_]+)` \| ([^|]+) \|", BRIDGE_MD, re.M))
    assert rows["window"].strip() == str(ForwardConfig().window)
    assert rows["max_pending"].strip().replace(",", "") == str(ForwardConfig().max_pending)
    assert rows["max_batch"].strip().replace(",", "") == str(ForwardConfig().max_batch)
    assert rows["synchronous"].strip() == f"`{QueueConfig().synchronous}`"
    assert rows["drain_timeout_s"].strip() == "10"
    assert rows["echo_window_s"].strip() == "60"


def test_the_example_config_loads(tmp_path: Path) -> None:
    example = re.search(r"```toml\n(.*?)```", BRIDGE_MD, re.S)
    assert example is not None
    cfg = BridgeConfig.model_validate(tomllib.loads(example.group(1)))
    assert cfg.compiled("up")[0].translate("edge/gw-1/results") == "sites/s1/edge/gw-1/results"


def test_bad_key_names_the_variable_that_sets_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like the node's and the worker's: each bad key's line says which variable sets it."""
    with pytest.raises(ConfigError) as info:
        BridgeConfig.load(write(tmp_path, RULE + CLOUD + "[forward]\nwindow = 0\n"))
    assert "forward.window" in str(info.value)
    assert "[set it in the file or with EDGEWISE_FORWARD__WINDOW]" in str(info.value)
    with pytest.raises(ConfigError) as info:
        BridgeConfig.load(write(tmp_path, '[[rules]]\ndirection = "sideways"\nfilter = "a"\n'))
    assert "rules.0.direction" in str(info.value)
    assert "with EDGEWISE_RULES]" in str(info.value)  # a list item: only the list has a variable
    monkeypatch.setenv("EDGEWISE_QUEUE__UP_MAX_BYTES", "lots")
    with pytest.raises(ConfigError) as info:
        BridgeConfig.load(write(tmp_path, RULE + CLOUD))
    assert "queue.up_max_bytes" in str(info.value)
    assert "EDGEWISE_QUEUE__UP_MAX_BYTES" in str(info.value)
