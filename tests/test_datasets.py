"""Datasets: preset parsers (tiny in-test files and the shipped samples), hub errors offline,
upload checks in order, and the deterministic split. No model is loaded."""
from __future__ import annotations

import json
import random
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core import config
from core.datasets import PRESETS, ColumnMapping, DatasetError, QADataset, load_hub, load_preset, load_upload
from core.schema import QAExample, split_of

REAL_SAMPLES = config.SAMPLES_DIR


@pytest.fixture(autouse=True)
def runtime_dir(tmp_path, monkeypatch):
    # The json loader's arrow cache goes under the data dir; keep it out of the repo.
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "runtime"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def tiny_samples(tmp_path, monkeypatch) -> Path:
    """Minimal files in each preset's native hub layout, including the hub's quirks."""
    root = tmp_path / "samples"
    write_jsonl(root / "bioasq/text-corpus/passages.jsonl", [
        {"passage": "Aspirin inhibits cyclooxygenase.", "id": 1},
        {"passage": "Insulin lowers blood glucose.", "id": 2},
        {"passage": None, "id": 3},  # the hub copy has null passages
    ])
    write_jsonl(root / "bioasq/question-answer-passages/test.jsonl", [
        {"question": "What does aspirin inhibit?", "answer": "Cyclooxygenase.", "id": 10,
         "relevant_passage_ids": [1]},
        {"question": "What lowers glucose?", "answer": "Insulin.", "id": 11,
         "relevant_passage_ids": "[2, 3, 99]"},  # the hub sometimes stores a string
    ])
    para = ["We train a tagger.", "It reaches 91 F1.", "Data is from news."]

    def answer(free="", spans=(), yes_no=None, unanswerable=False, evidence=()):
        return {"unanswerable": unanswerable, "extractive_spans": list(spans), "yes_no": yes_no,
                "free_form_answer": free, "evidence": list(evidence), "highlighted_evidence": []}

    answers = [
        [answer(unanswerable=True), answer(free="A tagger", evidence=[para[0]])],
        [answer(spans=["91", "F1"], evidence=[para[1]])],
        [answer(yes_no=False, evidence=[para[2]])],
        [answer(unanswerable=True)],
    ]
    questions = ["What is trained?", "What score?", "Is data from tweets?", "Who funded it?"]
    write_jsonl(root / "qasper/train.jsonl", [{
        "id": "2005.00001", "title": "Tagging",
        "abstract": "A tagger.",
        "full_text": {"section_name": ["Intro", "Results"], "paragraphs": [para[:1], para[1:]]},
        "qas": {"question": questions, "question_id": [f"q{i}" for i in range(4)],
                "nlp_background": [""] * 4, "topic_background": [""] * 4, "paper_read": [""] * 4,
                "search_query": [""] * 4, "question_writer": ["w"] * 4,
                "answers": [{"answer": a, "annotation_id": ["x"] * len(a), "worker_id": ["y"] * len(a)}
                            for a in answers]},
        "figures_and_tables": {"caption": [], "file": []},
    }])
    shared = "Paris. Paris is the capital of France."
    write_jsonl(root / "nq/test.jsonl", [
        {"example_id": 1, "question": "capital of france", "answers": ["Paris", "paris"], "text": shared,
         "idx_gold_in_corpus": 7},
        {"example_id": 2, "question": "what is the french capital", "answers": ["Paris"], "text": shared,
         "idx_gold_in_corpus": 7},
    ])
    monkeypatch.setattr(config, "SAMPLES_DIR", root)
    return root


# ---------------------------------------------------------------- preset parsers

def test_bioasq_sample_layout(tiny_samples):
    ds = load_preset("bioasq")
    assert ds.source == "sample:bioasq"
    assert [p.id for p in ds.corpus] == ["1", "2"]  # the null passage is skipped
    by_id = {ex.id: ex for ex in ds.examples}
    assert by_id["10"].contexts == ["Aspirin inhibits cyclooxygenase."]
    assert by_id["11"].contexts == ["Insulin lowers blood glucose."]
    assert by_id["11"].meta["relevant_passage_ids"] == ["2", "3", "99"]
    assert by_id["11"].meta["missing_passages"] == 2


