"""The study report as a file (no model): Markdown and one self-contained HTML page with the
figure as an embedded PNG, the paper's published figures beside the matching rows, the spread
across fine-tune seeds; and every shipped study spec is valid."""
from __future__ import annotations

import base64
import json
import re
import statistics
from pathlib import Path

import pytest

from core.model_files import SMOLLM2
from jobs.services import build_services
from jobs.study import StudySpec, StudySpecError
from jobs.study.cli import main as cli_main
from jobs.study.export import render, write_report
from jobs.study.paper import PUBLISHED, paper_note
from jobs.study.report import markdown, seed_spread
from tests.test_study import TINY

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "studies").glob("*.json"))


@pytest.fixture
def services(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    return build_services(warm_up=False)


def row(system, rag, metric, mean, size=0, seed=None, diff=None, dataset="sample:qasper",
        model=SMOLLM2):
    tuned = system == "fine-tuned"
    return {"dataset": dataset, "model": model, "system": system,
            "adapter": f"a-{size}-{seed}" if tuned else None, "size": size, "seed": seed,
            "rag": rag, "metric": metric, "mean": mean, "ci_low": mean - 0.3,
            "ci_high": mean + 0.3, "n": 4, "run_id": "evaluate-20261202-120000-abcdef",
            "run_status": "done", "base_mean": 4.0 if tuned else None, "diff": diff,
            "diff_ci_low": None if diff is None else diff - 0.2,
            "diff_ci_high": None if diff is None else diff + 0.2, "n_paired": 4 if tuned else 0,
            "verdict": f"verdict {size} {seed} {rag} {metric}" if tuned else None, "paper": None}


def study_rows():
    """Qasper, 200 pairs, two seeds, with RAG: the cell the paper published for Llama-2."""
    rows = [row("base", True, m, 4.0) for m in ("accuracy", "completeness")]
    for seed, mean in ((0, 3.0), (1, 3.5)):
        for metric in ("accuracy", "completeness"):
            rows.append(row("fine-tuned", True, metric, mean, 200, seed, diff=mean - 4.0))
    for r in rows:
        r["paper"] = paper_note(r)
    return rows


@pytest.fixture
def plan(services):
    return services.studies.plan(StudySpec.from_dict({**TINY, "datasets": ["sample:qasper"],
                                                      "finetune_seeds": [0, 1]}))


def test_the_papers_figures_are_matched_by_dataset_size_metric_and_rag():
    tuned = row("fine-tuned", True, "accuracy", 3.0, 200, 0)
    assert paper_note(tuned) == "paper: Llama-2, 200 pairs: accuracy 4.38 -> 3.14"
    assert paper_note({**tuned, "metric": "completeness"}) == (
        "paper: Llama-2, 200 pairs: completeness 4.55 -> 2.35")
    assert paper_note({**tuned, "dataset": "hub:allenai/qasper"}) is not None  # same preset
    assert paper_note({**tuned, "rag": False}) is None  # the paper compared with RAG only
    assert paper_note({**tuned, "size": 500}) is None
    assert paper_note({**tuned, "dataset": "sample:nq"}) is None
    assert paper_note(row("base", True, "accuracy", 4.0)) is None
    # a figure whose dataset the source does not name is never matched
    assert paper_note({**tuned, "size": 1000, "dataset": "sample:bioasq"}) is None
    assert {p.model for p in PUBLISHED} == {"Llama-2", "Mixtral"}


def test_seed_spread_is_over_the_per_seed_means_and_differences():
    spread = {s["metric"]: s for s in seed_spread(study_rows())}
    accuracy = spread["accuracy"]
    assert (accuracy["seeds"], accuracy["size"], accuracy["rag"]) == (2, 200, True)
    assert accuracy["mean_mean"] == pytest.approx(3.25)
    assert accuracy["mean_sd"] == pytest.approx(statistics.stdev([3.0, 3.5]))
    assert (accuracy["mean_min"], accuracy["mean_max"]) == (3.0, 3.5)
    assert (accuracy["diff_min"], accuracy["diff_max"]) == (-1.0, -0.5)
    assert seed_spread([r for r in study_rows() if r["seed"] != 1]) == []  # one seed: no spread


def test_markdown_shows_spec_spread_paper_and_reference_table(plan):
    text = markdown(plan, study_rows())
    assert text.startswith("# Study: tiny\n")
    assert "- Training-set sizes: 4, 8 pairs · fine-tune seeds: 0, 1" in text
    assert "judge local smollm2-135m-instruct" in text and "scoring logprobs" in text
    assert "| 200 | yes | accuracy | 2 | 3.25 ± 0.35 (3.00 to 3.50) | -0.75 ± 0.35 (-1.00 to -0.50) |" in text
    assert "- verdict 200 0 True accuracy (paper: Llama-2, 200 pairs: accuracy 4.38 -> 3.14)" in text
    assert "| Mixtral | not stated | 1000 | accuracy | 4.04 | 3.28 | -0.76 |" in text
    assert "![" not in text  # no figure unless one is given


def test_html_export_is_one_self_contained_page_with_the_figure(plan, tmp_path):
    rows = study_rows()
    page = render(plan, rows, "html")
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 1 and base64.b64decode(images[0]).startswith(b"\x89PNG\r\n")
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)  # nothing fetched on open
    assert "<script" not in page
    assert "paper: Llama-2, 200 pairs: completeness 4.55 -&gt; 2.35" in page
    md = write_report(plan, rows, "md", tmp_path / "out" / "r.md").read_text()
    assert "](data:image/png;base64," in md and md.startswith("# Study: tiny\n")
    with pytest.raises(StudySpecError, match=r"^Unknown report format 'pdf': choose one of md, html\.$"):
        render(plan, rows, "pdf")


