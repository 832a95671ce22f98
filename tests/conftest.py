"""Heavy cases of parametrised tests, marked ``slow``: ``make test`` leaves them out (it stays under 15
minutes on 2 cores) and CI runs them (``make test-all``). Whole slow tests carry the marker themselves."""
import pytest

SLOW_CASES = (
    # alpha-CROWN on the mixed operation (all eight operations at once): 17-34 s per case
    "test_soundness.py::test_bounds_contain_every_sampled_and_attacked_output[mixed-1-alpha-crown",
    "test_soundness.py::test_bounds_contain_every_sampled_and_attacked_output[mixed-2-alpha-crown",
    "test_patches.py::test_patches_mode_bounds_contain_every_sampled_and_attacked_output[mixed-alpha-crown]",
    "test_bounds_api.py::test_cached_wrapper_sees_updated_architecture_weights[alpha-crown]",
    # the partial-channel supernet (the plain one stays in the quick run): about 30 s per method
    "test_supernet.py::test_supernet_bounds_are_sound_for_every_method[pc-darts-",
    "test_verify_run.py::test_certified_accuracy_is_at_most_pgd_accuracy_at_most_clean[methods1]",
    # alpha-CROWN on the cell network in L2 (the L-inf case stays): about 28 s
    "test_cells.py::test_alpha_crown_is_sound_and_never_looser_than_crown[l2]",
    # shard merging with radii (the cascade case stays): about 25 s
    "test_verify_run.py::test_shards_merge_into_the_files_of_one_run[methods1",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(case in item.nodeid for case in SLOW_CASES):
            item.add_marker(pytest.mark.slow)
