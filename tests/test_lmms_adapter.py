"""The lmms-eval adapter (`llava_uhd.eval.lmms_adapter`) against the installed lmms-eval: lmms-eval's own CLI and
evaluator run a tiny saved model on small local tasks (a generation task, the same with ``max_slices: 1``, a
multiple-choice task and a multi-round task), the model found through the ``lmms_eval.models`` entry point; the
answers equal `llava_uhd.serve.generation.generate` one prompt at a time, ``until`` cuts them, batched equals one
at a time, and the likelihoods equal log-probabilities computed here from the model's logits.

lmms-eval is not a test dependency (its full install pulls a CUDA torchvision that breaks the CPU torch): these
tests run where it is installed (README, "lmms-eval": the scratch environment) and are skipped elsewhere; the two
import tests run everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from serve_helpers import picture, save_tiny

HAVE_LMMS = importlib.util.find_spec("lmms_eval") is not None
needs_lmms = pytest.mark.skipif(not HAVE_LMMS, reason="lmms-eval is not installed (pip install 'llava-uhd[eval]'; "
                                                       "README, lmms-eval)")

SRC = Path(__file__).resolve().parents[1] / "src"
NEW = 6  # max_new_tokens of the generation tasks
DOCS = [  # question, image sizes, answer
    ("What colour is the shape?", [(60, 40)], "red"),
    ("How many circles are there?", [(30, 90), (50, 50)], "three"),
    ("What colour is the shape?", [], "blue"),
    ("How many circles are there?", [(100, 30)], "green"),
]
CHOICES = ["red", "green", "blue", "three"]
SECOND = "And how many circles are there?"  # the multi-round task's second question

TASK_UTILS = '''
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(path).convert("RGB") for path in doc["images"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"])}


def rounds_doc_to_text(doc, lmms_eval_specific_kwargs=None, previous_output=None, round_idx=None,
                       previous_round_info=None):
    """Round 0: the question; round 1: SECOND about the same images; then the end."""
    if not round_idx:
        return doc["question"]
    if round_idx == 1:
        return doc_to_visual(doc), SECOND, False, list(previous_output), {"rounds": 1}
    assert previous_round_info == {"rounds": 1}, previous_round_info
    return None, None, True, list(previous_output), previous_round_info


def rounds_process_results(doc, results):
    return {"exact_match": float(results[0][-1].strip() == doc["answer"])}
'''.replace("SECOND", repr(SECOND))

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
doc_to_visual: !function llava_uhd_tiny_tasks.doc_to_visual
doc_to_text: !function llava_uhd_tiny_tasks.{doc_to_text}
doc_to_target: answer
"""
GENERATION = """generation_kwargs:
  max_new_tokens: {new}
  temperature: 0
  do_sample: false
  until: {until}
{extra}process_results: !function llava_uhd_tiny_tasks.{process_results}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
MULTIPLE_CHOICE = """doc_to_choice: {choices}
metric_list:
  - metric: acc
"""


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny saved model (folder, model, processor) and the documents' images (PIL, per document)."""
    from llava_uhd.serve.loading import load_model

    root = tmp_path_factory.mktemp("lmms")
    save_tiny(root / "model")
    model, processor, _ = load_model(str(root / "model"))
    docs = []
    (root / "images").mkdir()
    for k, (question, sizes, answer) in enumerate(DOCS):
        paths = []
        for j, (w, h) in enumerate(sizes):
            paths.append(str(root / "images" / f"doc{k}_{j}.png"))
            picture(w, h, seed=10 * k + j).save(paths[-1])
        docs.append({"id": k, "question": question, "images": paths, "answer": answer})
    return root, model, processor, docs


def alone(model, processor, question: str, images, max_slices=None, new: int = NEW):
    """`generate` on one prompt: (raw decoded answer, stripped answer, prompt tokens)."""
    from llava_uhd.serve.generation import GenerationSettings, generate

    prompt = processor.question_prompt(question, num_images=len(images))
    out = generate(model, processor, [prompt], [list(images)], GenerationSettings(max_new_tokens=new),
                   max_slices=max_slices).results[0]
    return processor.tokenizer.decode(out.token_ids, skip_special_tokens=True), out.text, out.prompt_tokens


