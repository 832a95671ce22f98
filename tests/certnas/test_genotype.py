"""Genotypes: derived by the DARTS rule, round-trip through JSON, validated."""
import pytest
import torch

from certnas.config import ConfigError, from_dict, parse_eps
from certnas.search import SearchConfig
from certnas.space.genotype import NAMED, Genotype, GenotypeError, derive_cell
from certnas.space.ops import PRIMITIVES


def test_derive_keeps_two_strongest_non_none_edges_per_node():
    weights = torch.full((5, len(PRIMITIVES)), 0.01)
    index = {name: k for k, name in enumerate(PRIMITIVES)}
    weights[0, index["none"]] = 0.99          # node 0, input 0: only `none` is strong -> weakest real op
    weights[0, index["max_pool_3x3"]] = 0.02
    weights[1, index["sep_conv_3x3"]] = 0.5   # node 0, input 1
    weights[2, index["skip_connect"]] = 0.3   # node 1, input 0
    weights[3, index["dil_conv_5x5"]] = 0.2   # node 1, input 1
    weights[4, index["avg_pool_3x3"]] = 0.6   # node 1, input 2
    cell = derive_cell(weights, steps=2)
    assert cell == (("max_pool_3x3", 0), ("sep_conv_3x3", 1), ("skip_connect", 0), ("avg_pool_3x3", 2))


def test_edge_normalisation_weights_change_the_ranking():
    weights = torch.full((5, len(PRIMITIVES)), 0.01)
    weights[2:5, 4] = torch.tensor([0.3, 0.2, 0.1])  # node 1's inputs 0, 1, 2
    assert [source for _, source in derive_cell(weights, 2)[2:]] == [0, 1]
    scaled = derive_cell(weights, 2, edge_weights=torch.tensor([1.0, 1.0, 0.1, 1.0, 1.0]))
    assert [source for _, source in scaled[2:]] == [1, 2]


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_genotypes_round_trip_through_json(name):
    genotype = NAMED[name]
    assert Genotype.from_json(genotype.to_json()) == genotype


@pytest.mark.parametrize("data,message", [
    ({"normal": [["conv_7x7", 0], ["skip_connect", 1]], "normal_concat": [2], "reduce": [], "reduce_concat": []}, "unknown operation"),
    ({"normal": [["skip_connect", 3], ["skip_connect", 1]], "normal_concat": [2], "reduce": [], "reduce_concat": []}, "does not exist"),
    ({"normal": []}, "expected keys")])
def test_invalid_genotypes_are_refused(data, message):
    with pytest.raises(GenotypeError, match=message):
        Genotype.from_dict(data)


@pytest.mark.parametrize("text,value", [("2/255", 2 / 255), ("0.01", 0.01), (" 8 / 255 ", 8 / 255), (0.3, 0.3), ("0", 0.0)])
def test_eps_parser_accepts_fractions_and_numbers(text, value):
    assert parse_eps(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["2/0", "abc", "-0.1", "nan", "inf", "__import__('os')"])
def test_eps_parser_refuses_bad_values(text):
    with pytest.raises(ConfigError):
        parse_eps(text)


def test_unknown_setting_suggests_the_close_match():
    with pytest.raises(ConfigError, match="did you mean 'gamma'"):
        from_dict(SearchConfig, {"gama": 0.1})
    assert from_dict(SearchConfig, {"gamma": 0.1}).gamma == 0.1
