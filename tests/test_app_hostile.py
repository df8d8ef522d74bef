"""The running app in public mode, sent hostile names and ids through every named endpoint that
takes one: each is refused with a message, and nothing outside the data dir is created, read or
moved (the folder around the data dir is compared before and after every call, and log.txt
canaries planted outside jobs/ must never come back)."""
from __future__ import annotations

import json
import os
import re

import pytest
from gradio_client import Client

from pipelines.spec import DEFAULT_TEMPLATE
from tests.app_server import running_app
from tests.test_app import tiny_form

pytestmark = pytest.mark.integration

BAD = ["../x", "a/b", "/etc/passwd", "", "x" * 300, "a\x00b", "..", "../.."]
CANARY = "CANARY-NOT-A-JOB-LOG"
MODEL = "smollm2-135m-instruct"
SYSTEM = f"{MODEL} (base) · no RAG"
SPEC = ["word", 150, 20, "all-minilm-l6-v2", "bm25", 3, ""]
TEMPLATE = DEFAULT_TEMPLATE
JOB = r"Job id .* is not valid"
ADAPTER = r"Adapter name .* is not allowed"
PIPELINE = r"Pipeline name .* is not allowed"


def finetune_form(dataset="nq", name="hostile"):
    """/start_finetune's arguments in the API's order (positional calls keep working)."""
    return list({**tiny_form(name), "dataset": dataset}.values())


# (endpoint, arguments with the bad value b, pattern of the refusal; a dict maps a bad value to
# its own pattern where it fails for another good reason, None where the request is a no-op).
CASES = {
    "job_log": ("/job_log", lambda b: [b], {"": None, "*": JOB}),
    "cancel_job": ("/cancel_job", lambda b: [b], JOB),
    "resume_job": ("/resume_job", lambda b: [b], JOB),
    "finetune_status": ("/finetune_status", lambda b: [b], {"": None, "*": JOB}),
    "cancel_finetune": ("/cancel_finetune", lambda b: [b], JOB),
    "resume_finetune": ("/resume_finetune", lambda b: [b], JOB),
    "eval_summary": ("/eval_summary", lambda b: [b], {"": None, "*": JOB}),
    "cancel_eval": ("/cancel_eval", lambda b: [b], JOB),
    "resume_eval": ("/resume_eval", lambda b: [b], JOB),
    "export_eval": ("/export_eval", lambda b: [b, "csv"],
                    {"": "Choose a run first", "*": r"Run id .* is not valid"}),
    "compare_runs": ("/compare_runs", lambda b: [b, b], {"": "Choose two runs", "*": "Run A .* is not valid"}),
    "adapter_details": ("/adapter_details", lambda b: [b], {"": None, "*": ADAPTER}),
    "rename_adapter_old": ("/rename_adapter", lambda b: [b, "fine"], ADAPTER),
    "rename_adapter_new": ("/rename_adapter", lambda b: ["planted", b], "New adapter name .* is not allowed"),
    "delete_adapter": ("/delete_adapter", lambda b: [b], ADAPTER),
    "download_adapter": ("/download_adapter", lambda b: [b], ADAPTER),
    "push_adapter_name": ("/push_adapter", lambda b: [b, "owner/repo", "hf_x"], ADAPTER),
    "push_adapter_repo": ("/push_adapter", lambda b: ["planted", b, "hf_x"],
                          {"a/b": "Could not push 'planted' to a/b",
                           "*": "Target repo .* is not a Hugging Face Hub id"}),
    "load_adapter": ("/load_adapter", lambda b: [b, MODEL],
                     {"": "Give an adapter folder", "a/b": "could not be downloaded",
                      "*": "Adapter source .* is not a Hugging Face Hub id"}),
    "start_finetune_name": ("/start_finetune", lambda b: finetune_form(name=b),
                            {"": "skip", "*": ADAPTER}),
    "start_finetune_dataset": ("/start_finetune", lambda b: finetune_form(dataset=b),
                               {"": "dataset: must be text that is not empty",
                                "*": r"fine-tunes on the presets .* only"}),
    "build_index_name": ("/build_index", lambda b: ["sample:nq", [], b, *SPEC, TEMPLATE], PIPELINE),
    "build_index_dataset": ("/build_index", lambda b: [b, [], "hostile", *SPEC, TEMPLATE],
                            {"": "Choose a dataset's passages", "*": "is not loaded"}),
    "retrieve": ("/retrieve", lambda b: ["q", b, *SPEC, TEMPLATE], PIPELINE),
    "retrieval_quality": ("/retrieval_quality", lambda b: ["sample:nq", b, *SPEC, TEMPLATE], PIPELINE),
    # Saved pipelines accept names built after the page loaded: the name rule refuses these.
    "load_pipeline": ("/load_pipeline", lambda b: [b], PIPELINE),
    "delete_pipeline": ("/delete_pipeline", lambda b: [b], PIPELINE),
    "load_dataset_hub_id": ("/load_dataset", lambda b: ["Any Hub dataset", "bioasq", b, "", "train",
                                                        None, "question", "answer", "", ""],
                            {"": "Type a Hub dataset id", "a/b": "could not be reached",
                             "*": "Dataset id .* is not a Hugging Face Hub id"}),
    "compare_pipeline": ("/compare", lambda b: ["q", MODEL, b, "", "", "", 8, 0.0, 1.0, 0, "base",
                                                True] + ["(off)", False] * 5,
                         {"": "no pipeline", "*": PIPELINE}),
    "start_eval_dataset": ("/start_eval", lambda b: [b, 2, 0, "run", MODEL, None, 12, [SYSTEM],
                                                     "local", MODEL, "", "", ["accuracy"],
                                                     "logprobs", 1, 1, False, "", "", ""],
                           {"": "Choose a dataset", "*": "is not loaded"}),
}


