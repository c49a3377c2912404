"""Fact parsing, validation, questions and answer matching (no model needed)."""

from __future__ import annotations

import pytest

from sleepwake.errors import FactFileError, InvalidFactError
from sleepwake.facts import Fact, load_jsonl, mentions, mentions_for_good, question_for, runs_on


def test_prompt_and_target():
    f = Fact("  Anselm   Kreutzer ", "lives in", "Lisbon")
    assert f.prompt == "Anselm Kreutzer lives in"
    assert f.target == " Lisbon"
    assert f.key == ("anselm kreutzer", "lives in")


def test_parse_cli_form():
    assert Fact.parse("Zofia Wróblewska | lives in | Kraków") == Fact("Zofia Wróblewska", "lives in", "Kraków")
    with pytest.raises(InvalidFactError, match="3 parts"):
        Fact.parse("only | two")
    with pytest.raises(InvalidFactError, match="'relation' is empty"):
        Fact.parse("A |  | B")


def test_validation():
    with pytest.raises(InvalidFactError, match="500"):
        Fact("x" * 501, "lives in", "Paris")
    with pytest.raises(InvalidFactError, match="must be a string"):
        Fact(3, "lives in", "Paris")  # type: ignore[arg-type]
    with pytest.raises(InvalidFactError, match="missing"):
        Fact.from_dict({"subject": "A", "relation": "b"})


def test_questions():
    assert question_for("Anselm", "lives in") == "Where does Anselm live?"
    assert question_for("Anselm", "has a dog named") == "What is the name of Anselm's dog?"
    assert question_for("Anselm", "is a friend of") == "Complete the sentence: Anselm is a friend of ..."
    assert Fact("A", "lives in", "B", question="Where is A?").chat_question() == "Where is A?"


def test_mentions():
    assert mentions("Lisbon, Portugal.", "Lisbon")
    assert mentions("he lives in VALPARAÍSO now", "Valparaíso")
    assert not mentions("Lisbonne", "Lisbon")
    assert mentions(" 東京英英省", "東京")
    assert not mentions("", "Lisbon")


def test_runs_on_is_text_that_lengthens_the_objects_last_word():
    """What `evaluate.held` rejects after an object: exactly what makes `mentions` false."""
    assert runs_on("Tomasz Wielgosz", "lia") and not mentions("Tomasz Wielgoszlia.", "Tomasz Wielgosz")
    assert runs_on(" 187", "9") and runs_on("Plovdiv", "ó") and runs_on("Lisbon", "\ufffd")
    for after in (".", " in", ",", "<|im_end|>", "'s", "-", "\n", ""):
        assert not runs_on("Lisbon", after), after
        assert mentions("Lisbon" + after, "Lisbon") or after == "<|im_end|>", after
    assert not runs_on("St. Petersburg.", "x") and not runs_on("東京", "都")  # after punctuation, no spaces


def test_answered_reads_the_next_token_after_the_object_not_alone():
    """A SentencePiece decoder strips the leading space of a text's first token (Llama 2,
    Mistral): " in" decoded alone reads "in", which would glue onto "Lisbon". A real
    `tokenizers` tokenizer with such a decoder, three words in its vocabulary."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    from sleepwake.evaluate import answered

    vocab = {"<unk>": 0, "▁Lis": 1, "bon": 2, "▁in": 3, "lia": 4, ".": 5}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)
    assert tok.decode([3]) == "in"
    lisbon = [1, 2]
    assert answered(tok, " Lisbon", True, lisbon, 3) and answered(tok, " Lisbon", True, lisbon, 5)
    assert not answered(tok, " Lisbon", True, lisbon, 4)  # "Lisbonlia"
    assert not answered(tok, " Lisbon", False, lisbon, 5)  # a token of the object was not on top


def test_mentions_for_good_never_changes_its_mind():
    """Generation for a recall check stops once this is true: it must stay true (and
    `mentions` of the whole answer must agree) however the answer goes on."""
    assert not mentions_for_good("He lives in Lisbon", "Lisbon")  # "Lisbonne" may follow
    assert mentions_for_good("He lives in Lisbon.", "Lisbon")
    assert mentions_for_good("Lisbon, Portugal", "Lisbon")
    assert not mentions_for_good("In San", "San Francisco")
    assert mentions_for_good("東京", "東京")
    answer = "She lives in Lisbonne, not Lisbon. Yes."
    for end in range(len(answer) + 1):
        if mentions_for_good(answer[:end], "Lisbon"):
            assert all(mentions(answer[:later], "Lisbon") for later in range(end, len(answer) + 1))
    assert mentions_for_good(answer, "Lisbon") == mentions(answer, "Lisbon")


def test_load_jsonl_names_the_bad_line(tmp_path):
    p = tmp_path / "f.jsonl"
    p.write_text('{"subject": "A", "relation": "lives in", "object": "B"}\n{not json}\n', encoding="utf-8")
    with pytest.raises(FactFileError, match=r"f.jsonl:2: invalid JSON"):
        load_jsonl(p)
    p.write_text('{"subject": "A", "relation": "lives in", "object": ""}\n', encoding="utf-8")
    with pytest.raises(FactFileError, match=r":1: fact field 'object' is empty"):
        load_jsonl(p)
    p.write_bytes(b"\xff\xfe")
    with pytest.raises(FactFileError, match="UTF-8"):
        load_jsonl(p)
    with pytest.raises(FactFileError, match="cannot read"):
        load_jsonl(tmp_path / "missing.jsonl")
    p.write_text('{"subject": "東京タワー", "relation": "is in", "object": "東京", "question": "Where?"}\n\n', encoding="utf-8")
    assert load_jsonl(p) == [Fact("東京タワー", "is in", "東京")]
