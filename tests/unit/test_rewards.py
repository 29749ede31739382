"""Rule-based rewards: extraction, equivalence tiers, the time bound, format, language, registry."""

import logging
import time

import pytest

from megatron_r1.rl.rewards import (
    RewardCombiner,
    SymbolicVerifier,
    accuracy_reward,
    accuracy_reward_batch,
    extract_answer,
    format_reward,
    get_reward,
    language_reward,
    list_rewards,
    register_reward,
)
from megatron_r1.rl.rewards.accuracy import fast_match, last_boxed


@pytest.fixture(scope="module")
def verifier():
    # 3 workers: the batch test runs both bombs and the real checks side by side.
    with SymbolicVerifier(num_workers=3, timeout=2.0) as v:
        yield v


def r1z(answer: str, think: str = "some reasoning") -> str:
    return f"<think>{think}</think> <answer>{answer}</answer>"


# ---------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "response, expected",
    [
        (r1z("42"), "42"),
        (r1z(r"so \boxed{\frac{1}{2}} it is"), r"\frac{1}{2}"),
        (r"First \boxed{1}, then finally \boxed{\frac{\sqrt{3}}{2}}.", r"\frac{\sqrt{3}}{2}"),
        (r"\boxed{\{1, \{2\}\}}", r"\{1, \{2\}\}"),
        (r"\fbox{7}", "7"),
        (r"so \boxed 5$", "5"),
        ("<answer>1</answer> wait <answer>2</answer>", "2"),  # the last answer counts
        (r"truncated \boxed{\frac{1}{2", None),
        ("<answer>unclosed 3", None),
        ("no answer at all", None),
    ],
)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


def test_last_boxed_nested_braces():
    assert last_boxed(r"\boxed{a_{b_{c}}} and \boxed{x^{2^{3}}}") == "x^{2^{3}}"


# ---------------------------------------------------------------- accuracy


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("42", "42"),
        ("0.5", "1/2"),
        ("0.5", r"\frac{1}{2}"),
        (r"\dfrac{1}{2}", "1/2"),
        ("1,000", "1000"),
        ("-0.25", r"-\frac14"),
        (r"$50\%$", "50"),
        ("x = 3", "3"),
        (r"\text{(B)}", "(B)"),
    ],
)
def test_fast_path_equivalences(pred, gold):
    assert fast_match(pred, gold) is True


def test_fast_path_rejects_different_numbers_without_sympy():
    assert fast_match("0.333", r"\frac{1}{3}") is False
    assert fast_match("3", "4") is False
    assert fast_match(r"\sqrt{2}", "1.4142") is None  # only sympy can tell


@pytest.mark.parametrize(
    "pred, gold, expected",
    [
        (r"\frac{\sqrt{8}}{2}", r"\sqrt{2}", 1.0),
        ("(x+1)^2", "x^2+2x+1", 1.0),
        (r"2\pi", r"\pi \cdot 2", 1.0),
        (r"\sqrt{3}", r"\sqrt{2}", 0.0),
        ("x^2", "x^3", 0.0),
    ],
)
def test_accuracy_symbolic(verifier, pred, gold, expected):
    assert accuracy_reward(r1z(pred), gold, verifier=verifier) == expected


@pytest.mark.parametrize(
    "pred, gold, expected",
    [
        # math-verify alone scores these 1: it compares numbers after rounding ...
        (r"\frac{1}{2^{99}}", r"\frac{1}{2^{98}}", 0.0),
        (r"\frac{1}{2004!}", r"\frac{1}{2006!}", 0.0),
        # ... and reads "4\sqrt(2)" as "4"
        (r"4\sqrt(2)", "4", 0.0),
        (r"4\sqrt(2)", r"\sqrt{32}", 1.0),
        (r"\frac{1}{2^{99}}", r"2^{-99}", 1.0),
        (r"\frac{1}{2006!}", r"\frac{1}{2006 \cdot 2005 \cdot 2004!}", 1.0),
    ],
)
def test_exact_values_compare_exactly(verifier, pred, gold, expected):
    assert accuracy_reward(r1z(pred), gold, verifier=verifier) == expected


def test_accuracy_boxed_reference_and_missing_answer(verifier):
    assert accuracy_reward(r1z("7"), r"The answer is $\boxed{7}$.", verifier=verifier) == 1.0
    assert accuracy_reward("<think>7</think> I think 7", "7", verifier=verifier) == 0.0
    assert accuracy_reward(r1z(""), "7", verifier=verifier) == 0.0
    assert accuracy_reward(r1z("7"), "8", symbolic=False) == 0.0


