"""The Uni-Med evaluation protocol on hand-made cases: each difference from umedpt's protocol
(docs/mllm.md) is one test that scores the same records both ways."""

import json
import math

import pytest

from umedpt.mllm import coco_caption, unimed
from umedpt.mllm.metrics import evaluate_records


def record(task, prediction, answer, dataset="d", **extra):
    return {"task": task, "dataset": dataset, "prediction": prediction, "answer": answer, **extra}


def row(rows, subset="all", dataset="d"):
    return next(r for r in rows if r["dataset"] == dataset and r.get("subset", "all") == subset)


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("Two", "2"),  # number words become digits
        ("None", "0"),  # ... and "none" means zero
        ("The left lung", "left lung"),  # articles go
        ("dont know", "don't know"),  # contractions get their apostrophe back
        ("its well", "its well"),  # ... unless the spelling is a word
        ("left-lung", "left lung"),  # punctuation between words becomes a space
        ("left - lung", "left lung"),  # ... or is deleted when it stands next to a space
        ("1,000 cells", "1000 cells"),  # digit groups join
        ("size 3.5.", "size 3.5"),  # a period not followed by a digit goes
        ("Yes, there is.", "yes there is"),
    ],
)
def test_normalize_word(text, normalised):
    assert unimed.normalize_word(text) == normalised


def test_closed_questions_are_a_substring_test():
    rows = {p: evaluate_records([record("vqa", "yes, there is a nodule", "yes")], protocol=p, meteor=False) for p in ("umedpt", "unimed")}
    assert row(rows["umedpt"])["closed_accuracy"] == 0.0  # exact match
    assert row(rows["unimed"])["closed_accuracy"] == 1.0  # "yes" is in the prediction
    assert row(rows["unimed"], "closed")["n"] == 1
    assert not [r for r in rows["unimed"] if r["subset"] == "open"]  # no open question, no row


def test_number_words_and_none_match_digits():
    records = [record("cls", "Two", "2"), record("cls", "none", "0")]
    assert row(evaluate_records(records, meteor=False))["exact_match"] == 0.0
    assert row(evaluate_records(records, protocol="unimed", meteor=False))["accuracy"] == 1.0


def test_cls_accuracy_is_equality_not_substring():
    records = [record("cls", "grade 2 or grade 3", "grade 2")]
    assert row(evaluate_records(records, protocol="unimed", meteor=False))["accuracy"] == 0.0


def test_short_answer_bleu_is_the_mean_of_sentence_bleu():
    records = [record("vqa", "left lung", "left lung"), record("vqa", "heart", "right lung")]
    ours = row(evaluate_records(records, meteor=False))
    theirs = row(evaluate_records(records, protocol="unimed", meteor=False))
    assert theirs["bleu1"] == pytest.approx(0.5)  # (1 + 0) / 2
    # corpus BLEU-1: 2 of 3 predicted tokens match, brevity penalty exp(1 - 4 / 3)
    assert ours["bleu1"] == pytest.approx(2 / 3 * math.exp(1 - 4 / 3), abs=1e-6)


def test_punctuation_tokens_count_in_umedpt_bleu_only():
    records = [record("identify", "liver.", "liver")]
    assert row(evaluate_records(records, meteor=False))["bleu1"] < 1.0  # "liver" "." vs "liver"
    assert row(evaluate_records(records, protocol="unimed", meteor=False))["bleu1"] == pytest.approx(1.0)


def test_f1_counts_repeated_words_of_the_prediction():
    # SQuAD F1: 2 common tokens of 3 -> 2/3; Uni-Med: every predicted word occurs in the reference -> 1
    records = [record("vqa", "left left lung", "left lung lung")]
    assert row(evaluate_records(records, meteor=False))["token_f1"] == pytest.approx(2 / 3)
    assert row(evaluate_records(records, protocol="unimed", meteor=False))["f1"] == pytest.approx(1.0)
    assert unimed.token_f1("", "lung") == 0.0 and unimed.token_f1("heart", "lung") == 0.0


def test_box_must_start_the_answer():
    records = [record("refer", "the box is {<10><10><50><50>}", "{<10><10><50><50>}")]
    assert row(evaluate_records(records, meteor=False))["iou"] == pytest.approx(1.0)  # found anywhere
    assert row(evaluate_records(records, protocol="unimed", meteor=False))["iou"] == 0.0
    spaced = [record("refer", "{<10> <10> <50> <50>}", "{<10><10><50><50>}")]
    assert row(evaluate_records(spaced, protocol="unimed", meteor=False))["iou"] == pytest.approx(1.0)