def load_images(doc):
    from PIL import Image

    return [Image.open(path).convert("RGB") for path in doc["images"]]


def pick_stop(raws: list[str]) -> str:
    """An ASCII letter or digit that one of the answers holds after its first character (so ``until`` cuts it)."""
    for raw in raws:
        for ch in raw.strip()[1:]:
            if ch.isascii() and ch.isalnum():
                return ch
    pytest.fail(f"no answer holds an ASCII letter or digit to stop at: {raws!r}")


def independent_logprob(model, processor, question: str, images, continuation: str) -> tuple[float, int, bool]:
    """Sum of the continuation's token log-probabilities, its token count and whether greedy decoding gives it:
    the prompt + ``answers=`` path (labels on the answer tokens and the EOS, which is left out here), one forward,
    log-softmax of the logits in float64."""
    import torch

    prompt = processor.question_prompt(question, num_images=len(images)) if question else processor.render_chat(
        [{"role": "user", "content": ""}])
    inputs = processor(images=list(images) or None, text=[prompt], answers=[continuation])
    labels = inputs.pop("labels")[0]
    with torch.no_grad():
        logits = model(**inputs).logits[0].double()
    positions = [t for t in range(1, labels.shape[0]) if labels[t] != -100][:-1]  # the closing EOS left out
    logprobs = torch.log_softmax(logits, dim=-1)
    total = sum(float(logprobs[t - 1, labels[t]]) for t in positions)
    greedy = all(int(logits[t - 1].argmax()) == int(labels[t]) for t in positions)
    return total, len(positions), greedy


