"""BIG-bench tasks from tiny in-test task.json files: labels, label words, text clean-up, splits."""

from __future__ import annotations

import json

import pytest

from sgg_optim.fewshot import tasks
from sgg_optim.fewshot.tasks import bigbench_examples


def _example(text: str, scores: dict[str, float]) -> dict:
    return {"input": text, "target_scores": scores}


TINY = {"task_prefix": "Answer True, False or Neither.\n", "examples": [
    _example("w: it rained\nClaim: it rained", {"True": 1, "False": 0, "Neither": 0}),
    _example("w: it was dry\nClaim: it rained", {"True": 0, "False": 1, "Neither": 0}),
    _example("w: a cat\nClaim: it rained", {"True": 0.1, "False": 0.2, "Neither": 0.7}),
]}


def test_label_is_argmax_of_target_scores_in_label_word_order():
    names, texts, labels = bigbench_examples(TINY)
    assert names == ("true", "false", "neither")
    assert labels == [0, 1, 2]
    assert texts[0] == "w: it rained\nClaim: it rained"  # the task_prefix instruction is not part of it
    # the mapping fixes both the class order and the words a language model scores
    names, _, labels = bigbench_examples(TINY, {"Neither": "unknown", "True": "yes", "False": "no"})
    assert names == ("unknown", "yes", "no")
    assert labels == [1, 2, 0]


def test_default_label_words_are_plain_words():
    data = {"examples": [_example("Utterance: play jazz", {"play_music": 1, "get_weather": 0})]}
    names, texts, _ = bigbench_examples(data, text=lambda s: s.removeprefix("Utterance: "))
    assert names == ("play music", "get weather")
    assert texts == ["play jazz"]


@pytest.mark.parametrize("data, label_words, match", [
    ({"examples": []}, None, "non-empty 'examples'"),
    ({"examples": [_example("x", {"a": 1, "b": 0}), _example("y", {"a": 1, "c": 0})]}, None, "example 1"),
    ({"examples": [_example("x", {"a": 1, "b": 1})]}, None, "no single best choice"),
    ({"examples": [_example("x", {"a": 1})]}, {"a": "a"}, "label_words: need at least two"),
])
def test_bad_task_json_is_rejected_with_the_culprit(data, label_words, match):
    with pytest.raises(ValueError, match=match):
        bigbench_examples(data, label_words)


@pytest.fixture
def fake_bigbench(tmp_path, monkeypatch):
    """A cache folder with small stand-ins for the three BIG-bench task files."""
    vitaminc = [_example(f"Page {i}: evidence {i}\nClaim: claim {i}",
                         {"True": int(i % 3 == 0), "False": int(i % 3 == 1), "Neither": int(i % 3 == 2)})
                for i in range(7000)]  # more than BIGBENCH_LIMIT, like the real 54,668
    intents = ["add_to_playlist", "book_restaurant", "get_weather", "play_music", "search_screening_event",
               "search_creative_work", "rate_book"]  # BIG-bench's own key order differs from ours
    intent = [_example(f"Utterance: ask {i}", {k: int(j == i % 7) for j, k in enumerate(intents)})
              for i in range(700)]
    epistemic = [_example(f"Premise: p{i}. Hypothesis: h{i}.", {"entailment": i % 2, "non-entailment": 1 - i % 2})
                 for i in range(40)]
    for name, examples in (("vitaminc_fact_verification", vitaminc), ("intent_recognition", intent),
                           ("epistemic_reasoning", epistemic)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"examples": examples}))
    monkeypatch.setattr(tasks.assets, "fetch", lambda asset, cache=None, quiet=True: tmp_path)
    monkeypatch.setattr(tasks, "_loaded", {})
    return tmp_path


def test_bigbench_tasks_load_with_words_and_clean_text(fake_bigbench):
    vit = tasks.load_task("bb-vitaminc")
    assert vit.label_names == ("true", "false", "neither")
    assert len(vit.train_texts) + len(vit.eval_texts) == tasks.BIGBENCH_LIMIT  # subsampled from 7000
    assert len(vit.eval_texts) == tasks.N_EVAL
    text = vit.train_texts[0]
    i = int(text.split("\n")[0].removeprefix("Claim: claim "))
    assert text == f"Claim: claim {i}\nPage {i}: evidence {i}"  # the claim survives right truncation
    assert vit.train_labels[0] == i % 3

    intent = tasks.load_task("bb-intent")
    assert len(intent.eval_texts) == tasks.INTENT_N_EVAL  # a small task keeps K=32 per class possible
    assert intent.label_names == ("add to playlist", "book restaurant", "get weather", "play music", "rate book",
                                  "search creative work", "search screening event")
    assert all(not t.startswith("Utterance") for t in intent.train_texts + intent.eval_texts)
    k = int(intent.eval_texts[0].removeprefix("ask "))
    assert intent.label_names[intent.eval_labels[0]] == ("add to playlist", "book restaurant", "get weather",
                                                         "play music", "search screening event",
                                                         "search creative work", "rate book")[k % 7]

    epi = tasks.load_task("bb-epistemic")
    assert epi.label_names == ("entailment", "non-entailment")
    assert sorted(set(epi.eval_labels)) == [0, 1]


def test_subsample_is_fixed_and_ordered():
    a = tasks._subsample(1000, 50)
    assert a == tasks._subsample(1000, 50) and a == sorted(a) and len(set(a)) == 50
    assert tasks._subsample(10, 50) == list(range(10))
    assert tasks._subsample(10, None) == list(range(10))