def test_coordinates_above_the_grid_are_kept():
    records = [record("refer", "{<0><0><150><100>}", "{<0><0><100><100>}")]
    assert row(evaluate_records(records, meteor=False))["iou"] == 0.0  # refused: unparsable
    theirs = row(evaluate_records(records, protocol="unimed", meteor=False))
    assert theirs["iou"] == pytest.approx(101 * 101 / (151 * 101))


def test_iou_counts_pixels_inclusively_and_recall_is_strict():
    records = [record("refer", "{<0><0><4><9>}", "{<0><0><9><9>}")]
    ours = row(evaluate_records(records, meteor=False))
    theirs = row(evaluate_records(records, protocol="unimed", meteor=False))
    assert ours["iou"] == pytest.approx(4 * 9 / (9 * 9))
    assert theirs["iou"] == pytest.approx(5 * 10 / (10 * 10))  # exactly 0.5 ...
    assert theirs["recall@0.5"] == 0.0  # ... which is not above 0.5
    half = [record("refer", "{<0><0><5><10>}", "{<0><0><10><10>}")]
    assert row(evaluate_records(half, meteor=False))["recall@0.5"] == 1.0  # IoU 0.5 >= 0.5
    # the +1 pixel matters less on a finer pixel grid
    fine = row(evaluate_records(records, protocol="unimed", image_size=1000, meteor=False))["iou"]
    assert fine == pytest.approx(41 * 91 / (91 * 91))
    sized = [record("refer", "{<0><0><4><9>}", "{<0><0><9><9>}", width=1000, height=1000)]
    assert row(evaluate_records(sized, protocol="unimed", meteor=False))["iou"] == pytest.approx(fine)


def test_empty_captions_are_skipped_not_scored_zero():
    records = [record("caption", "clear lungs", "clear lungs"), record("caption", "", "small nodule")]
    ours = row(evaluate_records(records, meteor=False))
    assert ours["rouge1"] == pytest.approx(0.5)  # 1 and 0
    if coco_caption.unavailable():
        pytest.skip(f"COCO caption metrics unavailable: {coco_caption.unavailable()}")
    theirs = row(evaluate_records(records, protocol="unimed", meteor=False))
    assert theirs["n"] == 2 and theirs["n_scored"] == 1
    assert theirs["rouge1"] == pytest.approx(1.0) and theirs["f1"] == pytest.approx(1.0)


def test_open_and_closed_subsets():
    records = [
        record("vqa", "yes", "yes"),
        record("vqa", "left lung", "right lung", answer_type="OPEN"),
        record("vqa", "no", "liver", answer_type="CLOSED"),  # the record's own answer type wins
    ]
    rows = evaluate_records(records, protocol="unimed", meteor=False)
    assert {r["subset"]: r["n"] for r in rows} == {"all": 3, "open": 1, "closed": 2}
    assert row(rows, "closed")["closed_accuracy"] == 0.5
    assert row(rows, "open")["closed_accuracy"] is None
    assert row(rows, "open")["f1"] == pytest.approx(0.5)


@pytest.mark.skipif(coco_caption.unavailable() is not None, reason=f"{coco_caption.unavailable()}")
def test_meteor_is_offline_with_wordnet_synonyms():
    refs = ["the heart is big", "the heart is big", "the heart is big"]
    exact, synonym, wrong = (
        coco_caption.meteor([p], [r])
        for p, r in zip(["the heart is big", "the heart is large", "the liver is green"], refs, strict=True)
    )
    assert exact > 0.9
    assert wrong < synonym < exact  # "large" matches "big" through WordNet
    rows = evaluate_records([record("caption", "the heart is large", "the heart is big")])
    assert row(rows)["meteor"] == pytest.approx(synonym, abs=1e-6)
    assert row(evaluate_records([record("vqa", "yes", "yes")]))["meteor"] is None  # captions only


def test_unimed_command_writes_the_protocol_and_subsets(tmp_path, capsys):
    from umedpt.cli import main

    path = tmp_path / "predictions.jsonl"
    lines = [record("vqa", "yes, it is", "yes", id="1"), record("cls", "Two", "2", id="2")]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert main(["mllm-evaluate", str(path), "--protocol", "unimed", "--meteor", "false"]) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["protocol"] == "unimed"
    assert [(r["task"], r["subset"]) for r in report["rows"]] == [("cls", "all"), ("vqa", "all"), ("vqa", "closed")]
    table = (tmp_path / "metrics.md").read_text()
    assert "Protocol: unimed" in table and "| subset |" in table and "meteor" in table
    with pytest.raises(SystemExit):
        main(["mllm-evaluate", str(path), "--protocol", "uni-med"])
    assert "uni-med" in capsys.readouterr().err
