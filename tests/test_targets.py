"""Targets: presets load, validation errors name the field, JSON Schema export, user files, overrides."""

from __future__ import annotations

from typing import Literal

import jsonschema
import pytest
import yaml
from cimc.targets import (
    DeviceParamsBase,
    PcmIbmDevice,
    device_models,
    list_targets,
    load_target,
    register_device,
    target_json_schema,
    target_yaml,
)
from pydantic import Field, ValidationError

from cimc.errors import TargetError


def _write(tmp_path, data, name="chip.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _aon_data():
    return yaml.safe_load(target_yaml(load_target("aon-cim")))


def test_presets_load_with_expected_geometry():
    aon, hermes, ideal = load_target("aon-cim"), load_target("hermes"), load_target("ideal")
    assert (aon.array.rows, aon.weight_cols, aon.array.count) == (1024, 256, 1)
    assert aon.execution == "layer-serial" and aon.converters.dac_bits == 8 and aon.converters.adc_bits == 8
    assert (hermes.array.rows, hermes.weight_cols, hermes.array.count) == (256, 256, 64)
    assert hermes.execution == "pipelined" and hermes.converters.adc_count == 256 and hermes.clock_hz == 1e9
    assert ideal.converters.dac_bits is None and ideal.converters.adc_bits is None
    assert ideal.array.count is None and ideal.device.model == "ideal"
    names = [name for name, _ in list_targets()]
    assert names == ["aon-cim", "hermes", "ideal"]
    assert all(desc for _, desc in list_targets())


def test_pcm_ibm_field_names_and_defaults():
    dev = load_target("aon-cim").device
    assert isinstance(dev, PcmIbmDevice)
    assert dev.g_max_us == 25.0 and dev.t0_s == 20.0 and dev.t_read_s == 250e-9
    assert dev.prog_noise_coeffs_us == (0.26348, 1.9650, -1.1731)
    assert dev.drift_nu_mean_coeffs == (-0.0155, 0.0244) and dev.drift_nu_mean_range == (0.049, 0.1)
    assert dev.drift_nu_std_coeffs == (-0.0125, -0.0059) and dev.drift_nu_std_range == (0.008, 0.045)
    assert (dev.read_noise_q_coeff, dev.read_noise_q_exponent, dev.read_noise_q_max) == (0.0088, 0.65, 0.2)
    assert dev.g_min_clip == 1e-7 and dev.gdc == "layer" and dev.weight_scale == "layer"
    assert dev.prog_noise_scale == dev.drift_scale == dev.read_noise_scale == 1.0


def test_bad_value_names_file_and_field(tmp_path):
    data = _aon_data()
    data["converters"]["adc_bits"] = -3
    with pytest.raises(TargetError, match=r"^chip\.yaml: converters\.adc_bits: Input should be greater"):
        load_target(str(_write(tmp_path, data)))


def test_unknown_key_and_bad_device_parameter_are_named(tmp_path):
    data = _aon_data()
    data["array"]["colums"] = 3
    with pytest.raises(TargetError, match=r"array\.colums: unknown field; did you mean 'cols'\? valid fields at "
                                          r"array: rows, cols, devices_per_weight, count$"):
        load_target(str(_write(tmp_path, data)))
    data = _aon_data()
    data["device"]["g_max_us"] = -1.0
    with pytest.raises(TargetError, match=r"device\.g_max_us: Input should be greater than 0"):
        load_target(str(_write(tmp_path, data)))
    data = _aon_data()
    data["device"] = {"model": "memristor-x"}
    with pytest.raises(TargetError, match=r"device: .*'memristor-x'.*pcm-ibm"):
        load_target(str(_write(tmp_path, data)))


def test_cols_must_hold_whole_weights(tmp_path):
    data = _aon_data()
    data["array"]["cols"] = 511
    with pytest.raises(TargetError, match=r"array: .*multiple of devices_per_weight"):
        load_target(str(_write(tmp_path, data)))


def test_unknown_preset_lists_known_names_and_missing_file_fails():
    with pytest.raises(TargetError, match=r"unknown target 'aon-cimm'.*aon-cim, hermes, ideal"):
        load_target("aon-cimm")
    with pytest.raises(TargetError, match=r"does not exist"):
        load_target("no/such/target.yaml")


def test_invalid_yaml_is_a_target_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n", encoding="utf-8")
    with pytest.raises(TargetError, match=r"broken\.yaml: line \d+ not valid YAML"):
        load_target(str(path))


def test_user_yaml_round_trips_resolved_target(tmp_path):
    original = load_target("hermes")
    path = tmp_path / "my-hermes.yaml"
    path.write_text(target_yaml(original), encoding="utf-8")
    assert load_target(str(path)) == original


def test_json_schema_accepts_presets_and_rejects_bad_files():
    schema = target_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    for name in ("aon-cim", "hermes", "ideal"):
        jsonschema.validate(yaml.safe_load(target_yaml(load_target(name))), schema)
    bad = _aon_data()
    bad["converters"]["adc_count"] = 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    described = schema["$defs"]["ConverterConfig"]["properties"]["adc_energy_ref_j"]["description"]
    assert "HARDWARE.md" in described


def test_overrides_return_validated_copies():
    aon = load_target("aon-cim")
    low = aon.with_overrides(dac_bits=4, adc_bits=4)
    assert (low.converters.dac_bits, low.converters.adc_bits) == (4, 4)
    assert aon.converters.dac_bits == 8
    assert aon.with_overrides(adc_bits=0).converters.adc_bits is None
    assert aon.with_overrides(**{"array.count": 2}).array.count == 2
    with pytest.raises(ValueError, match="unknown target override 'adc_bitz'"):
        aon.with_overrides(adc_bitz=4)
    with pytest.raises(ValidationError):
        aon.with_overrides(dac_bits=-1)
    with pytest.raises(ValidationError):
        aon.clock_hz = 1.0  # frozen


def test_user_device_model_registers(tmp_path):
    @register_device("test-rram")
    class TestRram(DeviceParamsBase):
        model: Literal["test-rram"] = "test-rram"
        on_off_ratio: float = Field(10.0, gt=1, description="assumed")

    assert "test-rram" in device_models()
    data = _aon_data()
    data["device"] = {"model": "test-rram", "g_max_us": 50.0}
    target = load_target(str(_write(tmp_path, data)))
    assert isinstance(target.device, TestRram) and target.device.g_max_us == 50.0
    assert "test-rram" in str(target_json_schema()["properties"]["device"])


# ------------------------------------------------------------------------------------------ derived targets
def test_base_merges_and_names_the_file(tmp_path):
    path = tmp_path / "my-chip.yaml"
    path.write_text("base: aon-cim\nconverters:\n  adc_bits: 6\ndevice:\n  g_max_us: 20.0\n")
    t = load_target(str(path))
    aon = load_target("aon-cim")
    assert t.name == "my-chip"  # never the base's name
    assert t.converters.adc_bits == 6 and t.converters.dac_bits == aon.converters.dac_bits
    assert t.device.g_max_us == 20.0 and t.device.model == aon.device.model
    assert t.array == aon.array and t.clock_hz == aon.clock_hz
    # A file deriving from a file (relative path), with its own name.
    child = tmp_path / "child.yaml"
    child.write_text("base: my-chip.yaml\nname: chip-b\nclock_hz: 5.0e+7\n")
    c = load_target(str(child))
    assert c.name == "chip-b" and c.converters.adc_bits == 6 and c.clock_hz == 5e7
    # Another device model replaces the device section instead of mixing parameter sets.
    other = tmp_path / "exact.yaml"
    other.write_text("base: aon-cim\ndevice:\n  model: ideal\n")
    assert load_target(str(other)).device.model == "ideal"


def test_base_errors_are_target_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: aon-cim\nconverters:\n  adc_bits: -3\n")
    with pytest.raises(TargetError, match=r"bad.yaml: converters.adc_bits"):
        load_target(str(bad))
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(TargetError, match="derives from itself"):
        load_target(str(loop))
    unknown = tmp_path / "u.yaml"
    unknown.write_text("base: no-such-preset\n")
    with pytest.raises(TargetError, match="unknown target 'no-such-preset'"):
        load_target(str(unknown))


def test_targets_show_keeps_preset_comments(run_cli, tmp_path):
    res = run_cli("targets", "show", "aon-cim")
    assert res.code == 0 and "# HARDWARE.md" in res.out and "assumed" in res.out
    assert yaml.safe_load(res.out)["name"] == "aon-cim"
    path = tmp_path / "mine.yaml"
    path.write_text("base: hermes\nconverters:\n  dac_bits: 4\n")
    res = run_cli("targets", "show", path)
    shown = yaml.safe_load(res.out)
    assert res.code == 0 and shown["name"] == "mine" and shown["converters"]["dac_bits"] == 4


# ------------------------------------------------------------------------------------------ issue 22: hostile targets
@pytest.mark.parametrize(("section", "field", "value", "message"), [
    ("converters", "adc_bits", 1, (r"converters\.adc_bits: Input should be greater than or equal to 2; a converter "
                                   r"has 2 to 16 bits, or 0 / null for no quantisation")),
    ("converters", "dac_bits", 1, r"converters\.dac_bits: Input should be greater than or equal to 2"),
    ("converters", "output_noise", 1e308, r"converters\.output_noise: Input should be less than or equal to 100"),
    ("converters", "adc_energy_ref_j", float("inf"), r"converters\.adc_energy_ref_j: Input should be a finite number"),
    ("converters", "adc_time_ref_s", float("nan"), r"converters\.adc_time_ref_s: Input should be a finite number"),
    ("device", "drift_scale", 1e6, r"device\.drift_scale: 1000000\.0 is outside 0\.\.10"),
    ("device", "drift_nu_mean_range", [0.2, 0.1], r"device\.drift_nu_mean_range: .*give the range as \[low, high\]"),
    (None, "clock_hz", 1e-300, r"clock_hz: Input should be greater than or equal to 1000"),
])
def test_values_the_models_cannot_compute_are_refused(tmp_path, section, field, value, message):
    data = {"base": "aon-cim", **({section: {field: value}} if section else {field: value})}
    with pytest.raises(TargetError, match=r"^chip\.yaml: " + message):
        load_target(str(_write(tmp_path, data)))


def test_misspelt_section_lists_the_valid_fields(tmp_path):
    with pytest.raises(TargetError, match=r"^chip\.yaml: converter: unknown field; did you mean 'converters'\? valid "
                                          r"fields at the top level: name, description, array, device, converters"):
        load_target(str(_write(tmp_path, {"base": "aon-cim", "converter": {"adc_bits": 6}})))
    with pytest.raises(TargetError, match=r"device\.drift_scal: unknown field; did you mean 'drift_scale'\?"):
        load_target(str(_write(tmp_path, {"base": "aon-cim", "device": {"drift_scal": 2}})))
    with pytest.raises(TargetError, match=r"converters\.adc_bit: unknown field; did you mean 'adc_bits'\?"):
        load_target(str(_write(tmp_path, {"base": "aon-cim", "converters": {"adc_bit": 6}})))


def test_target_schema_fuzz_bounded(tmp_path):
    """A bounded slice of ``benchmarks/fuzz_targets.py``: hostile target files end refused in one line or run
    compile + simulate + export without a traceback and without NaN in any report."""
    from hypothesis import HealthCheck, Phase, given, settings

    from benchmarks.fuzz_targets import FAILURES, run_case, target_overrides

    outcomes = []

    @settings(max_examples=12, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(target_overrides())
    def check(drawn):
        case = run_case(tmp_path, *drawn)
        outcomes.append(case.outcome)
        assert case.outcome not in FAILURES, (case.base, case.overrides, case.detail)

    check()
    assert len(outcomes) == 12 and {"ok", "refused"} <= set(outcomes)