def test_qasper_sample_layout(tiny_samples):
    ds = load_preset("qasper")
    by_id = {ex.id: ex for ex in ds.examples}
    assert by_id["q0"].answer == "A tagger"  # first answerable annotator wins
    assert by_id["q1"].answer == "91; F1"
    assert by_id["q2"].answer == "No"
    assert "q3" not in by_id and ds.skipped == 1  # every annotator said unanswerable
    assert by_id["q1"].contexts == ["It reaches 91 F1."]
    assert by_id["q0"].meta == {"paper_id": "2005.00001", "title": "Tagging"}
    assert [p.id for p in ds.corpus] == ["2005.00001:0:0", "2005.00001:1:0", "2005.00001:1:1"]
    assert ds.corpus[1].title == "Tagging / Results"


def qasper_hub_features() -> datasets.Features:
    """The typed features the hub copy of allenai/qasper declares (sequences of dicts)."""
    from datasets import Sequence, Value

    answer = {"unanswerable": Value("bool"), "extractive_spans": Sequence(Value("string")),
              "yes_no": Value("bool"), "free_form_answer": Value("string"),
              "evidence": Sequence(Value("string")), "highlighted_evidence": Sequence(Value("string"))}
    qa = {name: Value("string") for name in ("question", "question_id", "nlp_background", "topic_background",
                                             "paper_read", "search_query", "question_writer")}
    qa["answers"] = Sequence({"answer": answer, "annotation_id": Value("string"),
                              "worker_id": Value("string")})
    return datasets.Features({
        "id": Value("string"), "title": Value("string"), "abstract": Value("string"),
        "full_text": Sequence({"section_name": Value("string"), "paragraphs": Sequence(Value("string"))}),
        "qas": Sequence(qa),
        "figures_and_tables": Sequence({"caption": Value("string"), "file": Value("string")})})


def test_qasper_hub_typed_rows_parse_like_the_sample(tiny_samples):
    papers = [json.loads(line) for line in (tiny_samples / "qasper/train.jsonl").read_text().splitlines()]
    hub_rows = datasets.Dataset.from_list(papers, features=qasper_hub_features())
    parsed = PRESETS["qasper"].parse({"papers": hub_rows})
    sample = load_preset("qasper")
    assert parsed.examples == sample.examples and parsed.corpus == sample.corpus


def test_nq_sample_layout(tiny_samples):
    ds = load_preset("nq")
    assert [ex.answer for ex in ds.examples] == ["Paris", "Paris"]
    assert ds.examples[0].meta["answers"] == ["Paris", "paris"]
    assert [p.id for p in ds.corpus] == ["7"]  # two questions share one gold passage
    assert all(ex.contexts == [ds.corpus[0].text] for ex in ds.examples)


def test_preset_limit(tiny_samples):
    assert len(load_preset("qasper", limit=2).examples) == 2
    with pytest.raises(DatasetError, match="positive whole number"):
        load_preset("qasper", limit=0)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(DatasetError, match="bioasq, qasper, nq"):
        load_preset("squad")


def test_missing_sample_file_is_a_clear_error(tiny_samples):
    (tiny_samples / "nq/test.jsonl").unlink()
    with pytest.raises(DatasetError, match="sample of Natural Questions is missing"):
        load_preset("nq")


