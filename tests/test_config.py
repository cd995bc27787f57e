"""diralign.config and diralign.options: composed, typed, self-describing settings."""

import dataclasses

import pytest

from diralign.config import (
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    describe,
    format_description,
    parse_overrides,
)
from diralign.errors import UserError
from diralign.experiments import EXPERIMENTS
from diralign.options import section_of


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_every_key_has_a_section_type_and_meaning(name):
    experiment = EXPERIMENTS[name]()
    rows = describe(experiment.Config, experiment.name)
    assert {r["key"] for r in rows} == {f.name for f in dataclasses.fields(experiment.Config)}
    for row in rows:
        assert row["help"].strip(), f"{name}: {row['key']} has no meaning"
        assert row["type"] and row["section"]
    sections = [r["section"].split(":")[0] for r in rows]
    # Grouped: runtime first, the experiment's own last, each section contiguous.
    assert sections[0] == "runtime" and sections[-1] in (experiment.name, "logging")
    seen = []
    for s in [r["section"] for r in rows]:
        if not seen or seen[-1] != s:
            assert s not in seen, f"section {s} split in two"
            seen.append(s)
    text = format_description(rows)
    assert "[dynamics: flow]" in text and "[goals]" in text


def test_sections_belong_to_the_part_that_reads_them():
    config_cls = EXPERIMENTS["margins"]().Config
    assert section_of(config_cls, "rtol") == "dynamics: flow"
    assert section_of(config_cls, "batch_size") == "dynamics: sgd"
    # Redeclared with another default, a key stays in its owner's section with its meaning.
    assert section_of(config_cls, "dynamics") == "dynamics"
    assert config_cls().dynamics == "sgd" and TrainConfig().dynamics == "flow"
    assert section_of(config_cls, "subset", default="margins") == "margins"


def test_unknown_keys_suggest_close_matches():
    margins = EXPERIMENTS["margins"]().Config
    with pytest.raises(UserError, match=r"did you mean 'batch_size'\?"):
        parse_overrides(margins, ["bath_size=5"])
    with pytest.raises(UserError, match="diralign config"):
        parse_overrides(margins, ["qqqq=5"])


@pytest.mark.parametrize(
    "pair, fragment",
    [
        ("rtol=2", "rtol"),
        ("integrator=rk4", "integrator"),
        ("dynamics=adam", "unknown dynamics"),
        ("eta=-1", "eta"),
        ("eta_growth=0.5", "eta_growth"),
        ("batch_size=0", "batch_size"),
        ("accept_window=0", "accept_window"),
        ("cvode_jacobian=exact", "cvode_jacobian"),
        ("dtype=float16", "dtype"),
        ("loss=hinge", "loss"),
        ("target_ln_n_over_L=inf", "finite"),
        ("target_ln_n_over_L=1e400", "finite"),
        ("max_wall_seconds=-3", "max_wall_seconds"),
        ("threads=-1", "threads"),
        ("max_steps=1.5", "expected int"),
    ],
)
def test_values_are_validated_once_by_their_owner(pair, fragment):
    with pytest.raises(UserError, match=fragment):
        apply_overrides(TrainConfig(), [pair])


def test_round_trip_through_json_and_type_checks():
    config = apply_overrides(EXPERIMENTS["deep-linear"]().Config(), ["widths=4,5", "rtol=1e-8", "seed=3"])
    data = config_to_dict(config)
    assert data["widths"] == [4, 5]
    assert config_from_dict(type(config), data) == config
    with pytest.raises(UserError, match="seed"):
        config_from_dict(type(config), {**data, "seed": "three"})
    with pytest.raises(UserError, match="unknown key"):
        config_from_dict(type(config), {**data, "colour": 1})
    with pytest.raises(UserError, match="not an object"):
        config_from_dict(type(config), [1, 2])