def test_parse_bomb_scores_zero_within_time_bound(verifier, caplog):
    timeouts = verifier.stats["timeouts"]
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        score = accuracy_reward(r1z("9^{9^{9^{9}}}"), "3", verifier=verifier)
    elapsed = time.monotonic() - start
    assert score == 0.0
    assert elapsed < 10.0, elapsed
    assert verifier.stats["timeouts"] == timeouts + 1
    assert "timeout" in caplog.text
    # the killed worker was replaced: the verifier still answers
    assert accuracy_reward(r1z(r"\sqrt{4}"), "2", verifier=verifier) == 1.0


def test_batch_with_bombs_stays_bounded(verifier):
    responses = [
        r1z("(10^{10^{10}})!"),
        r1z(r"\frac{\sqrt{8}}{2}"),
        r1z("9^{9^{9^{9}}}"),
        r1z("0.5"),
        "no answer",
        r1z(r"\sqrt{5}"),
    ]
    references = ["1", r"\sqrt{2}", "2", r"\frac{1}{2}", "1", r"\sqrt{2}"]
    start = time.monotonic()
    scores = accuracy_reward_batch(responses, references, verifier=verifier, batch_timeout=8.0)
    assert time.monotonic() - start < 10.0
    assert scores == [0.0, 1.0, 0.0, 1.0, 0.0, 0.0]


# ---------------------------------------------------------------- format


@pytest.mark.parametrize(
    "response, expected",
    [
        ("<think>reason</think><answer>5</answer>", 1.0),
        ("  <think>\nreason\n</think>\n\n<answer> 5 </answer>\n", 1.0),
        ("<think>reason</think> <answer>5</answer> trailing", 0.0),
        ("preamble <think>reason</think> <answer>5</answer>", 0.0),
        ("<answer>5</answer> <think>reason</think>", 0.0),
        ("<think>a</think> <think>b</think> <answer>5</answer>", 0.0),
        ("<think>a <answer>4</answer></think> <answer>5</answer>", 0.0),
        ("<think>reason</think>", 0.0),
        ("<think>reason <answer>5</answer>", 0.0),
        ("", 0.0),
    ],
)
def test_format_r1_zero(response, expected):
    assert format_reward(response) == expected


def test_format_prefilled_think_and_r1_variant():
    assert format_reward("reason</think> <answer>5</answer>", prefilled_think=True) == 1.0
    assert format_reward("<think>reason</think> <answer>5</answer>", prefilled_think=True) == 0.0
    assert format_reward("<think>reason</think>\nThe answer is \\boxed{5}.", variant="r1") == 1.0
    assert format_reward("<think>reason</think>   ", variant="r1") == 0.0
    assert format_reward("hi <think>reason</think> 5", variant="r1") == 0.0
    assert format_reward("reason</think> 5", variant="r1", prefilled_think=True) == 1.0
    with pytest.raises(ValueError, match="variant"):
        format_reward("x", variant="r2")


def test_format_r1_boxed_is_what_r1_chat_asks_for():
    assert format_reward("<think>reason</think>\nSo the answer is $\\boxed{5}$.", variant="r1_boxed") == 1.0
    assert format_reward("<think>reason</think>\nSo the answer is 5.", variant="r1_boxed") == 0.0
    assert format_reward("<think>reason \\boxed{5}</think>\nSo 5.", variant="r1_boxed") == 0.0  # box in the thought only
    assert format_reward("<think>reason</think> \\boxed{5", variant="r1_boxed") == 0.0  # never closed
    assert format_reward("<think>reason</think> <answer>5</answer>", variant="r1_boxed") == 0.0


# ---------------------------------------------------------------- language


def test_language_consistency():
    assert language_reward("<think>Let me add these numbers.</think> <answer>5</answer>") == 1.0
    # words: Let, me, 计, 算, this -> 3 Latin of 5
    mixed = "<think>Let me 计算 this: 2+3=5</think> <answer>5</answer>"
    assert language_reward(mixed, lang="en") == pytest.approx(3 / 5)
    assert language_reward(mixed, lang="zh") == pytest.approx(2 / 5)
    assert language_reward("<think>1+1=2</think>") == 0.0  # no words: no bonus
    assert language_reward("<think>unclosed thought 很") == pytest.approx(2 / 3)
    assert language_reward("no think tags here") == 1.0  # falls back to the whole response
    assert language_reward("<think>Café déjà</think>") == 0.0  # accented Latin is not English


@pytest.mark.parametrize(
    "thought",
    [
        "Nous calculons la somme des deux nombres. La somme est donc sept.",  # no accent at all
        "Wir addieren die zwei Zahlen und das Ergebnis ist sieben.",
        "Sumamos los dos numeros y el resultado es siete.",
        "Sommiamo i due numeri e il risultato che otteniamo è sette.",
    ],
)
def test_language_other_latin_script_languages_are_not_english(thought):
    assert language_reward(f"<think>{thought}</think>", lang="en") == 0.0