def test_sample_in_a_foreign_layout_names_the_missing_columns(tiny_samples):
    write_jsonl(tiny_samples / "nq/test.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DatasetError, match=r"lacks column\(s\) example_id, answers, text"):
        load_preset("nq")


@pytest.mark.parametrize("name", list(PRESETS))
def test_shipped_sample_is_complete(name):
    assert (REAL_SAMPLES / name).is_dir(), f"the shipped sample for {name} is missing"
    ds = load_preset(name)
    assert len(ds.examples) >= 60
    corpus_texts = {p.text for p in ds.corpus}
    for ex in ds.examples:
        assert ex.answer.strip(), ex.id
        assert any(c in corpus_texts for c in ex.contexts), ex.id
    assert len({ex.id for ex in ds.examples}) == len(ds.examples)
    assert len({p.id for p in ds.corpus}) == len(ds.corpus)
    counts = ds.split_counts()
    assert counts["train"] > 0 and counts["eval"] > 0


# ---------------------------------------------------------------- the hub, offline

@pytest.fixture
def hub_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # datasets reads the variable once at import; set its copy too so the call fails fast.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_from_unreachable_hub_points_to_the_sample(hub_offline, name):
    with pytest.raises(DatasetError) as err:
        load_preset(name, source="hub")
    message = str(err.value)
    assert PRESETS[name].hub_id in message
    assert "could not be reached" in message and "sample" in message


def test_hub_id_from_unreachable_hub(hub_offline):
    with pytest.raises(DatasetError, match="could not be reached to load 'someone/some-qa'"):
        load_hub("someone/some-qa", ColumnMapping())


def test_hub_id_must_look_like_owner_name():
    with pytest.raises(DatasetError, match="owner/name"):
        load_hub("../etc", ColumnMapping())


# ---------------------------------------------------------------- uploads: happy paths

ROWS = [
    {"id": "a", "question": "Q one?", "answer": "A one", "contexts": ["ctx 1", "ctx 2"]},
    {"id": "b", "question": "Q two?", "answer": "A two", "contexts": "ctx 2"},
    {"id": "c", "question": "Q three?", "answer": "A three", "contexts": []},
]


def check_rows_loaded(ds: QADataset) -> None:
    assert [ex.id for ex in ds.examples] == ["a", "b", "c"]
    assert ds.examples[0].contexts == ["ctx 1", "ctx 2"]
    assert ds.examples[1].contexts == ["ctx 2"]
    assert sorted(p.text for p in ds.corpus) == ["ctx 1", "ctx 2"]  # unique contexts


def test_upload_jsonl(tmp_path):
    ds = load_upload(write_jsonl(tmp_path / "mine.jsonl", ROWS))
    check_rows_loaded(ds)
    assert ds.name == "mine" and ds.source == "upload:mine.jsonl"


def test_upload_json_list_and_wrapped(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    (tmp_path / "b.json").write_text(json.dumps({"data": ROWS, "version": 2}))
    check_rows_loaded(load_upload(tmp_path / "a.json"))
    check_rows_loaded(load_upload(tmp_path / "b.json"))


def test_upload_csv_with_json_list_cells(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text('\ufeffid,question,answer,contexts\n'  # a BOM, as spreadsheets write
                    'a,Q one?,A one,"[""ctx 1"", ""ctx 2""]"\n'
                    'b,Q two?,A two,ctx 2\n'
                    'c,Q three?,A three,\n', encoding="utf-8")
    check_rows_loaded(load_upload(path))


def test_upload_parquet(tmp_path):
    rows = [dict(r, contexts=r["contexts"] if isinstance(r["contexts"], list) else [r["contexts"]])
            for r in ROWS]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mine.parquet")
    check_rows_loaded(load_upload(tmp_path / "mine.parquet"))


def test_upload_with_mapping_and_hashed_ids(tmp_path):
    rows = [{"q": "Why?", "gold": ["Because", "Since"], "ctx": "passage"}]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    ds = load_upload(path, ColumnMapping(question="q", answer="gold", contexts="ctx"))
    ex = ds.examples[0]
    assert (ex.question, ex.answer, ex.contexts, ex.meta["answers"]) == ("Why?", "Because", ["passage"],
                                                                       ["Because", "Since"])
    # The id is a stable hash of the question: the same text gives the same id in another file.
    again = load_upload(write_jsonl(tmp_path / "n.jsonl", rows), ColumnMapping(question="q", answer="gold"))
    assert again.examples[0].id == ex.id and ex.id.startswith("q")


def test_squad_style_answer_cells(tmp_path):
    rows = [{"question": "Who?", "answers": {"text": ["Ada", "Ada Lovelace"], "answer_start": [0, 0]},
             "context": "Ada wrote the first program."}]
    mapping = ColumnMapping(answer="answers", contexts="context")
    ds = load_upload(write_jsonl(tmp_path / "squad.jsonl", rows), mapping)
    assert (ds.examples[0].answer, ds.examples[0].meta["answers"]) == ("Ada", ["Ada", "Ada Lovelace"])
    assert [p.text for p in ds.corpus] == ["Ada wrote the first program."]


def test_upload_skips_empty_rows_and_counts_them(tmp_path):
    rows = ROWS + [{"question": " ", "answer": "x"}, {"question": "Q?", "answer": None}]
    ds = load_upload(write_jsonl(tmp_path / "s.jsonl", [dict(r, id=str(i)) for i, r in enumerate(rows)]))
    assert len(ds.examples) == 3 and ds.skipped == 2


def test_upload_drops_repeated_questions(tmp_path):
    rows = [{"id": "1", "question": "Same Q?", "answer": "x"},
            {"id": "2", "question": "same  q?", "answer": "y"},
            {"id": "1", "question": "Other?", "answer": "z"}]
    ds = load_upload(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [ex.id for ex in ds.examples] == ["1"] and ds.duplicates == 2


# ---------------------------------------------------------------- uploads: each check, in order

def test_upload_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="nope.csv was not found"):
        load_upload(tmp_path / "nope.csv")


def test_upload_too_large_is_refused_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "MAX_UPLOAD_BYTES", 100)
    path = tmp_path / "big.bin"  # binary and unknown type too: the size check must come first
    path.write_bytes(b"\0" * 101)
    with pytest.raises(DatasetError, match="over the upload limit"):
        load_upload(path)


def test_upload_empty(tmp_path):
    (tmp_path / "e.jsonl").write_bytes(b"")
    (tmp_path / "w.jsonl").write_text("  \n\n")
    with pytest.raises(DatasetError, match="e.jsonl is empty"):
        load_upload(tmp_path / "e.jsonl")
    with pytest.raises(DatasetError, match="w.jsonl is empty"):
        load_upload(tmp_path / "w.jsonl")


def test_upload_binary(tmp_path):
    (tmp_path / "x.csv").write_bytes(b"question,answer\n\x00\x01\x02")
    with pytest.raises(DatasetError, match="binary file"):
        load_upload(tmp_path / "x.csv")


def test_upload_not_utf8(tmp_path):
    (tmp_path / "l.csv").write_bytes("question,answer\nWas ist Öl?,Öl\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"not UTF-8 text \(invalid byte on line 2\)"):
        load_upload(tmp_path / "l.csv")


def test_upload_unknown_extension(tmp_path):
    (tmp_path / "notes.txt").write_text("question,answer\n")
    with pytest.raises(DatasetError, match=r"'\.txt' are not supported.*\.jsonl"):
        load_upload(tmp_path / "notes.txt")


def test_upload_bad_json_line_names_the_line(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"question": "q", "answer": "a"}\n\n{"question": "q2", \n')
    with pytest.raises(DatasetError, match="line 3 is not valid JSON"):
        load_upload(tmp_path / "b.jsonl")


def test_upload_jsonl_line_that_is_not_an_object(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"question": "q", "answer": "a"}\n["q", "a"]\n')
    with pytest.raises(DatasetError, match="line 2 is a JSON list, not an object"):
        load_upload(tmp_path / "b.jsonl")


def test_upload_bad_json_document(tmp_path):
    (tmp_path / "b.json").write_text('[{"question": "q", "answer": "a"},\n {"question": }]')
    with pytest.raises(DatasetError, match="not valid JSON: .* on line 2"):
        load_upload(tmp_path / "b.json")


def test_upload_json_lines_named_json_still_loads(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text(write_jsonl(tmp_path / "x.jsonl", ROWS).read_text())
    check_rows_loaded(load_upload(path))


def test_upload_malformed_csv(tmp_path):
    (tmp_path / "m.csv").write_text('question,answer\n"q1",a1\nq2,a2,extra\n')
    with pytest.raises(DatasetError, match="line 3 has 3 fields but the header has 2"):
        load_upload(tmp_path / "m.csv")
    (tmp_path / "q.csv").write_text('question,answer\n"q1,a1\n')
    with pytest.raises(DatasetError, match="not valid CSV"):
        load_upload(tmp_path / "q.csv")


def test_upload_bad_parquet(tmp_path):
    (tmp_path / "p.parquet").write_bytes(b"PAR1 this is not really parquet PAR1")
    with pytest.raises(DatasetError, match="not a readable Parquet file"):
        load_upload(tmp_path / "p.parquet")


def test_upload_missing_columns_names_missing_and_present(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "q", "answer": "a"}])
    expected = r"Missing column\(s\) 'question'; the data has: 'prompt', 'answer'"
    with pytest.raises(DatasetError, match=expected):
        load_upload(path)
    with pytest.raises(DatasetError, match=r"'passages'"):
        load_upload(path, ColumnMapping(question="prompt", contexts="passages"))


def test_upload_with_no_usable_rows(tmp_path):
    rows = [{"question": "q", "answer": ""}, {"question": "", "answer": "a"}]
    path = write_jsonl(tmp_path / "n.jsonl", rows)
    with pytest.raises(DatasetError, match="no usable examples"):
        load_upload(path)


# ---------------------------------------------------------------- deterministic split

def make_dataset(n: int = 200) -> QADataset:
    examples = [QAExample(f"id-{i}", f"question {i}?", f"answer {i}") for i in range(n)]
    return QADataset("synthetic", "test", examples, [])


def test_split_is_disjoint_complete_and_repeatable():
    ds = make_dataset()
    train, evaluation = ds.split(seed=3, eval_fraction=0.3)
    train_ids, eval_ids = {e.id for e in train}, {e.id for e in evaluation}
    assert not train_ids & eval_ids
    assert len(train_ids | eval_ids) == 200
    assert 30 < len(eval_ids) < 90  # about 30% of 200
    assert ds.split(seed=3, eval_fraction=0.3) == (train, evaluation)
    assert ds.split_counts(seed=3, eval_fraction=0.3) == {"train": len(train), "eval": len(evaluation)}
    assert ds.split(seed=4)[1] != evaluation  # the seed matters


def test_filtering_or_shuffling_never_moves_an_example():
    ds = make_dataset()
    eval_ids = {e.id for e in ds.split()[1]}
    shuffled = ds.examples[:]
    random.Random(1).shuffle(shuffled)
    subset = shuffled[:57]
    for examples in (shuffled, subset):
        other = QADataset("other", "test", examples, [])
        train, evaluation = other.split()
        assert {e.id for e in evaluation} == eval_ids & {e.id for e in examples}
        assert not {e.id for e in train} & eval_ids


def test_preview_rows():
    ds = make_dataset(30)
    ds.examples[0].question = "x" * 500
    rows = ds.preview(5)
    assert len(rows) == 5
    assert set(rows[0]) == {"id", "question", "answer", "n_contexts", "split"}
    assert len(rows[0]["question"]) <= 200
    assert all(r["split"] == split_of(r["id"]) for r in rows)


def test_bad_eval_fraction():
    with pytest.raises(DatasetError, match="between 0 and 1"):
        make_dataset().split(eval_fraction=1.5)
