"""Hardware classes as configuration: every shipped class loads, a bad file names the file, class
and key, an unknown class lists the known ones, and the node config's explicit keys win over the
class's while unset ones take the class's."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from edge_node.config import NodeConfig
from edge_node.errors import ConfigError
from edge_node.hardware import HardwareClass, load_classes, shipped_classes_file

DOCS = Path(__file__).resolve().parent.parent / "docs" / "hardware-classes.md"
SHIPPED = load_classes(shipped_classes_file())
REQUIRED = {
    "generic-cpu",
    "jetson-vision-standard",
    "rpi5-coral",
    "intel-lowpower-detector",
    "x86-cpu-gateway",
}

GOOD = """\
[edge-box]
runtime = "onnxruntime"
providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
formats = ["onnx"]
intra_op_threads = 2
max_model_bytes = 1000000
max_input_elements = 4096
latency_slo_p99_ms = 20.0
"""


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hardware_classes.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _with(key: str, value: str) -> str:
    """GOOD with ``key = value`` set (replacing the line, or added)."""
    lines = [ln for ln in GOOD.splitlines() if not ln.startswith(f"{key} =")]
    return "\n".join([*lines, f"{key} = {value}"]) + "\n"


# ----------------------------------------------------------------------------- shipped classes
def test_the_required_classes_are_shipped_and_the_default_class_is_one() -> None:
    assert set(SHIPPED) >= REQUIRED
    assert NodeConfig.model_fields["hardware_class"].default in SHIPPED


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_each_shipped_class_loads_for_a_node(name: str) -> None:
    hw = NodeConfig(hardware_class=name).hardware()
    cls = SHIPPED[name]
    assert hw.name == name and hw.source == shipped_classes_file()
    assert (hw.providers, hw.intra_op_threads, hw.latency_slo_p99_ms) == (
        cls.providers,
        cls.intra_op_threads,
        cls.latency_slo_p99_ms,
    )
    for fmt in cls.formats:
        settings = hw.settings_for(fmt)
        assert settings.providers and settings.intra_op_threads == cls.intra_op_threads


def test_shipped_classes_say_what_the_issue_asks() -> None:
    jetson, coral = SHIPPED["jetson-vision-standard"], SHIPPED["rpi5-coral"]
    assert jetson.providers == (
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    )
    assert (coral.runtime, coral.providers, coral.formats) == (
        "litert",
        ("edgetpu", "cpu"),
        ("tflite",),
    )
    assert SHIPPED["intel-lowpower-detector"].providers[0] == "OpenVINOExecutionProvider"
    gateway = SHIPPED["x86-cpu-gateway"]
    assert set(gateway.formats) == {"onnx", "tflite"}
    # A second format runs on its own runtime's CPU.
    hw = NodeConfig(hardware_class="x86-cpu-gateway").hardware()
    assert (hw.settings_for("tflite").runtime, hw.settings_for("tflite").providers) == (
        "litert",
        ("cpu",),
    )


def _row(c: HardwareClass) -> list[str]:
    return [
        c.runtime,
        ", ".join(c.providers),
        ", ".join(c.formats),
        f"{c.intra_op_threads}/{c.inter_op_threads}",
        str(c.max_model_bytes),
        str(c.max_input_elements),
        str(c.latency_slo_p99_ms),
    ]


def test_the_shipped_classes_table_in_the_docs_is_the_file() -> None:
    documented: dict[str, list[str]] = {}
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 8 and cells[0].strip("`") in SHIPPED:
            documented[cells[0].strip("`")] = cells[1:]
    assert documented == {n: _row(c) for n, c in SHIPPED.items()}


def test_every_class_key_is_documented() -> None:
    text = DOCS.read_text(encoding="utf-8")
    keys = set(HardwareClass.model_fields) - {"name"}
    documented = set(re.findall(r"^\| `(\w+)` \| (?:[^|]|\\\|)+ \| (?:yes|no)", text, flags=re.M))
    assert documented == keys


# ----------------------------------------------------------------------------- bad files
BAD: dict[str, tuple[str, str]] = {
    "negative_size": (_with("max_model_bytes", "-1"), "edge-box.max_model_bytes"),
    "zero_input_elements": (_with("max_input_elements", "0"), "edge-box.max_input_elements"),
    "threads_out_of_range": (_with("intra_op_threads", "65"), "edge-box.intra_op_threads"),
    "typo_in_a_key": (_with("fromats", '["onnx"]'), "edge-box.fromats"),
    "missing_key": (
        "\n".join(ln for ln in GOOD.splitlines() if not ln.startswith("max_model_bytes")),
        "edge-box.max_model_bytes",
    ),
    "unknown_runtime": (_with("runtime", '"tensorrt"'), "edge-box.runtime"),
    "litert_name_on_onnxruntime": (_with("providers", '["edgetpu"]'), "edge-box.providers"),
    "misspelt_litert_provider": (
        _with("runtime", '"litert"')
        .replace('formats = ["onnx"]', 'formats = ["tflite"]')
        .replace('["CUDAExecutionProvider", "CPUExecutionProvider"]', '["edge-tpu", "cpu"]'),
        "edge-box.providers",
    ),
    "provider_twice": (
        _with("providers", '["CPUExecutionProvider", "CPUExecutionProvider"]'),
        "edge-box.providers",
    ),
    "no_providers": (_with("providers", "[]"), "edge-box.providers"),
    "formats_without_the_runtime_s_own": (_with("formats", '["tflite"]'), "edge-box.formats"),
    "unknown_format": (_with("formats", '["onnx", "pt"]'), "edge-box.formats"),
    "name_key": (_with("name", '"other"'), "edge-box.name"),
    "class_not_a_table": ('edge-box = "cpu"\n', "edge-box"),
    "bad_class_name": (GOOD.replace("[edge-box]", '["edge/box"]'), "edge/box"),
    "not_toml": ("[edge-box\nruntime = 1\n", "not valid TOML"),
    "empty_file": ("", "defines no class"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_classes_file_names_the_file_and_the_key(case: str, tmp_path: Path) -> None:
    text, says = BAD[case]
    path = _file(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        NodeConfig(hardware_class="edge-box", hardware_classes_file=path).hardware()
    message = str(info.value)
    assert str(path) in message and says in message, message


def test_good_operator_file_loads() -> None:
    # The counterpart of the bad cases: GOOD itself loads (the cases fail for their one change).
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = _file(Path(tmp), GOOD)
        hw = NodeConfig(hardware_class="edge-box", hardware_classes_file=path).hardware()
    assert (hw.name, hw.providers[0], hw.cls.max_input_elements) == (
        "edge-box",
        "CUDAExecutionProvider",
        4096,
    )


def test_missing_classes_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"hardware_classes_file: .*nope\.toml does not exist"):
        NodeConfig(hardware_classes_file=tmp_path / "nope.toml").hardware()


def test_unknown_class_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        NodeConfig(hardware_class="jetson-nano").hardware()
    message = str(info.value)
    assert "hardware_class: 'jetson-nano'" in message
    assert all(name in message for name in sorted(SHIPPED))
    # Known = the operator's file's classes, not the shipped ones.
    path = _file(tmp_path, GOOD)
    with pytest.raises(ConfigError, match=r"known: edge-box \[") as info:
        NodeConfig(hardware_class="generic-cpu", hardware_classes_file=path).hardware()


def test_node_cli_refuses_an_unknown_class_at_start(tmp_path: Path) -> None:
    from edgewise.cli.app import app

    config = tmp_path / "node.toml"
    config.write_text('hardware_class = "jetson-nano"\n', encoding="utf-8")
    result = CliRunner().invoke(app, ["node", "--config", str(config)], env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert "jetson-nano" in result.output and "jetson-vision-standard" in result.output


# ----------------------------------------------------------------------------- precedence
def test_unset_node_keys_take_the_class_values() -> None:
    cfg = NodeConfig(hardware_class="intel-lowpower-detector")
    assert (cfg.model.providers, cfg.model.intra_op_threads, cfg.health.latency_slo_p99_ms) == (
        None,
        None,
        None,
    )
    hw = cfg.hardware()
    assert hw.providers == ("OpenVINOExecutionProvider", "CPUExecutionProvider")
    assert (hw.intra_op_threads, hw.inter_op_threads, hw.latency_slo_p99_ms) == (2, 1, 150.0)


@pytest.mark.parametrize(
    ("settings", "expect"),
    [
        (
            {"model": {"providers": ["CPUExecutionProvider"]}},
            {"providers": ("CPUExecutionProvider",)},
        ),
        ({"model": {"intra_op_threads": 1}}, {"intra_op_threads": 1}),
        ({"model": {"inter_op_threads": 3}}, {"inter_op_threads": 3}),
        ({"health": {"latency_slo_p99_ms": 0.0}}, {"latency_slo_p99_ms": 0.0}),
        ({"health": {"latency_slo_p99_ms": 12.5}}, {"latency_slo_p99_ms": 12.5}),
    ],
    ids=["providers", "intra_threads", "inter_threads", "slo_off", "slo_tighter"],
)
def test_explicit_node_keys_win_over_the_class(
    settings: dict[str, Any], expect: dict[str, Any]
) -> None:
    hw = NodeConfig(hardware_class="jetson-vision-standard", **settings).hardware()
    got = {k: getattr(hw, k) for k in expect}
    assert got == expect
    untouched = {"providers", "intra_op_threads", "inter_op_threads", "latency_slo_p99_ms"} - set(
        expect
    )
    cls = SHIPPED["jetson-vision-standard"]
    assert all(getattr(hw, k) == getattr(cls, k) for k in untouched)


def test_explicit_key_from_the_environment_wins_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEWISE_MODEL__INTRA_OP_THREADS", "3")
    hw = NodeConfig.load(hardware_class="jetson-vision-standard").hardware()
    assert hw.intra_op_threads == 3


def test_providers_of_another_runtime_stop_the_node() -> None:
    cfg = NodeConfig(hardware_class="rpi5-coral", model={"providers": ["CUDAExecutionProvider"]})
    with pytest.raises(ConfigError, match=r"model\.providers: .*rpi5-coral runs litert"):
        cfg.hardware()


# ----------------------------------------------------------------------------- what fits
def test_accelerator_is_the_first_provider_for_the_model_s_format() -> None:
    coral = NodeConfig(hardware_class="rpi5-coral").hardware()
    # Judged by the file's format, whatever the backend calls itself.
    assert coral.accelerator_missing("/m/det.tflite", "litert", "cpu")
    assert not coral.accelerator_missing("/m/det.tflite", "litert", "edgetpu")
    gateway = NodeConfig(hardware_class="x86-cpu-gateway").hardware()
    assert not gateway.accelerator_missing("/m/det.tflite", "litert", "cpu")
    assert not gateway.accelerator_missing("/m/det.onnx", "onnxruntime", "CPUExecutionProvider")
    jetson = NodeConfig(hardware_class="jetson-vision-standard").hardware()
    assert jetson.accelerator_missing("/m/det.onnx", "onnxruntime", "CUDAExecutionProvider")
    assert not jetson.accelerator_missing(None, "onnxruntime", "TensorrtExecutionProvider")
    pinned = NodeConfig(
        hardware_class="jetson-vision-standard", model={"providers": ["CPUExecutionProvider"]}
    ).hardware()
    assert not pinned.accelerator_missing("/m/det.onnx", "onnxruntime", "CPUExecutionProvider")


def test_release_envelope_checks() -> None:
    from edgewise.serving.runtime import SUPPORTED_SUFFIXES

    hw = NodeConfig(hardware_class="rpi5-coral").hardware()
    ok_shape = [-1, 320, 320, 3]
    onnx = hw.refuse_release("onnx", 1000, ok_shape, "r")
    assert onnx is not None and onnx.reason == "unsupported_format"
    big = hw.refuse_release("tflite", 33_554_433, ok_shape, "r")
    tflite_runs_here = ".tflite" in SUPPORTED_SUFFIXES
    if tflite_runs_here:  # the LiteRT backend is installed: size and input are judged
        assert big is not None and big.reason == "model_too_large"
        wide = hw.refuse_release("tflite", 1000, [-1, 321, 320, 3], "r")
        assert wide is not None and wide.reason == "input_too_large"
        assert hw.refuse_release("tflite", 1000, ok_shape, "r") is None
    else:  # without it nothing .tflite can run: refused before the download all the same
        assert big is not None and big.reason == "unsupported_format"
        assert "no tflite runtime" in big.detail
    generic = NodeConfig().hardware()
    assert generic.refuse_release("onnx", 1000, [-1, 8, 8], "r") is None
    assert generic.refuse_input([512, 513], "m") is not None  # 262,656 > 262,144
    assert generic.refuse_input([512, 512], "m") is None
