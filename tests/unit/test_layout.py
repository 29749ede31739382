"""Layer split over pipeline stages and layout validation: the arithmetic, and errors that show it."""
import pytest

from megatron_r1.config import ConfigError, ParallelConfig, load_config
from megatron_r1.parallel.mesh import stage_layer_counts, validate_layout
from megatron_r1.engine.runtime import chunk_layers


def test_671b_uneven_last_stage():
    assert stage_layer_counts(61, 16, 1, None, 1) == [4] * 15 + [1]
    assert stage_layer_counts(61, 16, 1, 3, 2) == [3] + [4] * 14 + [2]
    cfg = load_config("examples/r1_zero_671b.yaml")
    assert validate_layout(512, cfg.parallel, cfg.model) == 512 // (cfg.parallel.pp * cfg.parallel.cp * cfg.parallel.tp)


def test_even_and_interleaved():
    assert stage_layer_counts(8, 4) == [2, 2, 2, 2]
    assert chunk_layers(8, 2, 2, 1) == [[2, 3], [6, 7]]  # Megatron's interleaving: chunk j = v·pp + p
    assert chunk_layers(4, 2, 1, 0, 3) == [[0, 1, 2]] and chunk_layers(4, 2, 1, 1, 3) == [[3]]


@pytest.mark.parametrize("args,needle", [
    ((61, 16), "cannot be split over pp=16"),
    ((61, 16, 1, 3, 3), "the other 14 stage(s) must share 55 layers evenly"),
    ((8, 2, 2, 3), "need parallel.vpp = 1"),
    ((4, 1, 1, 2), "need parallel.pp > 1"),
])
def test_split_errors(args, needle):
    with pytest.raises(ConfigError) as e:
        stage_layer_counts(*args)
    assert needle in str(e.value)


def test_layout_errors_show_the_arithmetic():
    m = load_config("tiny-moe").model
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by tp·cp·pp = 2·1·2 = 4"):
        validate_layout(6, ParallelConfig(tp=2, pp=2), m)
    with pytest.raises(ConfigError, match=r"parallel.ep=3 does not divide"):
        validate_layout(6, ParallelConfig(ep=3), m)
    with pytest.raises(ConfigError, match=r"parallel.tp=8 does not divide num_attention_heads=4"):
        validate_layout(8, ParallelConfig(tp=8), m)
