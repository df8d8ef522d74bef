"""ui.tables: the tabs' tables shaped for a 1280 px screen (pure pandas)."""
from types import SimpleNamespace

import pandas as pd

from ui import tables


def summary_rows():
    base = {"system_id": "s0", "system": "m (base) · no RAG", "metric": "accuracy", "n": 5,
            "mean": 3.14159, "std": 0.51234, "ci_low": 2.5, "ci_high": 3.777, "parse_failures": 0,
            "base": None, "diff": None, "diff_ci_low": None, "diff_ci_high": None}
    tuned = {**base, "system_id": "s1", "system": "tuned · no RAG", "mean": 2.6, "base": "s0",
             "diff": -0.54159, "diff_ci_low": -1.1, "diff_ci_high": 0.02}
    return [base, tuned]


def test_summary_puts_the_interval_in_one_cell_and_names_the_base_by_label():
    df = tables.summary_table(summary_rows())
    assert list(df.columns) == tables.SUMMARY_COLUMNS
    base, tuned = df.to_dict("records")
    assert base["mean"] == 3.14 and base["95% CI"] == "2.50 to 3.78" and base["std"] == 0.51
    assert base["vs"] == "" and base["diff 95% CI"] == "" and pd.isna(base["diff"])
    assert tuned["diff"] == -0.54 and tuned["diff 95% CI"] == "-1.10 to 0.02"
    assert tuned["vs"] == "m (base) · no RAG"


def test_an_interval_with_a_missing_end_is_blank():
    assert tables.interval(None, 2.0) == "" and tables.interval(float("nan"), 2.0) == ""


def test_empty_columns_are_dropped_but_kept_ones_stay():
    df = pd.DataFrame({"a": [1, 2], "b": ["", " "], "c": [None, float("nan")], "d": ["", ""]})
    assert list(tables.drop_empty(df, keep=["d"]).columns) == ["a", "d"]


def doc(score, title):
    return SimpleNamespace(score=score, content="some text", meta={"passage_id": "p1",
                                                                   "title": title})


def test_chunks_without_titles_have_no_title_column_and_matching_widths():
    untitled = tables.chunks_table([doc(0.123456, ""), doc(None, "")])
    assert list(untitled.columns) == ["rank", "score", "passage_id", "text"]
    assert untitled["score"].iloc[0] == 0.123
    assert len(tables.chunk_widths(untitled)) == 4
    titled = tables.chunks_table([doc(1.0, "Frankenstein")])
    assert "title" in titled.columns and tables.chunk_widths(titled)[-1] == "auto"


def test_drill_down_shows_answer_and_score_first():
    row = {"example_id": "e1", "system_id": "s0", "system": "base", "metric": "accuracy",
           "question": "q", "reference": "r", "answer": "a", "score": 4.3333, "scores": [4, 5]}
    df = tables.items_table([row])
    assert list(df.columns[:4]) == ["system", "metric", "score", "answer"]
    assert df["score"].iloc[0] == 4.33


def test_runs_without_common_systems_list_what_each_has():
    listed = tables.run_systems({
        "A": [{"system": "base", "metric": "accuracy"}, {"system": "base", "metric": "accuracy"},
              {"system": "base", "metric": "completeness"}],
        "B": [{"system": "tuned", "metric": "accuracy"}]})
    assert listed.to_dict("records") == [
        {"run": "A", "system": "base", "metrics": "accuracy, completeness"},
        {"run": "B", "system": "tuned", "metrics": "accuracy"}]


def test_run_comparison_rounds_and_joins_the_interval():
    row = {"system_id": "s", "system": "base", "metric": "accuracy", "mean_a": 3.0, "mean_b": 3.456,
           "diff": 0.456, "diff_ci_low": 0.1, "diff_ci_high": 0.8, "n_paired": 4}
    out = tables.run_comparison([row]).to_dict("records")[0]
    assert out["diff (B − A)"] == 0.46 and out["diff 95% CI"] == "0.10 to 0.80"


def test_preview_shows_split_and_answer_before_the_id():
    row = {"id": "x", "question": "q", "answer": "a", "n_contexts": 1, "split": "eval"}
    assert list(tables.preview_table([row]).columns[:3]) == ["split", "question", "answer"]


def test_a_table_of_blank_cells_counts_as_empty():
    from ui.common import has_rows
    assert not has_rows(None) and not has_rows(pd.DataFrame(columns=["a"]))
    assert not has_rows(pd.DataFrame([["", None]], columns=["a", "b"]))
    assert has_rows(pd.DataFrame([["", 0]], columns=["a", "b"]))


def test_vote_buttons_name_the_two_systems():
    from core.systems import System
    from ui.compare_tab import CHOICES, vote_labels
    columns = [SimpleNamespace(system=System(rag=True)),
               SimpleNamespace(system=System(adapter="tuned"))]
    assert vote_labels(columns, 1, 2) == ["A: base + RAG is better", "B: tuned is better",
                                          "tie", "all bad"]
    assert vote_labels([], 1, 2) == CHOICES


def test_adapter_details_read_as_sentences_not_json():
    from ui.finetune_tab import adapter_markdown
    spec = {"base_model": "m", "dataset": "nq", "source": "sample", "n_train": 8, "context": "none",
            "lora_r": 8, "lora_alpha": 16.0, "lora_dropout": 0.0, "target_modules": ["q_proj"],
            "epochs": 1, "lr": 0.005, "lr_schedule": "constant", "micro_batch_size": 4,
            "grad_accum": 1, "max_length": 256, "seed": 0}
    metrics = {"n_train": 8, "steps": 2, "final_train_loss": 1.23456, "final_val_loss": 2.5,
               "train_tokens_per_s": 512.4, "wall_seconds": 75}
    text = adapter_markdown("tiny", spec, metrics, "/data/adapters/tiny")
    assert "8 training pairs" in text and "LoRA r 8, alpha 16.0" in text and "{" not in text
    assert "final loss: train 1.235, validation 2.5 · 512 tokens/s · wall 1m15s" in text
    assert adapter_markdown("tiny", spec, {}, "f").count("\n\n") == 3  # no results line yet
