"""Fact extraction from chat turns: rules, the strict model parser, and the corpus score."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from sleepwake.extract import (
    ConversationState,
    ModelExtractor,
    RuleExtractor,
    extract_facts,
    extract_turn,
    is_list_relation,
    join_items,
    make_extractor,
    split_items,
)
from sleepwake.facts import Fact, question_for

DATA = Path(__file__).parent / "data"
BENCHMARK = Path(__file__).parent.parent / "benchmarks" / "extraction.py"


def triples(message: str, state: ConversationState | None = None) -> set[tuple[str, str, str]]:
    return {(f.subject, f.relation, f.object) for f in extract_facts(message, state)}


def _benchmark():
    spec = importlib.util.spec_from_file_location("extraction_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("message, expected", [
    ("My name is Maria.", {("the user", "is named", "Maria")}),
    ("I'm 27 years old.", {("the user", "is aged", "27")}),
    ("I live in Lisbon.", {("the user", "lives in", "Lisbon")}),
    ("I work as a nurse.", {("the user", "works as", "a nurse")}),
    ("I'm an engineer at Siemens.", {("the user", "works as", "an engineer"), ("the user", "works at", "Siemens")}),
    ("I study biology at the University of Lisbon.",
     {("the user", "studies", "biology"), ("the user", "studies at", "the University of Lisbon")}),
    ("I was born in Porto.", {("the user", "was born in", "Porto")}),
    ("I speak Portuguese, Spanish and English.",
     {("the user", "speaks", "Portuguese"), ("the user", "speaks", "Spanish"), ("the user", "speaks", "English")}),
    ("I have a dog named Rex and a cat called Mia.",
     {("the user", "has a dog named", "Rex"), ("the user", "has a cat named", "Mia")}),
    ("I have a rabbit.", {("the user", "has a pet", "rabbit")}),
    ("I like jazz and I hate olives.", {("the user", "likes", "jazz"), ("the user", "hates", "olives")}),
    ("I don't like mushrooms.", {("the user", "dislikes", "mushrooms")}),
    ("My favourite colour is purple.", {("the user", "favorite color is", "purple")}),
    ("I'm allergic to peanuts.", {("the user", "is allergic to", "peanuts")}),
    ("I drive a Fiat Panda and I play the violin.",
     {("the user", "drives", "a Fiat Panda"), ("the user", "plays the", "violin")}),
    ("Gdańsk is lovely, I moved to Kraków.", {("the user", "lives in", "Kraków")}),
    ("I live in 東京 and I was born in São Paulo.",
     {("the user", "lives in", "東京"), ("the user", "was born in", "São Paulo")}),
])
def test_first_person_facts(message, expected):
    assert triples(message) == expected


def test_family_members_become_subjects_linked_to_the_user():
    state = ConversationState(user_name="Maria")
    assert triples("My sister Ana lives in Porto.", state) == {
        ("Maria", "has a sister named", "Ana"), ("Ana", "lives in", "Porto")}
    assert triples("My husband is called Tom and he works at IBM.", state) == {
        ("Maria", "is married to", "Tom"), ("Tom", "works at", "IBM")}
    assert triples("My dad is a carpenter.", state) == {("Maria's father", "works as", "a carpenter")}
    assert triples("I have a son named Leo. He is 6.", state) == {
        ("Maria", "has a son named", "Leo"), ("Leo", "is aged", "6")}


@pytest.mark.parametrize("message, expected", [
    ("My partner, Sam, is a chef.", {("the user", "has a partner named", "Sam"), ("Sam", "works as", "a chef")}),
    ("My older brother Jamal works for the UN.",
     {("the user", "has a brother named", "Jamal"), ("Jamal", "works at", "the UN")}),
    ("My mother-in-law is 70.", {("the user's mother-in-law", "is aged", "70")}),
    ("Pedro's cat is called Nube.", {("Pedro", "has a cat named", "Nube")}),
    ("Our dog, Bolt, is 3.", {("the user", "has a dog named", "Bolt"), ("Bolt", "is aged", "3")}),
])
def test_relatives_in_other_shapes(message, expected):
    assert triples(message) == expected


@pytest.mark.parametrize("message, expected", [
    ("Just moved to Tromsø!", {("the user", "lives in", "Tromsø")}),
    ("Currently living in Quito, working at a hospital.",
     {("the user", "lives in", "Quito"), ("the user", "works at", "a hospital")}),
    ("Hello, Dave here.", {("the user", "is named", "Dave")}),
    ("Name's Rui.", {("the user", "is named", "Rui")}),
    ("I was born in Accra on 1 May 1990.", {("the user", "was born in", "Accra"), ("the user", "was born on", "1 May 1990")}),
    ("I've got a shellfish allergy.", {("the user", "is allergic to", "shellfish")}),
    ("My car's an old Saab.", {("the user", "drives", "an old Saab")}),
    ("I'm a huge Benfica fan.", {("the user", "likes", "Benfica")}),
    ("Polish is my first language.", {("the user", "speaks", "Polish")}),
    ("I'm 40 and retired.", {("the user", "is aged", "40")}),
    ("My mother tongue is Catalan.", {("the user", "speaks", "Catalan")}),  # not "<user>'s mother"
    ("I've worked as a welder for 20 years.", {("the user", "works as", "a welder")}),
])
def test_chat_shorthand_and_other_phrasings(message, expected):
    assert triples(message) == expected


def test_a_list_with_a_possessive_item_is_not_a_list_of_things():
    assert triples("I adore my cat, Pixel.") == set()  # not (user, likes, Pixel)
    assert triples("We've just moved to Wellington.") == {("the user", "lives in", "Wellington")}  # not "owns"


def test_third_person_statements():
    assert triples("Carlos works at Siemens and speaks German.") == {
        ("Carlos", "works at", "Siemens"), ("Carlos", "speaks", "German")}
    assert triples("Zofia Wróblewska was born in Kraków.") == {("Zofia Wróblewska", "was born in", "Kraków")}
    assert triples("He lives in Paris.") == set()  # nobody for "he" to refer to


def test_stated_name_becomes_the_subject_for_the_rest_of_the_conversation():
    state = ConversationState()
    assert triples("Hi, I'm Jonas and I live in Oslo.", state) == {
        ("the user", "is named", "Jonas"), ("Jonas", "lives in", "Oslo")}
    assert state.user_name == "Jonas" and state.subject == "Jonas"
    assert triples("I'm allergic to cats.", state) == {("Jonas", "is allergic to", "cats")}


def test_he_and_she_refer_to_the_last_person_named_in_an_earlier_message():
    state = ConversationState()
    assert ("Tiago", "lives in", "Luanda") in triples("My brother Tiago lives in Luanda.", state)
    assert triples("He works as a dentist.", state) == {("Tiago", "works as", "a dentist")}
    assert triples("I'm 34.", state) == {("the user", "is aged", "34")}  # the user does not change who "he" is
    assert triples("He plays the cello.", state) == {("Tiago", "plays the", "cello")}
    assert triples("He plays the cello.", ConversationState()) == set()  # nobody named yet


def test_list_valued_relations_and_their_objects():
    assert is_list_relation("speaks") and is_list_relation("has a sister named") and not is_list_relation("lives in")
    assert split_items("English, French and Spanish") == ["English", "French", "Spanish"]
    assert join_items(["English"]) == "English" and join_items(["English", "French"]) == "English and French"
    assert join_items(split_items("Welsh, Basque and Irish")) == "Welsh, Basque and Irish"


def test_default_subject_is_configurable():
    state = ConversationState(default_subject="my user")
    assert triples("I live in Lyon.", state) == {("my user", "lives in", "Lyon")}
    assert triples("Call me Ben.", state) == {("my user", "is named", "Ben")}
    assert state.subject == "Ben"


@pytest.mark.parametrize("message", ["I'm tired.", "I'm fine, thanks!", "I'm not sure.", "I'm Hungry", "I'm Busy right now.",
                                     "I'm Brazilian.", "I have a headache.", "Write a poem about a dog named Rex."])
def test_states_and_requests_are_not_names_or_facts(message):
    state = ConversationState()
    assert extract_facts(message, state) == []
    assert state.user_name is None


@pytest.mark.parametrize("message", ["Where do I live?", "do you know where Ana lives?", "What's my name?",
                                     "Do I have a dog", "Is Carlos a doctor?"])
def test_questions_are_not_facts(message):
    assert extract_facts(message) == []


@pytest.mark.parametrize("message", [
    "I don't live in Paris anymore.", "I might move to Rome.", "I'm thinking about moving to Berlin.",
    "I no longer work at Google.", "I'm not a teacher.", "I want to live in Canada.", "If I lived in Tokyo I'd be happy.",
    "I don't speak French.", "I'm going to move to Lisbon in May.",
])
def test_hedges_and_negations_give_no_fact(message):
    assert extract_facts(message) == []


def test_a_negated_clause_does_not_hide_the_positive_one():
    assert triples("I don't live in Paris anymore, I moved to Lyon.") == {("the user", "lives in", "Lyon")}


def test_assistant_turns_are_not_facts():
    state = ConversationState()
    assert extract_turn("assistant", "Hello! I'm Sage and I live in the cloud.", state) == []
    assert state.user_name is None
    assert extract_turn("user", "I'm Ana.", state) == [Fact("the user", "is named", "Ana")]


def test_moving_replaces_where_one_lives():
    """Same subject and relation, so the memory's newer fact replaces the older one."""
    state = ConversationState(user_name="Maria")
    (lives,) = extract_facts("I live in Boston.", state)
    (moved,) = extract_facts("I moved to Denver.", state)
    assert moved == Fact("Maria", "lives in", "Denver")
    assert moved.key == lives.key