def test_hostile_names_are_shown_as_text_in_the_html(services):
    spec = StudySpec.from_dict({**TINY, "base_models": ["<script>alert(1)</script>"]})
    plan = services.studies.plan(spec)
    page = render(plan, [row("base", True, "accuracy", 4.0, dataset="sample:nq",
                             model="<script>alert(1)</script>")], "html")
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_export_writes_into_the_exports_folder_and_the_cli_writes_html(services, tmp_path, capsys):
    spec = StudySpec.from_dict(TINY)
    path = services.studies.export(spec, "html")
    assert path.parent == tmp_path / "data" / "exports" and path.name.startswith("study-tiny-")
    assert path.suffix == ".html" and services.studies.export(spec).suffix == ".md"
    assert "No evaluation has run yet." in path.read_text()
    with pytest.raises(StudySpecError, match="Unknown report format"):
        services.studies.export(spec, "../x")
    spec_file = tmp_path / "tiny.json"
    spec_file.write_text(json.dumps(TINY))
    assert cli_main(["report", str(spec_file), "--out", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")
    assert cli_main(["report", str(spec_file), "--format", "md"]) == 0
    written = capsys.readouterr().out.rsplit("report written to ", 1)[1].strip()
    assert Path(written).parent == tmp_path / "data" / "exports" and written.endswith(".md")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_spec_parses_with_sane_fields(path):
    """Parsing composes every cell's fine-tune and evaluation spec (their own checks run), without
    loading a model or a dataset; the hub specs are also checked against what the paper did."""
    spec = StudySpec.from_dict(json.loads(path.read_text()))
    assert spec.name == path.stem
    assert spec.finetunes and "finetuned+rag" in spec.systems and "base+rag" in spec.systems
    for model in spec.base_models:
        for dataset in spec.datasets:
            for size in spec.sizes:
                for seed in spec.finetune_seeds:
                    assert spec.finetune_spec(model, dataset, size, seed).n_train == size
            spec.eval_spec(model, dataset, [])
    if path.stem.startswith("paper"):
        assert {d.split(":")[0] for d in spec.datasets} == {"hub"} and len(spec.datasets) == 3
        assert spec.evaluation.metrics == ["accuracy", "completeness"]
    if path.stem == "paper":
        assert spec.sizes == [200, 500, 1000] and spec.evaluation.repeats == 10
        assert spec.evaluation.judge.kind == "openai" and len(spec.base_models) >= 2


def test_the_three_specs_the_issue_asks_for_are_shipped():
    assert {p.stem for p in SHIPPED} == {"cpu-mini", "paper", "paper-small"}