def test_language_mixing_within_latin_script_is_measured():
    # 10 English words, then a 7-word French sentence
    mixed = "<think>We add the two numbers. So the sum is seven. Nous calculons la somme des deux nombres.</think>"
    assert language_reward(mixed, lang="en") == pytest.approx(10 / 17)


def test_language_math_symbols_are_not_words():
    assert language_reward("<think>The area is π r^2, so with r = 2 it is 4π.</think>") == 1.0
    assert language_reward("<think>For x ∈ ℝ, let θ = π/2 and 𝑥 = 2; then sin θ = 1.</think>") == 1.0
    # a Greek *word* is still another language: 2 English words of 5
    assert language_reward("<think>We add. Αυτό είναι το.</think>") == pytest.approx(2 / 5)


# ---------------------------------------------------------------- registry + combiner


def test_registry():
    assert {"accuracy", "format", "language"} <= set(list_rewards())
    assert get_reward("format") is format_reward
    with pytest.raises(KeyError, match="unknown reward 'nope'"):
        get_reward("nope")

    @register_reward("test_length")
    def length_reward(response, reference, scale=1.0):
        return scale * len(response)

    assert get_reward("test_length")("abc", "", scale=2.0) == 6.0
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_length")(lambda r, g: 0.0)


def test_combiner_weights_and_components(verifier):
    combiner = RewardCombiner({
        "accuracy": {"weight": 1.0, "verifier": verifier},
        "format": 0.5,
        "language": {"weight": 0.1, "lang": "en"},
    })
    responses = [
        "<think>two plus two</think> <answer>4</answer>",  # right, formatted, English
        "<think>两个加两个</think> <answer>5</answer>",  # wrong, formatted, Chinese
        r"so \boxed{\frac{8}{2}}",  # right, unformatted, no think -> whole response
    ]
    out = combiner(responses, ["4", "4", "4"])
    assert out.components["accuracy"] == [1.0, 0.0, 1.0]
    assert out.components["format"] == [1.0, 1.0, 0.0]
    assert out.components["language"] == [1.0, 0.0, 1.0]
    assert out.total == pytest.approx([1.6, 0.5, 1.1])
    assert out.metrics()["reward/total"] == pytest.approx((1.6 + 0.5 + 1.1) / 3)
    assert not out.errors


def test_combiner_survives_a_raising_reward():
    @register_reward("test_flaky")
    def flaky(response, reference):
        if response == "boom":
            raise RuntimeError("bad sample")
        return 1.0

    out = RewardCombiner({"test_flaky": 2.0})(["ok", "boom"], ["", ""])
    assert out.total == [2.0, 0.0]
    assert out.errors == {"test_flaky": 1}


def test_combiner_config_errors():
    with pytest.raises(KeyError, match="unknown reward"):
        RewardCombiner({"acuracy": 1.0})
    with pytest.raises(ValueError, match="'weight'"):
        RewardCombiner({"language": {"lang": "en"}})


def test_default_verifier_is_made_on_first_use():
    from megatron_r1.rl.rewards.accuracy import default_verifier

    assert accuracy_reward(r1z("(x+1)^2"), "x^2+2x+1") == 1.0
    assert default_verifier() is default_verifier()


def test_sympy_fallback_without_math_verify():
    from megatron_r1.rl.rewards._symbolic_worker import _sympy_equal

    assert _sympy_equal("(x+1)^2", "x^2+2x+1")
    assert _sympy_equal(r"\frac{\sqrt{8}}{2}", r"\sqrt{2}")
    assert not _sympy_equal("2x", "x")


def test_language_auto_scores_the_dominant_language():
    """Bilingual prompt sets: 'auto' is 1 for a thought in either language, the dominant share when mixed."""
    from megatron_r1.rl.rewards.language import language_reward
    assert language_reward("<think> 3 加 8 得 11，进 1。 所以 23 + 48 = 71。 </think>", lang="auto") == 1.0
    assert language_reward("<think> 3 + 8 = 11, carry 1. So 23 + 48 = 71. </think>", lang="auto") == 1.0
    # 加 得 进 (3 Chinese) vs So carry (2 English) -> 3/5
    mixed = "<think> 3 加 8 得 11，进 1。 So 23 + 48 = 71, carry. </think>"
    assert language_reward(mixed, lang="auto") == pytest.approx(3 / 5)
    assert language_reward("<think> 3 + 8 = 11. </think>", lang="auto") == 0.0  # no words, no bonus