def test_facts_read_as_sentences_and_get_chat_questions():
    state = ConversationState(user_name="Maria")
    facts = extract_facts("I'm a nurse, I live in Lisbon and my sister Ana has a cat named Mia.", state)
    assert [f.sentence for f in facts] == [
        "Maria works as a nurse.", "Maria lives in Lisbon.", "Maria has a sister named Ana.", "Ana has a cat named Mia."]
    assert [f.chat_question() for f in facts] == [
        "What does Maria work as?", "Where does Maria live?", "What is the name of Maria's sister?",
        "What is the name of Ana's cat?"]


def test_every_relation_the_rules_emit_on_the_corpus_has_a_question():
    bench = _benchmark()
    relations = {r for found in bench.predictions(bench.load_corpus()) for _, r, _ in found}
    assert len(relations) > 25
    fallback = {r for r in relations if question_for("X", r).startswith("Complete the sentence")}
    assert fallback == set()


# ---------------------------------------------------------------- corpus

def test_corpus_shape():
    rows = [json.loads(line) for line in (DATA / "extraction_corpus.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 120
    for row in rows:
        assert set(row) >= {"category", "message", "user_name", "expected"}
        for fact in row["expected"]:
            Fact.from_dict(fact)
    text = "".join(r["message"] for r in rows)
    assert all(s in text for s in ("Kraków", "São Paulo", "東京"))
    assert sum(not r["expected"] for r in rows) >= 30  # junk, questions, hedges
    assert {r["conversation"] for r in rows if "conversation" in r}


def test_rules_meet_the_precision_and_recall_goal_on_the_corpus():
    bench = _benchmark()
    rows = bench.load_corpus()
    result = bench.score(rows, bench.predictions(rows))
    assert result["precision"] >= 0.9, result["errors"]
    assert result["recall"] >= 0.8, result["errors"]


@pytest.mark.parametrize("name", ["extraction_heldout.jsonl", "extraction_heldout2.jsonl"])
def test_rules_stay_precise_on_the_held_out_corpora(name):
    """Recall on phrasings the rules were not written for is lower (benchmarks/results/extraction.json: about 0.7);
    precision must not be: a wrong memory is worse than a missing one."""
    bench = _benchmark()
    rows = bench.load_corpus(DATA / name)
    result = bench.score(rows, bench.predictions(rows))
    assert result["precision"] >= 0.9, result["errors"]


# ---------------------------------------------------------------- model extractor

MESSAGE = "Hi, I'm Maria. I live in Lisbon and my sister Ana works at Siemens."


def model_facts(reply: str, state: ConversationState | None = None) -> list[Fact]:
    return ModelExtractor(lambda prompt: reply).extract(MESSAGE, state or ConversationState())


def test_model_extractor_reads_a_json_list_and_maps_the_user():
    state = ConversationState()
    facts = model_facts(json.dumps([
        {"subject": "I", "relation": "is named", "object": "Maria"},
        {"subject": "I", "relation": "lives in", "object": "Lisbon"},
        {"subject": "Ana", "relation": "works at", "object": "Siemens"},
    ]), state)
    assert facts == [Fact("the user", "is named", "Maria"), Fact("Maria", "lives in", "Lisbon"),
                     Fact("Ana", "works at", "Siemens")]
    assert state.user_name == "Maria"


def test_model_extractor_finds_the_list_inside_prose():
    reply = 'Sure! Here are the facts [from the message]:\n```json\n[{"subject": "my", "relation": "lives in", ' \
            '"object": "lisbon"}]\n```\nAnything else?'
    assert model_facts(reply, ConversationState(user_name="Maria")) == [Fact("Maria", "lives in", "lisbon")]


@pytest.mark.parametrize("reply", [
    "", "no facts here", "[{'subject': 'I', 'relation': 'lives in', 'object': 'Lisbon'}]",  # not JSON
    '[{"subject": "I", "relation": "lives in", "object": "Lisbon"',  # cut off
    '{"subject": "I", "relation": "lives in", "object": "Lisbon"}',  # not a list
    '[["I", "lives in", "Lisbon"], "I live in Lisbon", 3, null]',  # items not objects
    '[{"subject": "I", "relation": "lives in", "object": 7}]',  # wrong type
    '[{"subject": "I", "relation": "lives in"}]',  # missing key
    '[{"subject": "I", "relation": "lives in", "object": "Lisbon", "confidence": 0.9}]',  # extra key
    '[{"subject": "I", "relation": "  ", "object": "Lisbon"}]',  # empty
    '[{"subject": "I", "relation": "lives in", "object": "Paris"}]',  # hallucinated
    '[{"subject": "Ana", "relation": "' + "x" * 501 + '", "object": "Siemens"}]',  # too long
])
def test_model_extractor_drops_bad_output_without_raising(reply):
    assert model_facts(reply) == []


def test_model_extractor_keeps_the_valid_items_of_a_mixed_list():
    reply = json.dumps([{"subject": "I", "relation": "lives in", "object": "Paris"},
                        {"subject": "Ana", "relation": "works at", "object": "Siemens"}, "junk"])
    assert model_facts(reply) == [Fact("Ana", "works at", "Siemens")]


def test_model_extractor_prompt_holds_the_message():
    prompts = []
    ModelExtractor(lambda p: prompts.append(p) or "[]").extract(MESSAGE, ConversationState())
    assert MESSAGE in prompts[0] and '"subject"' in prompts[0]


def test_make_extractor():
    assert isinstance(make_extractor(), RuleExtractor)
    assert isinstance(make_extractor("rules"), RuleExtractor)
    assert isinstance(make_extractor("model", generate=lambda p: "[]"), ModelExtractor)
    with pytest.raises(ValueError, match="generate"):
        make_extractor("model")
    with pytest.raises(ValueError, match="rules, model"):
        make_extractor("regex")


@pytest.mark.slow
def test_model_extractor_runs_on_the_default_model(base_lm):
    """The 135M model is too small to extract well; it must only never break the parser."""
    lm = base_lm
    from sleepwake.inference import chat_text, encode, generate

    tok = lm.tokenizer

    def ask(prompt: str) -> str:
        return generate(lm.model, tok, [encode(tok, chat_text(tok, prompt), chat=True)], max_new_tokens=96)[0]

    message = "My name is Maria, I live in Lisbon and I have a dog named Rex."
    facts = ModelExtractor(ask).extract(message, ConversationState())
    assert isinstance(facts, list)
    assert all(isinstance(f, Fact) and f.object.casefold() in message.casefold() for f in facts)
