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


def test_a_search_without_a_reduction_cell_leaves_the_reduce_cell_unsearched(tmp_path):
    """A 2-cell supernet has no reduction cell: its genotype says so (reduce null) instead of reporting the argmax
    of untouched initial weights, and a network that needs a reduction cell is refused in one line."""
    import json
    from click.testing import CliRunner
    from certnas.cli import main
    from certnas.space.network import DartsNetwork
    from certnas.space.supernet import SearchNetwork
    two = SearchNetwork(C=4, num_classes=10, layers=2, in_channels=1, steps=4, multiplier=4, mean=(0.13,), std=(0.31,))
    genotype = two.genotype()
    assert genotype.reduce is None and genotype.to_dict()["reduce"] is None
    assert Genotype.from_json(genotype.to_json()) == genotype
    three = SearchNetwork(C=4, num_classes=10, layers=3, in_channels=1, steps=4, multiplier=4, mean=(0.13,), std=(0.31,))
    assert three.genotype().reduce is not None
    # a record written before: a reduce list beside searched_cells ["normal"] is not a searched cell
    record = {**three.genotype().to_dict(), "searched_cells": ["normal"]}
    assert Genotype.from_dict(record).reduce is None
    assert Genotype.from_dict({**record, "searched_cells": ["normal", "reduce"]}).reduce == three.genotype().reduce
    DartsNetwork(genotype, 4, 10, 2, 1, (0.13,), (0.31,))  # two cells need no reduction cell
    with pytest.raises(GenotypeError, match="no searched reduction cell .* has one at cells 1, 2: train with --layers 2"):
        DartsNetwork(genotype, 4, 10, 3, 1, (0.13,), (0.31,))
    path = tmp_path / "genotype.json"
    path.write_text(json.dumps(record))
    result = CliRunner().invoke(main, ["-q", "train", "--genotype", str(path), "--layers", "3", "--stem", "cifar", "--epochs", "1",
                                       "--train-limit", "32", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "no searched reduction cell" in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1
