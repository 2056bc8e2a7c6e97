"""Answer metrics on hand-computed examples, and the ``mllm-evaluate`` command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from umedpt.cli import main
from umedpt.mllm.metrics import (
    answer_iou,
    evaluate_records,
    exact_match,
    markdown_table,
    score_records,
    text_scores,
    token_f1,
)


def record(task: str, answer: str, prediction: str, dataset: str = "d", **kw) -> dict:
    return {"task": task, "dataset": dataset, "answer": answer, "prediction": prediction, **kw}


def test_token_f1_and_exact_match():
    # normalised: [nodule, is, large] vs [large, nodule] -> P 2/3, R 1
    assert token_f1("The nodule is large", "a large nodule.") == pytest.approx(0.8)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1("a b", "c") == 0.0
    assert exact_match("Yes.", "yes") == 1.0 and exact_match("no", "yes") == 0.0


def test_bleu_and_rouge():
    scores = text_scores(["a b c d"], ["a b e f"])
    assert scores["bleu1"] == pytest.approx(0.5)  # 2 of 4 unigrams, same length
    assert scores["bleu2"] == pytest.approx(math.sqrt(0.5 * 1 / 3))  # 1 of 3 bigrams
    assert scores["bleu3"] == 0.0
    assert scores["rouge1"] == pytest.approx(0.5)
    assert scores["rouge2"] == pytest.approx(1 / 3)
    assert scores["rougeL"] == pytest.approx(0.5)  # longest common subsequence "a b"
    # corpus BLEU: clipped unigram matches 1 + 1 of 3, no brevity penalty
    assert text_scores(["yes", "a b"], ["yes", "a c"])["bleu1"] == pytest.approx(2 / 3)
    # brevity penalty exp(1 - 2 / 1)
    assert text_scores(["a"], ["a b"])["bleu1"] == pytest.approx(math.exp(-1))


def test_rec_iou_recall_and_unparsable_answers():
    assert answer_iou("{<0><0><50><50>}", "{<0><0><50><100>}") == pytest.approx(0.5)
    assert answer_iou("the liver", "{<0><0><50><100>}") == 0.0
    with pytest.raises(ValueError, match="holds no"):
        answer_iou("{<0><0><1><1>}", "liver")
    rows = [
        record("refer", "{<0><0><50><100>}", "{<0><0><50><50>}"),
        record("refer", "{<0><0><50><100>}", "somewhere on the left"),
        record("refer", "{<10><10><20><20>}", "{<10><10><20><20>}"),
    ]
    scores = score_records(rows)
    assert scores["iou"] == pytest.approx(0.5) and scores["recall@0.5"] == pytest.approx(2 / 3)
    assert scores["closed_accuracy"] is None


def test_closed_question_accuracy_counts_only_closed_questions():
    rows = [record("vqa", "yes", "yes"), record("vqa", "no", "yes"), record("vqa", "left lung", "left lung")]
    scores = score_records(rows)
    assert scores["closed_accuracy"] == pytest.approx(0.5)
    assert scores["exact_match"] == pytest.approx(2 / 3)
    assert scores["iou"] is None
    assert score_records([record("cls", "melanoma", "Melanoma")])["closed_accuracy"] == 1.0


def test_rows_per_task_and_dataset():
    rows = evaluate_records(
        [
            record("vqa", "yes", "yes", "a"),
            record("vqa", "no", "yes", "b"),
            record("caption", "clear lungs", "clear lungs", "c"),
        ]
    )
    keys = [(r["task"], r["dataset"], r["n"]) for r in rows]
    assert keys == [("caption", "c", 1), ("vqa", "a", 1), ("vqa", "b", 1), ("vqa", "all", 2)]
    assert rows[-1]["closed_accuracy"] == pytest.approx(0.5)
    table = markdown_table(rows)
    assert table.splitlines()[0].startswith("| task | dataset | n | bleu1")
    assert "| vqa | all | 2 | " in table and "| 50.0 |" in table


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_evaluate_command_writes_json_markdown_and_routing_plot(tmp_path, capsys):
    rows = [
        record("vqa", "yes", "yes", id="1", routing=[0.5, 0.5]),
        record("refer", "{<0><0><50><100>}", "{<0><0><50><50>}", id="2", routing=[0.9, 0.1]),
        record("qa", "ct slice", "ct", id="3", routing=None),
    ]
    predictions = write_jsonl(tmp_path / "predictions.jsonl", rows)
    assert main(["mllm-evaluate", predictions, "--output_dir", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [r["task"] for r in report["rows"]] == ["qa", "refer", "vqa"]
    assert report["routing"] == {"vqa": [0.5, 0.5], "refer": [0.9, 0.1]}
    assert (tmp_path / "out" / "routing_weights_predict.png").stat().st_size > 1000
    assert "| refer | d | 1 |" in (tmp_path / "out" / "metrics.md").read_text()
    assert "| refer | d | 1 |" in capsys.readouterr().out


def test_evaluate_command_takes_references_by_id(tmp_path):
    bare = [{"id": "7", "task": "cls", "dataset": "d", "prediction": "mass"}]
    predictions = write_jsonl(tmp_path / "p.jsonl", bare)
    refs = [{"id": "7", "image": None, "task": "cls", "instruction": "q", "answer": "Mass", "dataset": "d"}]
    references = write_jsonl(tmp_path / "r.jsonl", refs)
    assert main(["mllm-evaluate", predictions, "--references", references]) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["rows"][0]["closed_accuracy"] == 1.0
    with pytest.raises(ValueError, match="no reference answer"):
        main(["mllm-evaluate", predictions])


def test_evaluate_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["mllm-evaluate", "--help"])
    assert exit_info.value.code == 0
    assert "predictions JSONL" in capsys.readouterr().out


def test_routing_plot_names_the_text_only_tasks_it_has_no_row_for(tmp_path):
    from umedpt.mllm.plots import plot_routing, text_only_note

    weights = {"vqa": [0.7, 0.3], "caption": [0.2, 0.8]}
    note = text_only_note(weights)
    assert note is not None and "[qa]" in note and "text-only" in note
    assert text_only_note({**weights, "qa": [0.5, 0.5]}) is None
    missing = text_only_note({**weights, "qa": [0.5, 0.5]}, ["vqa", "refer", "caption"])
    assert missing is not None and "[refer]" in missing and "[vqa]" not in missing and "text-only" not in missing
    path = plot_routing(weights, tmp_path / "r.png", note=note)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_names_file_line_and_id_of_bad_records(tmp_path):
    good = {"id": "a", "task": "vqa", "dataset": "d", "answer": "yes", "prediction": "yes"}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + '{"id": "b", "task": "vqa",\n')  # line 2 is blank
    with pytest.raises(ValueError, match=r"p\.jsonl:3: not valid JSON: Expecting property name enclosed in double "
                                         r"quotes at column 27"):
        main(["mllm-evaluate", str(path)])
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "b", "prediction": None}) + "\n")
    with pytest.raises(ValueError, match=r"p\.jsonl:2 \(id 'b'\): prediction must be a string, got null"):
        main(["mllm-evaluate", str(path)])
    path.write_text(json.dumps(good) + "\n[1, 2]\n")
    with pytest.raises(ValueError, match=r"p\.jsonl:2: expected a JSON object, got list"):
        main(["mllm-evaluate", str(path)])
    unanswered = [good, *({k: v for k, v in good.items() if k != "answer"} | {"id": i} for i in ("c", "d"))]
    predictions = write_jsonl(path, unanswered)
    with pytest.raises(ValueError, match=r"2 predictions of .*p\.jsonl have no reference answer \(ids \['c', 'd'\]\); "
                                         r"add 'answer' to them or give --references"):
        main(["mllm-evaluate", predictions])
    refs = write_jsonl(tmp_path / "r.jsonl", [{"id": "a", "image": None, "task": "vqa", "instruction": "q",
                                               "answer": "yes", "dataset": "d"}])
    with pytest.raises(ValueError, match=r"2 predictions of .*p\.jsonl have no reference in .*r\.jsonl \(ids \['c', 'd'\]\)"):
        main(["mllm-evaluate", predictions, "--references", refs])