@pytest.fixture(scope="module")
def cli_run(tiny, tmp_path_factory):
    """lmms-eval's CLI (``python -m lmms_eval``) on four local tasks over ``DOCS``, the model found through an
    ``lmms_eval.models`` entry point (a dist-info folder on PYTHONPATH declaring exactly the package's entry point):
    ``(samples per task, expected answers per task, the stop string)``."""
    root, model, processor, docs = tiny
    work = tmp_path_factory.mktemp("lmms-cli")
    data = work / "test.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    raws = [alone(model, processor, doc["question"], load_images(doc))[0] for doc in docs]
    stop = pick_stop(raws)

    tasks = work / "tasks"
    tasks.mkdir()
    (tasks / "llava_uhd_tiny_tasks.py").write_text(TASK_UTILS)
    common = dict(data=data)
    generation = dict(new=NEW, until=json.dumps([stop]), process_results="process_results")
    (tasks / "tiny_gen.yaml").write_text(
        TASK.format(name="tiny_gen", output_type="generate_until", doc_to_text="doc_to_text", **common)
        + GENERATION.format(extra="", **generation))
    (tasks / "tiny_gen_1slice.yaml").write_text(
        TASK.format(name="tiny_gen_1slice", output_type="generate_until", doc_to_text="doc_to_text", **common)
        + GENERATION.format(extra="  max_slices: 1\n", **generation))  # inside generation_kwargs
    (tasks / "tiny_mc.yaml").write_text(
        TASK.format(name="tiny_mc", output_type="multiple_choice", doc_to_text="doc_to_text", **common)
        + MULTIPLE_CHOICE.format(choices=json.dumps(CHOICES)))
    (tasks / "tiny_rounds.yaml").write_text(
        TASK.format(name="tiny_rounds", output_type="generate_until_multi_round", doc_to_text="rounds_doc_to_text",
                    **common)
        + GENERATION.format(extra="", **{**generation, "until": "[]", "process_results": "rounds_process_results"}))

    plugin = work / "plugin" / "llava_uhd_lmms_test-0.dist-info"
    plugin.mkdir(parents=True)
    (plugin / "METADATA").write_text("Metadata-Version: 2.1\nName: llava-uhd-lmms-test\nVersion: 0\n")
    (plugin / "entry_points.txt").write_text(
        "[lmms_eval.models]\nllava_uhd = llava_uhd.eval.lmms_adapter:lmms_eval_manifest\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(plugin.parent)]
                                                       + [p for p in [os.environ.get("PYTHONPATH")] if p]),
           "HF_HOME": str(work / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    out = work / "out"
    command = [sys.executable, "-m", "lmms_eval", "--model", "llava_uhd",
               "--model_args", f"pretrained={root / 'model'},max_new_tokens=99",
               "--tasks", "tiny_gen,tiny_gen_1slice,tiny_mc,tiny_rounds", "--include_path", str(tasks),
               "--batch_size", "3", "--output_path", str(out), "--log_samples", "--process_docs_parallel", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=work)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    samples = {}
    for name in ("tiny_gen", "tiny_gen_1slice", "tiny_mc", "tiny_rounds"):
        files = sorted(out.rglob(f"*_samples_{name}.jsonl"))
        assert files, (name, sorted(p.name for p in out.rglob("*")), done.stdout[-2000:])
        rows = [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]
        samples[name] = {row["doc_id"]: row for row in rows}
    return samples, stop, done


@pytest.fixture(scope="module")
def adapter(tiny):
    """The adapter in this process, on the tiny model, with the documents as task ``tiny`` (split ``test``)."""
    from llava_uhd.eval.lmms_adapter import LlavaUHDLmms

    root, _, _, docs = tiny
    lm = LlavaUHDLmms(pretrained=str(root / "model"), batch_size=3, max_new_tokens=NEW)
    lm.task_dict = {"tiny": {"test": docs}}
    return lm


def request(kind: str, doc_id: int, context: str, second, *, visuals=True):
    """An lmms-eval `Instance` shaped as lmms-eval's tasks build them (``api/task.py``, construct_requests)."""
    from lmms_eval.api.instance import Instance

    fn = (lambda doc: load_images(doc)) if visuals else None
    return Instance(request_type=kind, arguments=(context, second, fn, doc_id, "tiny", "test"), idx=0,
                    metadata={"task": "tiny", "doc_id": doc_id, "repeats": 1})


def texts(results) -> list:
    return [getattr(r, "text", r) for r in results]


# ------------------------------------------------------------------------------------------------ tests
def test_import_llava_uhd_does_not_load_lmms_eval():
    code = ("import sys, llava_uhd, llava_uhd.eval; "
            "assert 'lmms_eval' not in sys.modules and 'llava_uhd.eval.lmms_adapter' not in sys.modules; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(SRC)})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.skipif(HAVE_LMMS, reason="lmms-eval is installed here: the adapter imports")
def test_without_lmms_eval_the_adapter_says_how_to_install_it():
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'llava-uhd\[eval\]'"):
        import llava_uhd.eval.lmms_adapter  # noqa: F401


@pytest.mark.slow  # lmms-eval's own CLI and evaluator on a tiny model
@needs_lmms
def test_cli_generation_equals_generate_alone_cut_at_until(tiny, cli_run):
    _, model, processor, docs = tiny
    samples, stop, done = cli_run
    assert "llava_uhd" in done.stdout  # the results table names the model
    cut = 0
    for doc in docs:
        raw, _, prompt_tokens = alone(model, processor, doc["question"], load_images(doc))
        expected = raw.split(stop)[0].strip()
        cut += expected != raw.strip()
        row = samples["tiny_gen"][doc["id"]]
        assert row["filtered_resps"] == expected, (doc["id"], raw, stop)
        assert row["token_counts"][0]["input_tokens"] == prompt_tokens
        assert row["exact_match"] == float(expected == doc["answer"])
    assert cut, "the stop string cut no answer"


@pytest.mark.slow  # lmms-eval's own CLI and evaluator on a tiny model
@needs_lmms
def test_cli_max_slices_from_the_task_generation_kwargs(tiny, cli_run):
    _, model, processor, docs = tiny
    samples, stop, _ = cli_run
    fewer = 0
    for doc in docs:
        raw, _, prompt_tokens = alone(model, processor, doc["question"], load_images(doc), max_slices=1)
        row = samples["tiny_gen_1slice"][doc["id"]]
        assert row["filtered_resps"] == raw.split(stop)[0].strip(), doc["id"]
        assert row["token_counts"][0]["input_tokens"] == prompt_tokens
        fewer += prompt_tokens < samples["tiny_gen"][doc["id"]]["token_counts"][0]["input_tokens"]
    assert fewer >= 2  # the documents with images got fewer image tokens


@pytest.mark.slow  # lmms-eval's own CLI and evaluator on a tiny model
@needs_lmms
def test_cli_multiple_choice_scores_are_the_mean_negative_logprob(tiny, cli_run):
    _, model, processor, docs = tiny
    samples, _, _ = cli_run
    for doc in docs:
        row = samples["tiny_mc"][doc["id"]]
        got = [(float(value), str(greedy) == "True") for value, greedy in row["filtered_resps"]]
        expected = []
        for choice in CHOICES:
            total, n, greedy = independent_logprob(model, processor, doc["question"], load_images(doc), " " + choice)
            expected.append((-total / n, greedy))
        assert [g for _, g in got] == [g for _, g in expected]
        assert [v for v, _ in got] == pytest.approx([v for v, _ in expected], rel=1e-4, abs=1e-4)
        best = min(range(len(CHOICES)), key=lambda k: expected[k][0])
        assert row["acc"] == float(CHOICES[best] == doc["answer"])


@pytest.mark.slow  # lmms-eval's own CLI and evaluator on a tiny model
@needs_lmms
def test_cli_multi_round(tiny, cli_run):
    _, model, processor, docs = tiny
    samples, _, _ = cli_run
    for doc in docs:
        images = load_images(doc)
        expected = [alone(model, processor, doc["question"], images)[1], alone(model, processor, SECOND, images)[1]]
        row = samples["tiny_rounds"][doc["id"]]
        assert row["filtered_resps"] == expected, doc["id"]


@pytest.mark.slow  # lmms-eval's own CLI and evaluator on a tiny model
@needs_lmms
def test_batched_equals_one_at_a_time_with_mixed_settings(tiny, adapter):
    _, model, processor, docs = tiny
    kwargs = [{"max_new_tokens": NEW}, {"max_new_tokens": NEW, "max_slices": 1}, {"max_new_tokens": 3},
              {"max_new_tokens": NEW, "temperature": 0.7, "do_sample": False, "top_p": 0, "until": []}]
    requests = [request("generate_until", doc["id"], doc["question"], dict(kw))
                for kw in kwargs for doc in docs]
    adapter.batch_size_per_gpu = 3
    batched = texts(adapter.generate_until(requests))
    adapter.batch_size_per_gpu = 1
    single = texts(adapter.generate_until(requests))
    adapter.batch_size_per_gpu = 3
    assert batched == single
    for k, kw in enumerate(kwargs):
        for doc in docs:
            got = batched[k * len(docs) + doc["id"]]
            assert got == alone(model, processor, doc["question"], load_images(doc), kw.get("max_slices"),
                                kw["max_new_tokens"])[1]


@pytest.mark.slow  # lmms-eval's own CLI and evaluator on a tiny model
@needs_lmms
def test_until_cuts_each_row_at_its_own_first_stop(tiny, adapter):
    _, model, processor, docs = tiny
    raws = [alone(model, processor, doc["question"], load_images(doc), new=12)[0] for doc in docs]
    stops = []
    for raw in raws:  # each row its own stops: an ASCII character of its answer, and one that never comes
        chars = [ch for ch in raw.strip()[1:] if ch.isascii() and ch.isalnum()]
        stops.append([chars[-1], "\u2603never"] if chars else "\u2603never")
    requests = [request("generate_until", doc["id"], doc["question"], {"max_new_tokens": 12, "until": stop})
                for doc, stop in zip(docs, stops)]
    got = texts(adapter.generate_until(requests))
    for raw, stop, answer in zip(raws, stops, got):
        stop = [stop] if isinstance(stop, str) else stop
        cut = min([raw.find(s) for s in stop if s in raw], default=len(raw))
        assert answer == raw[:cut].strip(), (raw, stop)
    assert sum(a != r.strip() for a, r in zip(got, raws)) >= 1


@pytest.mark.slow  # lmms-eval's own CLI and evaluator on a tiny model
@needs_lmms
def test_loglikelihood_equals_logprob_from_the_logits(tiny, adapter):
    _, model, processor, docs = tiny
    cases = [(doc, cont) for doc in docs for cont in (" red", " three circles")]
    requests = [request("loglikelihood", doc["id"], doc["question"], cont) for doc, cont in cases]
    requests.append(request("loglikelihood", 0, "", "red", visuals=False))  # unconditional: empty context
    scored = adapter.continuation_logprobs(requests)
    expected = [independent_logprob(model, processor, doc["question"], load_images(doc), cont) for doc, cont in cases]
    expected.append(independent_logprob(model, processor, "", [], "red"))
    for (total, n, greedy), (e_total, e_n, e_greedy) in zip(scored, expected):
        assert (n, greedy) == (e_n, e_greedy)
        assert total == pytest.approx(e_total, rel=1e-4, abs=1e-4)
    pairs = texts(adapter.loglikelihood(requests))  # likelihood=loss: lmms-eval's convention
    assert [p[0] for p in pairs] == pytest.approx([-t / n for t, n, _ in expected], rel=1e-4, abs=1e-4)
    assert [p[1] for p in pairs] == [g for _, _, g in expected]
    adapter.likelihood = "logprob"
    try:
        assert [p[0] for p in texts(adapter.loglikelihood(requests))] == pytest.approx(
            [t for t, _, _ in expected], rel=1e-4, abs=1e-4)
    finally:
        adapter.likelihood = "loss"


@pytest.mark.slow  # lmms-eval's own CLI and evaluator on a tiny model
@needs_lmms
def test_unknown_model_arguments_and_video_are_refused(tiny, adapter):
    from llava_uhd.eval.lmms_adapter import LlavaUHDLmms

    root = tiny[0]
    with pytest.raises(ValueError, match="unknown model argument.*max_slice"):
        LlavaUHDLmms(pretrained=str(root / "model"), max_slice=3)
    with pytest.raises(ValueError, match="batch_size=auto"):
        LlavaUHDLmms(pretrained=str(root / "model"), batch_size="auto")
    video = root / "clip.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    from lmms_eval.api.instance import Instance

    bad = Instance(request_type="generate_until", idx=0, metadata={"task": "tiny", "doc_id": 0, "repeats": 1},
                   arguments=("What?", {"max_new_tokens": 2}, lambda doc: [str(video)], 0, "tiny", "test"))
    with pytest.raises(ValueError, match=r"tiny doc 0: visual 0: .*reads images"):
        adapter.generate_until([bad])


@pytest.mark.slow  # lmms-eval's own CLI and evaluator on a tiny model
@needs_lmms
def test_answer_budget_is_cut_to_the_context_left(tiny, adapter):
    _, model, processor, docs = tiny
    doc = docs[0]
    limit = model.config.text_config.max_position_embeddings
    _, _, prompt_tokens = alone(model, processor, doc["question"], load_images(doc), new=1)
    before = adapter.clamped
    got = texts(adapter.generate_until([request("generate_until", 0, doc["question"], {"max_new_tokens": 10_000})]))
    assert adapter.clamped == before + 1
    assert got == [alone(model, processor, doc["question"], load_images(doc), new=limit - prompt_tokens)[1]]
    with pytest.raises(ValueError, match=r"tiny doc 0: the prompt is \d+ tokens .* no room for an answer"):
        adapter.generate_until([request("generate_until", 0, "colour " * limit, {"max_new_tokens": 4})])
