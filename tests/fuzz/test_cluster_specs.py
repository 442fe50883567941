"""Fuzz the cluster a user names: ``ClusterSpec.parse`` strings, TOML/JSON cluster files, and
``autopar plan --cluster``.

Valid specs and files mutated (characters, counts, device names; keys deleted, retyped, nudged,
added; file bytes flipped) and random text. A spec is accepted and round-trips through
``to_dict``/``from_dict``, or is rejected by one ValueError/TypeError line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autopar import ClusterSpec
from autopar.hardware import DEVICE_ALIASES, DEVICE_CATALOG
from tests.fuzz.strategies import (
    accepted,
    check_cli,
    check_refuses_non_str,
    fuzz_settings,
    json_values,
    mutated_bytes,
    mutated_json,
    mutated_text,
    numbers,
    run_cli,
    to_toml,
)

DEVICES = sorted({*DEVICE_CATALOG, *DEVICE_ALIASES})
SPECS = ("2x8xA100-80GB", "8xH100", "1x1xCPU", "local", "local:4", " 4 × 8 × h200 ", "128x8xA100-80GB")
CLUSTER_FILE = {"nodes": 2, "devices_per_node": 8, "device": "A100-80GB", "backend": "nccl",
                "memory_gib": 80, "peak_tflops": {"bf16": 280, "fp32": 19.5},
                "intra_node_bandwidth_gb_per_s": 230, "intra_node_latency_us": 5,
                "inter_node_bandwidth_gb_per_s": 22.5, "inter_node_latency_us": 10}
NUMERIC_KEYS = (*[key for key, value in CLUSTER_FILE.items() if isinstance(value, int | float)], "bf16")
counts = (st.integers(-3, 20) | st.sampled_from((0, 2**31, 2**63, 10**30))
          | st.from_regex(r"[+-]?\d{1,25}", fullmatch=True))
spec_strings = (
    st.sampled_from(SPECS).flatmap(mutated_text)
    | st.builds(lambda n, d, sep, name: f"{n}{sep}{d}{sep}{name}", counts, counts,
                st.sampled_from(("x", "X", "×", " x ", "*", "")),
                st.sampled_from(DEVICES) | st.text(max_size=12))
    | st.builds(lambda count: f"local:{count}", counts | st.text(max_size=6))
    | st.text(max_size=40)
)


def check_spec(spec: ClusterSpec | None) -> None:
    if spec is not None:
        assert spec.num_devices >= 1 and str(spec)
        assert ClusterSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@fuzz_settings(200)
@given(text=spec_strings)
def test_parse_strings(text):
    check_spec(accepted(ClusterSpec.parse, mention="cluster", spec=text))


@fuzz_settings(20)
@given(value=json_values | st.binary(max_size=8))
def test_parse_not_a_str(value):
    check_refuses_non_str(ClusterSpec.parse, value)


@fuzz_settings(40)
@given(data=json_values)
def test_from_dict_of_anything(data):
    check_spec(accepted(ClusterSpec.from_dict, mention="", data=data))


@fuzz_settings(60)
@given(data=st.data())
def test_from_dict_mutated(data):
    valid = ClusterSpec.parse(data.draw(st.sampled_from(SPECS))).to_dict()
    mutated = data.draw(mutated_json(valid))
    check_spec(accepted(ClusterSpec.from_dict, mention="", data=mutated))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("clusters")


@fuzz_settings(120)
@given(data=st.data(), kind=st.sampled_from(("toml", "json")), as_path=st.booleans())
def test_cluster_files(folder, data, kind, as_path):
    content = data.draw(mutated_json(CLUSTER_FILE))
    text = to_toml(content) if kind == "toml" and isinstance(content, dict) else json.dumps(content)
    raw = text.encode("utf-8", "surrogatepass")
    if data.draw(st.booleans(), label="mutate the bytes too"):
        raw = data.draw(mutated_bytes(raw))
    path = folder / f"cluster.{kind}"
    path.write_bytes(raw)
    spec = accepted(ClusterSpec.parse, mention="cluster", spec=path if as_path else str(path))
    check_spec(spec)


@fuzz_settings(60)
@given(data=st.data(), kind=st.sampled_from(("toml", "json")))
def test_cluster_file_numbers(folder, data, kind):
    """One or two numbers of a valid file replaced: huge, tiny, negative, non-finite, another type."""
    content = {**CLUSTER_FILE, "peak_tflops": dict(CLUSTER_FILE["peak_tflops"])}
    for key in data.draw(st.sets(st.sampled_from(NUMERIC_KEYS), min_size=1, max_size=2), label="keys"):
        value = data.draw(numbers | json_values, label=key)
        if key == "bf16":
            content["peak_tflops"]["bf16"] = value
        else:
            content[key] = value
    path = folder / f"numbers.{kind}"
    path.write_text(to_toml(content) if kind == "toml" else json.dumps(content), encoding="utf-8")
    check_spec(accepted(ClusterSpec.parse, mention="cluster", spec=str(path)))


@fuzz_settings(30)
@given(name=st.text(max_size=20), suffix=st.sampled_from((".toml", ".json", ".TOML", ".txt", "")),
       kind=st.sampled_from(("missing", "folder", "empty")))
def test_odd_cluster_paths(folder, name, suffix, kind):
    path = f"{folder}/{kind}-{name}{suffix}".replace("\x00", "")
    if kind == "folder":
        Path(path).mkdir(parents=True, exist_ok=True)
    elif kind == "empty" and "/" not in name:
        Path(path).write_bytes(b"")
    check_spec(accepted(ClusterSpec.parse, mention="cluster", spec=path))
    check_spec(accepted(ClusterSpec.parse, mention="cluster", spec=Path(path)))


@fuzz_settings(40)
@given(text=spec_strings)
def test_cli_cluster_option(text):
    """``--batch 0`` is checked right after the cluster: a spec that parses stops there, quickly."""
    code, _, err = run_cli("plan", "gpt-tiny", f"--cluster={text}", "--batch", "0")
    check_cli(code, err)
    assert code == 2
