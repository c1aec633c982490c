"""The one loader behind job configs and sweep files (align_rl.loader): dotted keys, layering,
typed apply into nested and named sections, registry-backed choices, and the typed sweep spec."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

import align_rl.diffusion.guidance as guidance
from align_rl.config import Config, load_config, merge_overrides, with_values
from align_rl.errors import ConfigError
from align_rl.loader import apply, merge, nest, parse_overrides, registry, set_dotted
from align_rl.tune.spec import Dimension, SweepSpec, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[1]


def _spec(**kw) -> dict:
    d = {"name": "t", "search": {"dpo.beta": {"grid": [1000, 8000]}}, "metric": "val_mse"}
    d.update(kw)
    return d


# ----------------------------------------------------------------------------- dotted keys, layers


def test_dotted_keys_nest_and_refuse_to_go_below_a_value():
    assert parse_overrides(["dpo.beta=8000", "dpo.lr=1e-5", "guidance.methods=[dps]"]) == {
        "dpo": {"beta": 8000, "lr": 1e-5}, "guidance": {"methods": ["dps"]}}
    assert nest({"dpo.beta": 1, "dpo": {"lr": 2}}) == {"dpo": {"beta": 1, "lr": 2}}
    tree = {"dpo": {"beta": 1}}
    with pytest.raises(ConfigError, match="dpo.beta.x"):
        set_dotted(tree, "dpo.beta.x", 2)
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["dpo.beta"])


def test_layers_merge_sections_but_replace_mapping_fields():
    a = {"dpo": {"beta": 1.0, "lr": 1e-5}, "rewards": {"weights": {"assim": 1, "forecast": 1, "phys": 1}}}
    b = {"dpo.beta": 2.0, "rewards": {"weights": {"assim": 1}}}
    out = merge_overrides(a, b)
    assert out == {"dpo": {"beta": 2.0, "lr": 1e-5}, "rewards": {"weights": {"assim": 1}}}
    assert merge({"x": {"y": {"p": 1}}}, {"x": {"y": {"q": 2}}}) == {"x": {"y": {"p": 1, "q": 2}}}


def test_with_values_is_a_validated_copy():
    base = load_config()
    cfg = with_values(base, {"dpo.beta": 10.0, "rewards.weights": {"assim": 1.0, "forecast": 0.0, "phys": 0.0}})
    assert cfg.dpo.beta == 10.0 and cfg.rewards.weights == {"assim": 1.0, "forecast": 0.0, "phys": 0.0}
    assert base.dpo.beta != 10.0 and base.rewards.weights["forecast"] == 1.0
    with pytest.raises(ConfigError, match=r"unknown config key 'dpo\.betta'"):
        with_values(base, {"dpo.betta": 1})
    with pytest.raises(ConfigError, match=r"dpo\.beta=-1\.0 must be a finite number > 0"):
        with_values(base.to_dict(), {"dpo.beta": -1})


# ----------------------------------------------------------------------------- typed apply


@dataclasses.dataclass
class _Inner:
    a: int = 1
    b: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Outer:
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    named: dict[str, _Inner] = dataclasses.field(default_factory=dict)
    derived: int = dataclasses.field(default=0, init=False)


def test_apply_coerces_into_sections_and_named_sections():
    o = _Outer()
    apply(o, {"inner": {"a": 2.0, "b": "x"}, "named": {"p": {"a": 3}}}, what="test")
    assert o.inner == _Inner(2, ["x"]) and o.named == {"p": _Inner(3, [])}
    with pytest.raises(ConfigError, match=r"unknown test key 'named\.p\.c'; valid keys here: a, b"):
        apply(_Outer(), {"named": {"p": {"c": 1}}}, what="test")
    with pytest.raises(ConfigError, match=r"named\.p must be a mapping with keys among a, b"):
        apply(_Outer(), {"named": {"p": 5}}, what="test")
    with pytest.raises(ConfigError, match=r"inner\.a must be an integer, got 1\.5"):
        apply(_Outer(), {"inner": {"a": 1.5}})
    with pytest.raises(ConfigError, match="unknown config key 'derived'"):  # derived fields are not read
        apply(_Outer(), {"derived": 1})


# ----------------------------------------------------------------------------- registries


def test_config_choices_follow_the_registries(monkeypatch):
    with pytest.raises(ConfigError, match=r"guidance\.methods\[0\]='ensrf' must be one of obsfree, repaint, dps "
                                          r"\(align_rl\.diffusion\.guidance\.METHODS\)"):
        load_config(overrides=["guidance.methods=[ensrf]"])
    with pytest.raises(ConfigError, match=r"pairs\.mode='Q' must be one of M, P \(align_rl\.alignment\.pairs\.MODES\)"):
        load_config(overrides=["pairs.mode=Q"])
    with pytest.raises(ConfigError, match=r"pairs\.guidance='ensrf' .*align_rl\.diffusion\.guidance\.METHODS"):
        load_config(overrides=["pairs.guidance=ensrf"])
    with pytest.raises(ConfigError, match=r"forecaster\.kind='fengwu' must be one of emulator, onnx, torch "
                                          r"\(align_rl\.models\.loading\.KINDS\)"):
        load_config(overrides=["forecaster.kind=fengwu"])
    ensrf = guidance.GuidanceMethod("ensrf", "EnSRF", lambda codec, obs, g, **kw: None)
    monkeypatch.setitem(guidance.METHODS, "ensrf", ensrf)
    cfg = load_config(overrides=["guidance.methods=[ensrf]", "pairs.guidance=ensrf"])
    assert cfg.guidance.methods == ["ensrf"] and cfg.pairs.guidance == "ensrf"
    from align_rl.models import loading

    monkeypatch.setitem(loading.KINDS, "fengwu", loading.ForecasterKind("fengwu", lambda s, d: None))
    with pytest.raises(ConfigError, match="forecaster.kind=fengwu needs forecaster.path"):
        load_config(overrides=["forecaster.kind=fengwu"])
    assert load_config(overrides=["forecaster.kind=fengwu", "forecaster.path=x"]).forecaster.kind == "fengwu"


def test_a_registry_rule_reads_the_registry_when_it_checks():
    import align_rl.alignment.rewards as rewards

    rule = registry("align_rl.alignment.rewards", "REWARDS")
    assert rule.check("k", "assim") is None
    assert "t850_bias" in rule.check("k", "t850_bias")
    try:
        rewards.register_reward("t850_bias")(lambda ctx: None)
        assert rule.check("k", "t850_bias") is None
    finally:
        rewards.REWARDS.pop("t850_bias", None)


def test_sweep_validation_method_is_checked_against_the_guidance_registry(monkeypatch):
    with pytest.raises(ConfigError, match=r"x\.yaml: validation\.method='ensrf' must be one of obsfree, "
                                          r"repaint, dps \(align_rl\.diffusion\.guidance\.METHODS\)"):
        parse_spec(_spec(validation={"method": "ensrf"}), "x.yaml")
    monkeypatch.setitem(guidance.METHODS, "ensrf", guidance.GuidanceMethod("ensrf", "EnSRF", lambda *a, **k: None))
    assert parse_spec(_spec(validation={"method": "ensrf"}), "x.yaml").validation.method == "ensrf"


# ----------------------------------------------------------------------------- the typed sweep spec


def test_sweep_spec_is_typed_and_its_shorthands_are_read():
    s = parse_spec(_spec(search={"dpo.beta": [1000, 2000], "dpo.lr": {"loguniform": [1e-6, 1e-4]}},
                         scheduler={"type": "asha", "grace_period": 2}, stages=3, max_concurrent_trials=0,
                         base={"dpo.steps": 30, "dpo": {"lr": 2e-5}}, question="  why?  "), "x.yaml")
    assert isinstance(s, SweepSpec) and all(isinstance(d, Dimension) for d in s.search.values())
    assert s.search["dpo.beta"].kind == "grid" and s.search["dpo.beta"].values == [1000, 2000]
    assert s.search["dpo.lr"].bounds == (1e-6, 1e-4) and s.search["dpo.lr"].values is None
    assert s.scheduler == "asha" and s.asha.given() == {"grace_period": 2}
    assert s.max_concurrent_trials is None and s.question == "why?"
    assert s.base == {"dpo": {"steps": 30, "lr": 2e-5}}
    assert s.resources_per_trial.cpu == 0.0 and s.resources_per_trial.given() == {"cpu": 0.0, "gpu": 0.0}
    assert parse_spec(_spec(scheduler=None), "x.yaml").scheduler == "fifo"
    assert parse_spec(_spec(scheduler="FIFO"), "x.yaml").scheduler == "fifo"


def test_spec_yaml_round_trips():
    for path in sorted((REPO / "tune_configs").glob("*.yaml")):
        s = load_spec(path)
        d = s.to_dict()
        assert list(d)[-1] == "search" and set(d) == {f.name for f in dataclasses.fields(SweepSpec) if f.init}
        again = parse_spec(yaml.safe_load(yaml.safe_dump(d, sort_keys=False)), str(path))
        assert again.to_dict() == d


def test_sweep_files_are_read_as_yaml_1_2(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("name: s\nsearch:\n  dpo.lr: {grid: [1e-5, 3e-5]}\n")
    assert load_spec(p).search["dpo.lr"].values == [1e-5, 3e-5]


def test_every_config_section_can_be_a_sweep_override_target():
    from align_rl.tune.spec import split_overrides

    items = [f"{f.name}.x=1" for f in dataclasses.fields(Config)]
    cfg_items, spec_ov = split_overrides(items)
    assert cfg_items == items and spec_ov == {}
