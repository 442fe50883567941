"""Fuzz the option strings of ``autopar plan``/``run``/``demo``: ``--fix``, ``--moe``,
``--random-ltd``, the ``fix=`` dict (``Fix.from_dict``) and the passes ``autopar run`` hands its
script (``passes_from_json``).

Valid strings mutated (characters inserted, replaced, cut), KEY=VALUE lists built from the real
keys with odd values (huge and negative numbers, long ranges, empty parts, repeated keys) and
random text. An accepted option round-trips (a pass through ``passes_to_json``); a rejected one is
one ValueError/TypeError line, and on the command line exit code 2 with one stderr line.
"""

from __future__ import annotations

import dataclasses
import json

from hypothesis import given
from hypothesis import strategies as st

from autopar.cli.moe_args import parse_moe
from autopar.cli.pass_args import RANDOM_LTD_KEYS, parse_random_ltd
from autopar.cli.plan_cmd import FIX_KEYS, parse_fix
from autopar.config import Fix
from autopar.passes import FusedAttention, MoE, RandomLTD
from autopar.runtime.pass_state import PASSES_ENV, passes_from_json, passes_to_json
from tests.fuzz.strategies import (
    accepted,
    check_cli,
    fuzz_settings,
    json_values,
    keys,
    mutated_json,
    mutated_text,
    run_cli,
)

MOE_KEYS = tuple(f.name for f in dataclasses.fields(MoE))
FIXES = ("tp=8,pp=4,schedule=1f1b", "dp=2,zero=3,recompute=full",
         "pp=2,schedule=interleaved,virtual_stages=2", "microbatch_size=1,num_microbatches=8,ep=2")
MOES = ("num_experts=8,top_k=2,layers=every_other,capacity_factor=1.25",
        "layers=1;3,num_experts=4;8,gate=dts", "layers=0-2+5,upcycle=yes,residual=true,dropless=none", "")
RANDOM_LTDS = ("min_tokens=128,num_steps=1000,granularity=16,layers=1-10", "min_tokens=4,num_steps=5,seed=3")
integers = st.integers(-5, 20) | st.sampled_from((0, 2**31, 2**63, 10**30, 10**100))
values = (integers.map(str)
          | st.builds("{}-{}".format, integers, integers)  # ranges, some very long
          | st.lists(integers.map(str), min_size=2, max_size=4).flatmap(
              lambda items: st.sampled_from((";", "+", "-")).map(lambda sep: sep.join(items)))
          | st.sampled_from(("", " ", "none", "None", "true", "no", "1.5", "1e400", "nan", "inf", "-0",
                             "+3", "every_other", "second_half", "existing", "gpipe", "1f1b", "dts", "full",
                             "²", "١٢", "1_000", "0x10", "=", "a=b"))
          | st.text(max_size=8))


def key_values(names: tuple[str, ...]) -> st.SearchStrategy[str]:
    """``k=v,k=v`` with real keys (mostly; DeepSpeed's names and others too), odd values, odd
    separators and spacing."""
    key = st.sampled_from((*names * 4, "k", "min_value", "ep_size", "", " ")) | keys
    pair = st.builds(lambda key, sep, value: f"{key}{sep}{value}", key,
                     st.sampled_from(("=", "=", "=", " = ", "==", "")), values)
    return st.lists(pair, max_size=5).map(",".join)


def one_value_changed(example: str, names: tuple[str, ...]) -> st.SearchStrategy[str]:
    """A valid option with one value replaced, or one more ``key=value`` appended."""
    parts = example.split(",") if example else []

    def changed(index: int, key: str, value: str) -> str:
        if index < len(parts):
            key = parts[index].partition("=")[0]
        return ",".join([*parts[:index], f"{key}={value}", *parts[index + 1:]])

    return st.builds(changed, st.integers(0, len(parts)), st.sampled_from(names), values)


def options(names: tuple[str, ...], examples: tuple[str, ...]) -> st.SearchStrategy[str]:
    return (key_values(names) | st.sampled_from(examples).flatmap(mutated_text)
            | st.sampled_from(examples).flatmap(lambda example: one_value_changed(example, names))
            | st.text(max_size=30))


def round_trips(graph_pass: object) -> None:
    if graph_pass is not None:
        assert passes_from_json(passes_to_json([graph_pass])) == [graph_pass]


@fuzz_settings(200)
@given(text=options(FIX_KEYS, FIXES).filter(lambda text: not _plan_cmd_bug(text)))
def test_fix_option(text):
    pins = accepted(parse_fix, text, mention="--fix")
    if pins is not None:
        assert set(pins) <= set(FIX_KEYS) and Fix.from_dict(pins).pinned() == pins


def _plan_cmd_bug(text: str) -> bool:
    """Texts that meet the two faults of parse_fix below (autopar/cli/plan_cmd.py is not a file of
    this suite's fixes)."""
    return len(text.strip().splitlines()) > 1 or any(char.isdigit() and not char.isdecimal() for char in text)


def test_fix_option_superscript_digit():
    """'²' is a digit to str.isdigit() but not to int(): refused with --fix's own message."""
    accepted(parse_fix, "tp=²", mention="--fix")


def test_fix_option_line_break():
    """A line break in --fix is refused up front, so each message quoting it stays one line."""
    accepted(parse_fix, "tp=2,t\np=2,t\np=2", mention="--fix")


@fuzz_settings(60)
@given(values=st.dictionaries(st.sampled_from(FIX_KEYS) | keys | st.integers() | st.none(),
                              json_values | integers, max_size=4) | json_values)
def test_fix_dict(values):
    fix = accepted(Fix.from_dict, values, mention="fix")
    if fix is not None:
        assert Fix.from_dict(fix.pinned()) == fix


@fuzz_settings(200)
@given(text=options(MOE_KEYS, MOES))
def test_moe_option(text):
    round_trips(accepted(parse_moe, text, mention="--moe"))


@fuzz_settings(150)
@given(text=options(RANDOM_LTD_KEYS, RANDOM_LTDS))
def test_random_ltd_option(text):
    round_trips(accepted(parse_random_ltd, text, mention="--random-ltd"))


HANDED = json.loads(passes_to_json([MoE(num_experts=(4, 8), layers=(1, 3)), FusedAttention(),
                                    RandomLTD(min_tokens=8, num_steps=10, layers=(1, 2))]))


@fuzz_settings(150)
@given(data=st.data())
def test_passes_handed_to_a_script(data):
    text = data.draw(st.builds(json.dumps, mutated_json(HANDED)) | mutated_text(json.dumps(HANDED))
                     | st.text(max_size=40))
    passes = accepted(passes_from_json, text, mention=PASSES_ENV)
    if passes is not None:
        assert passes_from_json(passes_to_json(passes)) == passes


@fuzz_settings(40, deadline_s=5)
@given(fix=options(FIX_KEYS, FIXES), moe=st.none() | options(MOE_KEYS, MOES),
       random_ltd=st.none() | options(RANDOM_LTD_KEYS, RANDOM_LTDS))
def test_plan_command_options(fix, moe, random_ltd):
    """Every option is parsed before the model is built: an unknown model ends a good command line."""
    argv = ["plan", "no-such-model", "--cluster=local:2", "--batch", "4", f"--fix={fix}"]
    argv += [] if moe is None else [f"--moe={moe}"]
    argv += [] if random_ltd is None else [f"--random-ltd={random_ltd}"]
    code, _, err = run_cli(*argv)
    check_cli(code, err)
    assert code == 2
