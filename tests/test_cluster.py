"""ClusterSpec parsing (strings, local, files), properties, round trip, and the hardware catalog."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from autopar.cluster import ClusterSpec
from autopar.hardware import DEVICE_CATALOG, DeviceSpec, LinkLevel, default_links, get_device

A100_80GB = "A100-80GB"
VALID_FILE = 'nodes = 2\ndevices_per_node = 8\ndevice = "A100-80GB"\n'


@pytest.mark.parametrize(
    ("text", "num_nodes", "devices_per_node", "device", "backend"),
    [
        ("2x8xA100-80GB", 2, 8, "A100-80GB", "nccl"),
        ("8xH100", 1, 8, "H100-SXM", "nccl"),
        (" 2 x 4 x h200-141gb ", 2, 4, "H200", "nccl"),
        ("1x1xa100-40gb", 1, 1, "A100-40GB", "nccl"),
        ("4X2xH100-SXM", 4, 2, "H100-SXM", "nccl"),
        ("2xA100-SXM4-80GB", 1, 2, "A100-80GB", "nccl"),
        ("2x4xcpu", 2, 4, "CPU", "gloo"),
    ],
)
def test_parse_counts(text: str, num_nodes: int, devices_per_node: int, device: str,
                      backend: str) -> None:
    spec = ClusterSpec.parse(text)
    assert (spec.num_nodes, spec.devices_per_node) == (num_nodes, devices_per_node)
    assert spec.device.name == device and spec.backend == backend
    assert spec.num_devices == num_nodes * devices_per_node
    assert spec.text == text and not spec.local


def test_levels_follow_the_shape() -> None:
    intra, inter = default_links(A100_80GB)
    assert ClusterSpec.parse("2x8xA100-80GB").levels == (intra, inter)
    assert ClusterSpec.parse("8xA100-80GB").levels == (intra,)
    assert ClusterSpec.parse("4x1xA100-80GB").levels == (inter,)
    assert ClusterSpec.parse("1xA100-80GB").levels == ()


@pytest.mark.parametrize(("text", "num"), [("local:4", 4), ("LOCAL:3", 3), ("local: 2", 2),
                                          ("local", os.cpu_count() or 1)])
def test_parse_local(text: str, num: int) -> None:
    spec = ClusterSpec.parse(text)
    assert spec.local and spec.backend == "gloo" and spec.num_nodes == 1
    assert spec.devices_per_node == spec.num_devices == num
    cpu = DEVICE_CATALOG["CPU"]
    assert spec.device.memory_bytes == cpu.memory_bytes // num
    assert spec.device.peak_flops_per_s_for("fp32") == pytest.approx(
        cpu.peak_flops_per_s_for("fp32") / num)
    assert spec.device.placeholder and spec.intra_node.placeholder
    assert str(spec) == f"local: {num} CPU process{'es' if num > 1 else ''} over gloo"


def test_str_is_one_line_summary() -> None:
    text = str(ClusterSpec.parse("2x8xA100-80GB"))
    assert "\n" not in text
    assert text.startswith("2×8 A100-80GB (16 devices, nccl): NVLink3")
    assert "230 GB/s" in text and "22.5 GB/s" in text
    assert str(ClusterSpec.parse("1xH100")) == "1×1 H100-SXM (1 device, nccl)"


@pytest.mark.parametrize("text", ["2x8xA100-80GB", "local:3", "8xH200", "1x2xCPU"])
def test_dict_round_trip(text: str) -> None:
    spec = ClusterSpec.parse(text)
    data = json.loads(json.dumps(spec.to_dict()))
    assert ClusterSpec.from_dict(data) == spec


def test_from_dict_validates() -> None:
    data = ClusterSpec.parse("2x8xA100-80GB").to_dict()
    with pytest.raises(ValueError, match=r"num_nodes = 0 is invalid: expected an int >= 1"):
        ClusterSpec.from_dict({**data, "num_nodes": 0})
    with pytest.raises(ValueError, match="expected"):
        ClusterSpec.from_dict({k: v for k, v in data.items() if k != "backend"})
    with pytest.raises(ValueError, match="local must be a bool"):
        ClusterSpec.from_dict({**data, "local": "yes"})
    with pytest.raises(ValueError, match=r"memory_bytes = -1 is invalid"):
        ClusterSpec.from_dict({**data, "device": {**data["device"], "memory_bytes": -1}})
    with pytest.raises(TypeError, match="needs a dict"):
        ClusterSpec.from_dict([1, 2])  # type: ignore[arg-type]


def test_toml_file_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text(VALID_FILE + "memory_gib = 70\npeak_tflops = { bf16 = 280, float32 = 18 }\n"
                    "intra_node_bandwidth_gb_per_s = 200\ninter_node_latency_us = 12\n")
    for given in (path, str(path)):
        spec = ClusterSpec.parse(given)
        assert spec.num_devices == 16 and spec.backend == "nccl" and spec.text == str(path)
        assert spec.device.memory_bytes == 70 * 2**30
        assert spec.device.peak_flops_per_s_for("bf16") == 280e12
        assert spec.device.peak_flops_per_s_for("fp32") == 18e12
        assert spec.device.peak_flops_per_s_for("tf32") == 156e12  # kept from the catalog
        assert spec.intra_node.bandwidth_bytes_per_s == 200e9
        assert spec.inter_node.latency_s == pytest.approx(12e-6)
        assert str(path) in spec.device.source
        assert ClusterSpec.from_dict(spec.to_dict()) == spec


def test_json_file(tmp_path: Path) -> None:
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps({"nodes": 1, "devices_per_node": 4, "device": "cpu",
                                "backend": "gloo", "inter_node_bandwidth_gb_per_s": 1.5}))
    spec = ClusterSpec.parse(str(path))
    assert spec.device.name == "CPU" and spec.num_devices == 4 and spec.backend == "gloo"
    assert spec.inter_node.bandwidth_bytes_per_s == 1.5e9


DEVICE_LIST = "valid device types: A100-40GB"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "it is empty"),
        ("   ", "it is empty"),
        ("0x8xA100-80GB", "the number of nodes must be >= 1, got 0"),
        ("2x0xH100", "the devices per node must be >= 1, got 0"),
        ("-1x8xH100", "the number of nodes must be >= 1, got -1"),
        ("-4xH100", "the devices per node must be >= 1, got -4"),
        ("2x8x", "the device type is missing after the counts"),
        ("2x8xTPUv4", "unknown device type 'TPUv4'"),
        ("8xA100", "unknown device type 'A100'"),
        ("H100", "no device count found (did you mean 1xH100?)"),
        ("2x8x4xH100", "too many counts"),
        ("2.5x8xH100", "no device count found"),
        ("banana", "no device count found"),
        ("local:0", "local needs at least 1 process, got 0"),
        ("local:-3", "local needs at least 1 process, got -3"),
        ("local:four", "the process count 'four' after 'local:' is not an int"),
        ("local:", "the process count '' after 'local:' is not an int"),
    ],
)
def test_malformed_strings(text: str, expected: str) -> None:
    with pytest.raises(ValueError) as info:
        ClusterSpec.parse(text)
    message = str(info.value)
    assert expected in message
    assert f"cannot parse cluster spec {text!r}" in message
    assert "NODESxDEVICESxTYPE like 2x8xA100-80GB, local[:N], or a .toml/.json file" in message
    assert DEVICE_LIST in message and "H100-SXM (also H100, H100-80GB)" in message


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("c.toml", 'nodes = 2\ndevices_per_node = 8\n', "missing required key(s) ['device']"),
        ("c.toml", VALID_FILE + "memory_gb = 80\n",
         "unknown key 'memory_gb' (did you mean 'memory_gib'?); valid keys: ['nodes'"),
        ("c.toml", VALID_FILE.replace("nodes = 2", 'nodes = "2"'),
         "'nodes' must be an int >= 1, got str '2'"),
        ("c.toml", VALID_FILE.replace("devices_per_node = 8", "devices_per_node = 0"),
         "'devices_per_node' must be an int >= 1, got int 0"),
        ("c.json", '{"nodes": true, "devices_per_node": 8, "device": "H100"}',
         "'nodes' must be an int >= 1, got bool True"),
        ("c.toml", VALID_FILE.replace("A100-80GB", "B200"), "unknown device type 'B200'"),
        ("c.toml", VALID_FILE.replace('"A100-80GB"', "8"), "'device' must be a string, got int 8"),
        ("c.toml", "nodes = [", "is not valid TOML"),
        ("c.json", '{"nodes": 2,', "is not valid JSON"),
        ("c.json", "[1, 2]", "must hold one object/table of keys, got list"),
        ("c.toml", VALID_FILE + "intra_node_bandwidth_gb_per_s = -5\n",
         "'intra_node_bandwidth_gb_per_s' must be a positive number, got int -5"),
        ("c.toml", VALID_FILE + 'inter_node_latency_us = "fast"\n',
         "'inter_node_latency_us' must be a positive number, got str 'fast'"),
        ("c.toml", VALID_FILE + "peak_tflops = 300\n", "'peak_tflops' must be a table"),
        ("c.toml", VALID_FILE + "peak_tflops = { int4 = 600 }\n", "unknown dtype 'int4'"),
        ("c.toml", VALID_FILE + 'backend = "mpi"\n', "ClusterSpec.backend = 'mpi' is invalid"),
        ("c.toml", VALID_FILE.replace("A100-80GB", "CPU") + 'backend = "nccl"\n',
         "'nccl' needs GPUs"),
        ("c.yaml", VALID_FILE, "must end in .toml or .json"),
    ],
)
def test_malformed_files(tmp_path: Path, name: str, content: str, expected: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError) as info:
        ClusterSpec.parse(path)
    assert expected in str(info.value)
    assert repr(str(path)) in str(info.value)


@pytest.mark.parametrize("name", ["missing.toml", "nowhere/missing.json"])
def test_missing_file(tmp_path: Path, name: str) -> None:
    path = str(tmp_path / name)
    with pytest.raises(ValueError, match="not found; expected NODESxDEVICESxTYPE"):
        ClusterSpec.parse(path)


@pytest.mark.parametrize("value", [42, None, b"2x8xA100-80GB", ["local"]])
def test_non_string_is_a_type_error(value: object) -> None:
    with pytest.raises(TypeError, match="cluster spec must be a str or a path"):
        ClusterSpec.parse(value)  # type: ignore[arg-type]


def test_catalog_numbers_are_the_datasheets() -> None:
    a100, h100, h200 = get_device("A100-80GB"), get_device("h100"), get_device("H200-141GB")
    assert a100.peak_flops_per_s_for("bf16") == 312e12
    assert a100.peak_flops_per_s_for("torch.float32") == 19.5e12
    assert a100.peak_flops_per_s_for("tf32") == 156e12
    assert h100.peak_flops_per_s_for("bfloat16") == 989e12
    assert h100.peak_flops_per_s_for("float8_e4m3fn") == 1979e12
    assert (h100.peak_flops_per_s_for("fp32"), h100.peak_flops_per_s_for("tf32")) == (67e12, 494e12)
    assert h200.peak_flops_per_s == h100.peak_flops_per_s
    assert (h200.memory_bytes, h200.memory_bandwidth_bytes_per_s) == (141 * 2**30, 4.8e12)
    assert get_device("A100-40GB").memory_bandwidth_bytes_per_s == 1555e9
    assert a100.intra_node_bandwidth_bytes_per_s == 300e9  # 600 GB/s total, per direction
    assert h100.intra_node_bandwidth_bytes_per_s == 450e9
    assert all("datasheet" in get_device(n).source for n in ("A100-40GB", "H100", "H200"))
    assert get_device("cpu").placeholder and "placeholder" in get_device("CPU").source
    assert get_device("H100-80GB") is get_device("H100-SXM")


def test_catalog_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown device type 'V100'; valid device types: A100"):
        get_device("V100")
    with pytest.raises(TypeError):
        get_device(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"A100-80GB has no fp8 peak"):
        get_device("A100-80GB").peak_flops_per_s_for("fp8")
    with pytest.raises(ValueError, match=r"unknown dtype 'int4'"):
        get_device("H100").peak_flops_per_s_for("int4")


def test_specs_round_trip_and_validate() -> None:
    for spec in DEVICE_CATALOG.values():
        assert DeviceSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    for link in {*default_links("A100-40GB"), *default_links("H200"), *default_links("CPU")}:
        assert LinkLevel.from_dict(link.to_dict()) == link
        assert link.peak_bandwidth_bytes_per_s is None or (
            link.bandwidth_bytes_per_s <= link.peak_bandwidth_bytes_per_s)
    with pytest.raises(ValueError, match=r"latency_s = 0 is invalid"):
        LinkLevel(name="x", bandwidth_bytes_per_s=1e9, latency_s=0, source="test")
    with pytest.raises(ValueError, match=r"unknown keys \['colour'\]"):
        LinkLevel.from_dict({**default_links("H100")[0].to_dict(), "colour": "red"})
