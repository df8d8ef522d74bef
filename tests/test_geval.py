"""G-Eval pieces: the score parser, metric checks, the form prompt, judgments from probabilities and
samples, summary statistics (no model); then the real 135M judge at the score slot, sampling,
reasoning, and the steps cache."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from core import evalstats
from core.geval import (ACCURACY, COMPLETENESS, FALLBACK, FormInput, Metric, MetricError, form_head,
                        form_messages, from_probabilities, from_samples, get_steps, judge_batch,
                        metric_from, parse_score, prompt_hash, reasoning_messages, score_slot, set_steps)
from core.generation import GenParams
from core.judges import LocalJudge
from core.model_files import SMOLLM2
from core.models import ModelHub
from core.scoring import TokenScores
from core.store import Store
from core.systems import BASE, System
from tests.servers import make_lora_adapters

STEPS = "1. Compare the facts of the answer with the reference answer.\n2. Score 5 if they agree."
ITEM = FormInput("When was the Eiffel Tower completed?", "It was completed in 1889.", "In 1889.")


# ---------------------------------------------------------------- parser


@pytest.mark.parametrize("reply, expected", [
    ("4", 4.0),
    ("  5\n", 5.0),
    ("```\n3\n```", 3.0),
    ("```text\n2 - the answer misses the date\n```", 2.0),
    ("4 - mostly correct, but it misses a detail", 4.0),
    ("4/5", 4.0),
    ("Score: 4", 4.0),
    ("score:3 because", 3.0),
    ("- Accuracy: 2", 2.0),
    ("Accuracy: 5.", 5.0),
    ("**4**", 4.0),
    ("3.5", 3.5),
])
def test_parser_takes_the_score_the_reply_starts_with(reply, expected):
    assert parse_score(reply, ACCURACY) == expected


@pytest.mark.parametrize("reply", [
    "I think the answer deserves a 3 because it is close.",
    "The answer is correct. Score: 5",
    "Accuracy: I would say 4",
    "",
    None,
    "   ",
    "6",
    "0",
    "10",
    "-3",
    "8.65 out of 10",
    "five",
    "Completeness: 4",  # another metric's slot is not this one
])
def test_parser_refuses_late_digits_out_of_range_and_empty(reply):
    assert parse_score(reply, ACCURACY) is None


def test_parser_uses_the_metric_range():
    wide = Metric("style", "Is it well written?", score_min=0, score_max=9)
    assert parse_score("0", wide) == 0.0 and parse_score("9 great", wide) == 9.0
    assert parse_score("- Style: 7", wide) == 7.0
    assert parse_score("10", wide) is None


# ---------------------------------------------------------------- metrics and prompts


@pytest.mark.parametrize("metric, message", [
    ({"name": "", "criteria": "x"}, "Metric name '' is not allowed"),
    ({"name": "../x", "criteria": "x"}, r"Metric name '../x' is not allowed: use 1-64 letters"),
    ({"name": "faithful", "criteria": "  "}, "has no criteria"),
    ({"name": "faithful", "criteria": "x", "score_min": 5, "score_max": 1}, "below the highest"),
    ({"name": "faithful", "criteria": "x", "score_min": 1, "score_max": 20}, "at most 10 score values"),
    ({"name": "faithful", "criteria": "x", "steps": " "}, "empty evaluation steps"),
    ({"name": "accuracy", "criteria": "my own"}, "built-in metric"),
    ({"name": "faithful", "criteria": "x", "weight": 2}, "Unknown metric field"),
    ("fluency", "Unknown metric 'fluency'"),
])
def test_bad_metrics_get_a_sentence(metric, message):
    with pytest.raises(MetricError, match=message):
        metric_from(metric)


def test_builtins_user_metrics_and_builtin_steps():
    assert metric_from("Accuracy") is ACCURACY and metric_from("completeness") is COMPLETENESS
    own = metric_from({"name": "faithfulness", "criteria": "Is every claim in the retrieved context?",
                       "uses_context": True})
    assert own.label == "Faithfulness" and own.steps is None and own.scores == [1, 2, 3, 4, 5]
    assert Metric("context_faithfulness", "x").label == "Context faithfulness"  # derived for the form
    given = metric_from({"name": "accuracy", "steps": STEPS})
    assert given.criteria == ACCURACY.criteria and given.steps == STEPS
    assert given.criteria_hash == ACCURACY.criteria_hash  # steps are not part of the cache key
    assert metric_from({"name": "accuracy", "steps": None}) == ACCURACY


def test_form_ends_at_the_score_slot_and_shows_context_only_when_asked():
    form = form_messages(ACCURACY, STEPS, FormInput("Q?", "ref", "ans", context="PASSAGE"))
    text = form[-1]["content"]
    assert text.endswith("Evaluation Form (scores ONLY):\n- Accuracy:")
    assert "Reference answer:\n\nref" in text and "PASSAGE" not in text and STEPS in text
    faithful = Metric("faithfulness", "Is every claim supported?", uses_context=True)
    text = form_messages(faithful, STEPS, FormInput("Q?", "ref", "ans", context="PASSAGE"))[-1]["content"]
    assert "Retrieved context:\n\nPASSAGE" in text and text.endswith("- Faithfulness:")
    assert prompt_hash(form) != prompt_hash(form_messages(ACCURACY, STEPS, ITEM))


def test_every_prompt_of_a_metric_starts_with_its_head_and_keeps_its_hash():
    faithful = Metric("faithfulness", "Is every claim supported?", uses_context=True)
    empty = FormInput("Q?", "ref", "", context="PASSAGE")
    for metric, item in ((ACCURACY, ITEM), (faithful, empty)):
        head = form_head(metric, STEPS)
        assert head.endswith(f"{STEPS}\n\nExample:")
        for messages in (form_messages(metric, STEPS, item), reasoning_messages(metric, STEPS, item)):
            assert messages[0]["content"].startswith(head + "\n\nQuestion:")
    # The same text as before the head was split out: stored judgments keep their prompt hashes.
    assert prompt_hash(form_messages(ACCURACY, STEPS, ITEM)) == (
        "114506342def5da4f182b184605b7d27c6d041d1f09f1138a001fa020d205dc7")
    assert prompt_hash(reasoning_messages(faithful, STEPS, empty)) == (
        "5af1fa6e6efca0475f791e680ba86f68204f237076f57b84d6881e545693ad5b")


# ---------------------------------------------------------------- judgments without a model


def test_weighted_score_from_slot_probabilities():
    scores = TokenScores({"1": 0.02, "2": 0.02, "3": 0.04, "4": 0.08, "5": 0.04}, 0.2)
    judgment = from_probabilities(scores, ACCURACY, "judge", "h", None)
    assert judgment.distribution == pytest.approx({"1": .1, "2": .1, "3": .2, "4": .4, "5": .2})
    assert judgment.score == pytest.approx(.1 + .2 + .6 + 1.6 + 1.0)
    assert (judgment.mass, judgment.parse_failures, judgment.method) == (0.2, 0, "logprobs")
    nothing = from_probabilities(TokenScores({"1": 0.0, "2": 0.0}, 0.0), ACCURACY, "j", "h", None)
    assert nothing.score is None and nothing.parse_failures == 1


def test_sampled_replies_count_failures_and_never_guess():
    replies = ["4", "I think 5", "```\n2\n```", "", "4 because"]
    judgment = from_samples(replies, ACCURACY, "judge", "h", FALLBACK, None)
    assert judgment.parsed_scores == [4.0, None, 2.0, None, 4.0]
    assert judgment.parse_failures == 2 and judgment.score == pytest.approx(10 / 3)
    assert judgment.distribution == pytest.approx({"4": 2 / 3, "2": 1 / 3})
    assert judgment.method == FALLBACK and judgment.raw == replies
    failed = from_samples(["no idea", "maybe 3"], ACCURACY, "judge", "h", "sampling", None)
    assert failed.score is None and failed.parse_failures == 2 and failed.distribution == {}


# ---------------------------------------------------------------- statistics


def _rows():
    """Two systems, 4 items, 2 repeats; one failed repeat and one fully failed item."""
    rows = []
    base = {"q1": (3, 4), "q2": (2, 2), "q3": (5, None), "q4": (1, 3)}
    tuned = {"q1": (2, 2), "q2": (1, 2), "q3": (4, 4), "q4": (None, None)}
    for system, table in (("base", base), ("tuned", tuned)):
        for item, scores in table.items():
            for repeat, score in enumerate(scores):
                rows.append({"system_id": system, "metric": "accuracy", "example_id": item,
                             "repeat": repeat, "score": score,
                             "parse_failures": 0 if score is not None else 10})
    return rows


def test_summary_averages_repeats_per_item_then_items():
    summary = {r["system_id"]: r for r in evalstats.summarize(_rows(), {"tuned": "base"})}
    base_items = [3.5, 2.0, 5.0, 2.0]
    assert summary["base"]["n"] == 4 and summary["base"]["mean"] == pytest.approx(np.mean(base_items))
    assert summary["base"]["std"] == pytest.approx(np.std(base_items, ddof=1))
    half = stats.t.ppf(0.975, 3) * np.std(base_items, ddof=1) / 2
    assert (summary["base"]["ci_low"], summary["base"]["ci_high"]) == pytest.approx(
        (np.mean(base_items) - half, np.mean(base_items) + half))
    assert summary["base"]["parse_failures"] == 10 and summary["base"]["judgments"] == 8
    tuned = summary["tuned"]
    assert (tuned["n"], tuned["unscored_items"], tuned["parse_failures"]) == (3, 1, 20)
    assert tuned["base"] == "base" and tuned["n_paired"] == 3
    assert tuned["diff"] == pytest.approx(np.mean([2 - 3.5, 1.5 - 2, 4 - 5]))
    assert tuned["diff_ci_low"] <= tuned["diff"] <= tuned["diff_ci_high"]
    assert summary["base"]["diff"] is None


def test_paired_bootstrap_is_seeded_and_agrees_with_scipy():
    diffs = [0.5, -1.0, 0.25, 2.0, 0.0, -0.5, 1.5]
    ours = evalstats.paired_bootstrap(diffs, n_boot=20_000, seed=3)
    assert ours == evalstats.paired_bootstrap(diffs, n_boot=20_000, seed=3)
    ref = stats.bootstrap((np.asarray(diffs),), np.mean, n_resamples=20_000, method="percentile",
                          confidence_level=0.95, rng=np.random.default_rng(11)).confidence_interval
    # Two independent Monte Carlo estimates of the same percentiles: equal within resampling noise.
    assert ours == pytest.approx((ref.low, ref.high), abs=0.06)
    assert evalstats.paired_bootstrap([1.0]) is None and evalstats.t_interval([2.0]) is None


def test_paired_bootstrap_matches_the_enumerated_distribution():
    # Resampling [0, 3, 6] gives 27 equally likely samples whose means 0..6 occur 1,3,6,7,6,3,1
    # times: 0 and 6 each carry 1/27 = 3.7% > 2.5%, so the exact 95% percentile interval is (0, 6).
    assert evalstats.paired_bootstrap([0.0, 3.0, 6.0], n_boot=20_000, seed=1) == (0.0, 6.0)
    # For [0, 1] the means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: again the end points.
    assert evalstats.paired_bootstrap([0.0, 1.0], n_boot=20_000, seed=2) == (0.0, 1.0)
    # A 40% interval cuts 30% from each tail: past the 25% at each end, inside the 50% at 0.5.
    assert evalstats.paired_bootstrap([0.0, 1.0], n_boot=20_000, seed=2, confidence=0.4) == (0.5, 0.5)


def test_summary_takes_a_dataframe_and_default_bases_pair_like_with_like():
    import pandas as pd

    frame = pd.DataFrame(_rows())
    assert evalstats.summarize(frame, "base") == evalstats.summarize(_rows(), "base")
    b, b_rag, ft, ft_rag = (System(model="m", adapter=a, rag=r, pipeline="p")
                            for a, r in (("__base__", False), ("__base__", True), ("ft", False),
                                         ("ft", True)))
    stored = [{**s.fields(), "id": s.id, "label": s.label} for s in (b, b_rag, ft, ft_rag)]
    expected = {b_rag.id: b.id, ft.id: b.id, ft_rag.id: b_rag.id}
    assert evalstats.default_bases(stored) == expected
    assert evalstats.default_bases([b, b_rag, ft, ft_rag]) == expected


# ---------------------------------------------------------------- the real 135M judge


@pytest.fixture(scope="module")
def judge() -> LocalJudge:
    return LocalJudge(SMOLLM2)


@pytest.mark.integration
def test_score_slot_probabilities_normalize_and_weight_into_the_range(judge):
    [(_, scores)] = judge.score_slots([form_messages(ACCURACY, STEPS, ITEM)], ["1", "2", "3", "4", "5"],
                                 score_slot(ACCURACY))
    assert 0 < scores.mass <= 1
    assert sum(scores.normalized().values()) == pytest.approx(1.0)
    [(index, judgment)] = list(judge_batch(judge, ACCURACY, STEPS, [ITEM], "logprobs"))
    assert index == 0 and judgment.method == "logprobs" and judgment.judge == f"local:{SMOLLM2}"
    assert 1 <= judgment.score <= 5 and 0 < judgment.mass <= 1
    # judge_batch reads the slot on the cached head (core.prefix_cache): equal within 1e-4.
    assert judgment.mass == pytest.approx(scores.mass, abs=1e-4)
    assert judgment.score == pytest.approx(sum(int(s) * p for s, p in scores.normalized().items()), abs=1e-4)
    assert judgment.prompt_hash == prompt_hash(form_messages(ACCURACY, STEPS, ITEM))


@pytest.mark.integration
def test_sampling_and_reasoning_on_the_real_judge(judge):
    items = [ITEM, FormInput("What colour is the sky?", "Blue.", "Green.")]
    sampled = dict(judge_batch(judge, ACCURACY, STEPS, items, "sampling", samples=2, seed=5))
    assert sorted(sampled) == [0, 1]
    for judgment in sampled.values():
        assert judgment.method == "sampling" and len(judgment.raw) == 2
        assert judgment.parsed_scores == [parse_score(r, ACCURACY) for r in judgment.raw]
        good = [p for p in judgment.parsed_scores if p is not None]
        assert judgment.parse_failures == 2 - len(good)
        assert judgment.score == (pytest.approx(sum(good) / len(good)) if good else None)
    [(_, reasoned)] = list(judge_batch(judge, ACCURACY, STEPS, [ITEM], "logprobs", reasoning=True,
                                       reasoning_max_new_tokens=24))
    assert reasoned.reasoning and 1 <= reasoned.score <= 5
    assert reasoned.prompt_hash == prompt_hash(form_messages(ACCURACY, STEPS, ITEM))


@pytest.mark.integration
def test_steps_are_written_once_per_metric_and_judge_then_editable(judge, tmp_path):
    store = Store(tmp_path / "steps.duckdb")
    steps = get_steps(store, COMPLETENESS, judge, max_new_tokens=24)
    assert steps.strip()
    assert get_steps(store, COMPLETENESS, judge, max_new_tokens=24) == steps
    rows = store.list_geval_steps()
    assert [(r["metric"], r["judge"], r["source"]) for r in rows] == [("completeness", judge.id, "generated")]
    set_steps(store, COMPLETENESS, judge.id, "1. List the reference's key points.\n2. Count them.")
    assert get_steps(store, COMPLETENESS, judge).startswith("1. List the reference's key points.")
    assert len(store.list_geval_steps()) == 1
    own = Metric("completeness", COMPLETENESS.criteria, steps="1. My own steps.")
    assert get_steps(store, own, judge) == "1. My own steps."
    with pytest.raises(MetricError, match="empty"):
        set_steps(store, COMPLETENESS, judge.id, "  ")


# ---------------------------------------------------------------- the shared prefix, cached

ITEMS = [ITEM, FormInput("What colour is the sky on a clear day at noon?", "Blue.", "Green, mostly."),
         FormInput("2+2?", "4", "", context="Arithmetic: two and two make four."),
         FormInput("Who wrote Hamlet?", "William Shakespeare wrote it around 1600.", "Shakespeare.")]
FAITHFUL = Metric("faithfulness", "Is every claim supported by the retrieved context?", uses_context=True)


def assert_same_judgments(cached: dict, uncached: dict) -> None:
    assert sorted(cached) == sorted(uncached) and len(cached) > 1
    for i, judgment in cached.items():
        other = uncached[i]
        assert judgment.method == other.method == "logprobs" and judgment.prompt_hash == other.prompt_hash
        assert judgment.reasoning == other.reasoning
        for score, p in other.raw["probs"].items():
            assert judgment.raw["probs"][score] == pytest.approx(p, abs=1e-4)
        assert judgment.score == pytest.approx(other.score, abs=1e-4)


@pytest.mark.integration
def test_prefix_cached_scores_equal_uncached_scores():
    """Rows of different lengths, three then one per forward pass on the cached head, against
    each prompt prefilled whole: the same probabilities within 1e-4, on two metrics (one with
    context) and after reasoning."""
    hub = ModelHub()
    cached = LocalJudge(SMOLLM2, hub=hub, score_rows=3)
    uncached = LocalJudge(SMOLLM2, hub=hub, prefix_cache=False)
    for count, metric in enumerate((ACCURACY, FAITHFUL), start=1):
        assert_same_judgments(dict(judge_batch(cached, metric, STEPS, ITEMS, "logprobs")),
                              dict(judge_batch(uncached, metric, STEPS, ITEMS, "logprobs")))
        assert len(hub.load(SMOLLM2).prefixes) == count  # one head per metric and steps
    reasoned = [dict(judge_batch(j, ACCURACY, STEPS, ITEMS[:2], "logprobs", reasoning=True,
                                 reasoning_max_new_tokens=8)) for j in (cached, uncached)]
    assert_same_judgments(*reasoned)


@pytest.mark.integration
def test_sampling_on_the_cached_prefix_draws_the_same_replies():
    hub = ModelHub()
    runs = [dict(judge_batch(LocalJudge(SMOLLM2, hub=hub, prefix_cache=on), ACCURACY, STEPS, ITEMS[:2],
                             "sampling", samples=2, seed=3)) for on in (True, False)]
    assert [runs[0][i].raw for i in range(2)] == [runs[1][i].raw for i in range(2)]
    assert len(hub.load(SMOLLM2).prefixes) == 1


@pytest.mark.integration
def test_a_head_that_splits_a_token_or_is_missing_falls_back_to_the_uncached_pass():
    hub = ModelHub()
    prompts = [form_messages(ACCURACY, STEPS, item) for item in ITEMS]
    digits, slot = [str(s) for s in ACCURACY.scores], score_slot(ACCURACY)
    alone = hub.score_tokens_batch(SMOLLM2, prompts, digits, assistant_prefix=slot)
    head = form_head(ACCURACY, STEPS)
    for shared in (head[:-3], "text in no prompt"):  # "Examp" is no token boundary of "Example:"
        scores = hub.score_tokens_batch(SMOLLM2, prompts, digits, assistant_prefix=slot, shared=shared)
        assert [s.probs for s in scores] == [s.probs for s in alone]  # the very same passes
        assert len(hub.load(SMOLLM2).prefixes) == 0
    generated = hub.generate(SMOLLM2, prompts[:2], params=GenParams(max_new_tokens=6), shared=head[:-3])
    assert [g.text for g in generated] == [g.text for g in hub.generate(SMOLLM2, prompts[:2],
                                                                         params=GenParams(max_new_tokens=6))]
    assert len(hub.load(SMOLLM2).prefixes) == 0


@pytest.mark.integration
def test_each_adapter_gets_its_own_cached_prefix(tmp_path):
    hub = ModelHub()
    folder = make_lora_adapters(tmp_path, ["judge-lora"])["judge-lora"]
    hub.load_adapter(SMOLLM2, str(folder), name="judge-lora")
    by_adapter = {}
    for adapter in (BASE, "judge-lora"):
        cached = LocalJudge(SMOLLM2, adapter, hub=hub, score_rows=4)
        uncached = LocalJudge(SMOLLM2, adapter, hub=hub, prefix_cache=False)
        by_adapter[adapter] = dict(judge_batch(cached, ACCURACY, STEPS, ITEMS, "logprobs"))
        assert_same_judgments(by_adapter[adapter],
                              dict(judge_batch(uncached, ACCURACY, STEPS, ITEMS, "logprobs")))
    assert len(hub.load(SMOLLM2).prefixes) == 2
    assert by_adapter[BASE][0].raw != by_adapter["judge-lora"][0].raw