def tree(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, n), root)
            for d, dirs, files in os.walk(root) for n in dirs + files}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """(client, root): the app in public mode on root/data, with an adapter of its own and
    canaries where a climbing job id would find a log.txt."""
    root = tmp_path_factory.mktemp("hostile")
    data = root / "data"
    folder = data / "adapters" / "planted"
    folder.mkdir(parents=True)
    from jobs.finetune import _SUMMARY
    from jobs.finetune_data import FinetuneSpec
    (folder / "spec.json").write_text(json.dumps(FinetuneSpec(name="planted").to_dict()))
    (folder / "metrics.json").write_text(json.dumps({k: 0 for k in _SUMMARY}))
    for place in (root, data, data / "adapters"):
        (place / "log.txt").write_text(CANARY)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PUBLIC_MODE", "1")
        with running_app(data) as url:
            yield Client(url, verbose=False), root


def outside_data(root) -> set[str]:
    return {p for p in tree(root) if p != "data" and not p.startswith("data" + os.sep)}


@pytest.mark.parametrize("bad", BAD, ids=repr)
@pytest.mark.parametrize("case", list(CASES))
def test_hostile_values_are_refused_and_touch_nothing_outside(app, case, bad):
    client, root = app
    api_name, args, expected = CASES[case]
    if isinstance(expected, dict):
        expected = expected.get(bad, expected["*"])
    if expected == "skip":
        pytest.skip("an empty adapter name is derived from the spec: a valid start")
    before = outside_data(root)
    try:
        result, message = client.predict(*args(bad), api_name=api_name), None
    except Exception as exc:  # gradio_client raises AppError with the gr.Error message
        result, message = None, str(exc)
    shown = message if message is not None else json.dumps(result, default=str)
    assert CANARY not in shown
    if expected is None:  # an empty box: nothing to show, nothing refused
        assert message is None
    else:
        assert re.search(expected, shown), shown[:500]
    assert outside_data(root) == before
    assert (root / "data" / "adapters" / "planted" / "spec.json").is_file()
    assert not [p for p in tree(root) if "escaped" in p or p.endswith("x.zip")]
