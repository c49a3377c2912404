"""Questions about the user ("Where do I live?") and about known people (issue 26):
understood without a model (`questions`, `replies`), then answered through
`Assistant` from the real default model's weights."""

from __future__ import annotations

import pytest

from sleepwake.facts import Fact, mentions
from sleepwake.questions import USER, About, Known, Lookup, Unknown, understand
from sleepwake.replies import answers, worded

ME = "Ottilie Branstrom"
FACTS = [
    Fact(USER, "lives in", "Trondheim"),  # told before the name
    Fact(USER, "is named", ME),
    Fact(ME, "works as", "a cartographer"),
    Fact(ME, "has a dog named", "Juniper"),
    Fact(ME, "has a brother named", "Lukas"),
    Fact("Lukas", "lives in", "Graz"),
    Fact(ME, "is allergic to", "hazelnuts"),
    Fact(ME, "favorite color is", "teal"),
    Fact(ME, "speaks", "Norwegian and German"),
    Fact(ME, "has a child named", "Ada and Jonas"),
    Fact(ME, "is married to", "Ines Carvalho"),
    Fact("Ines Carvalho", "works as", "an architect"),
]
KNOWN = Known.of(FACTS)


def asks(message: str, me: str = ME) -> tuple[tuple[str, str], ...]:
    plan = understand(message, KNOWN, me)
    assert isinstance(plan, Lookup), (message, plan)
    return plan.asks


@pytest.mark.parametrize("message, subject, relation", [
    ("Where do I live?", USER, "lives in"),
    ("where am i based", USER, "lives in"),
    ("Remind me where I live?", USER, "lives in"),
    ("Which city am I living in these days?", USER, "lives in"),
    ("Where's home for me?", USER, "lives in"),
    ("Hi! Where did I move to?", USER, "lives in"),
    ("What is my job?", ME, "works as"),
    ("What do I do for a living?", ME, "works as"),
    ("What's my profession?", ME, "works as"),
    ("what kind of work do I do", ME, "works as"),
    ("What's my dog called?", ME, "has a dog named"),
    ("What is my dog’s name?", ME, "has a dog named"),
    ("Do I have a dog?", ME, "has a dog named"),
    ("Do I have any pets?", ME, "has a dog named"),
    ("Am I allergic to anything?", ME, "is allergic to"),
    ("What are my allergies?", ME, "is allergic to"),
    ("Who is my brother?", ME, "has a brother named"),
    ("What's my brother's name?", ME, "has a brother named"),
    ("What's my favourite colour?", ME, "favorite color is"),
    ("Which languages can I speak?", ME, "speaks"),
    ("What are my kids' names?", ME, "has a child named"),
    ("Do I have children?", ME, "has a child named"),
    ("Who am I married to?", ME, "is married to"),
    ("Who's my wife?", ME, "is married to"),
    ("What's my name?", USER, "is named"),
    ("Can you tell me what my job is?", ME, "works as"),
])
def test_first_person_questions_become_the_memory_s_own(message, subject, relation):
    assert asks(message) == ((subject, relation),)
    assert KNOWN.questions[subject][relation] == Fact(subject, relation, "x").chat_question()


def test_before_the_name_i_is_the_user():
    assert asks("Where do I live?", me=USER) == ((USER, "lives in"),)
    assert isinstance(understand("What is my job?", KNOWN, USER), Unknown)  # told under the name only


def test_people_named_in_passing_are_themselves():
    assert asks("Where does my brother Lukas live?") == (("Lukas", "lives in"),)
    assert asks("Tell me where Lukas lives.") == (("Lukas", "lives in"),)  # "me" here is no person asked about
    assert asks("What does my wife Ines Carvalho do?") == (("Ines Carvalho", "works as"),)
    assert asks("What does Ines do for work?") == (("Ines Carvalho", "works as"),)  # one word of a known name


def test_an_unnamed_relative_is_whoever_the_user_s_fact_names():
    plan = understand("Where does my brother live?", KNOWN, ME)
    assert isinstance(plan, Lookup) and plan.who.kind == "brother"
    assert plan.asks == ((ME, "has a brother named"),) and plan.relations == ("lives in",)
    replies = {"What is the name of Ottilie Branstrom's brother?": "Lukas.", "Where does Lukas live?": "Graz."}
    assert "".join(answers(plan, replies.__getitem__, KNOWN)) == "Your brother Lukas lives in Graz."
    wife = understand("What does my wife do?", KNOWN, ME)
    assert wife.asks == ((ME, "is married to"),) and wife.relations[0] == "works as"


def test_what_nothing_stored_answers_is_unknown():
    for message, masked, relation in [
        ("What is Lukas's favourite colour?", ("Lukas",), "favorite color is"),
        ("How old is Ines Carvalho?", ("Ines Carvalho",), "is aged"),
        ("Is Lukas a good skier?", ("Lukas",), None),  # not understood, but about Lukas
        ("Does Lukas live near Ines Carvalho?", ("Lukas", "Ines Carvalho"), None),
        ("How old am I?", (), "is aged"),  # names nobody: no edit to take it over
    ]:
        plan = understand(message, KNOWN, ME)
        assert isinstance(plan, Unknown) and plan.masked == masked and plan.relation == relation, (message, plan)


def test_about_asks_every_stored_relation():
    me = understand("What do you know about me?", KNOWN, ME)
    assert isinstance(me, About) and me.who.me
    assert {r for _, r in me.asks} == {f.relation for f in FACTS if f.subject in (ME, USER)}
    for message in ("Who am I?", "Tell me everything you know about me.", "What have I told you about myself?"):
        assert isinstance(understand(message, KNOWN, ME), About), message
    lukas = understand("Who is Lukas?", KNOWN, ME)
    assert isinstance(lukas, About) and lukas.asks == (("Lukas", "lives in"),)
    assert isinstance(understand("Tell me about Ines Carvalho.", KNOWN, ME), About)


@pytest.mark.parametrize("message", [
    "What's a good book to read this weekend?", "Who is Albert Einstein?", "Where is Paris?",
    "I live in Oslo.", "My brother Lukas lives in Graz.", "Thanks!", "How do I bake bread?",
])
def test_other_messages_are_left_to_the_model(message):
    assert understand(message, KNOWN, ME) is None


def test_the_known_memory_holds_no_objects():
    text = repr(KNOWN)
    assert not any(o in text for o in ("Trondheim", "Graz", "Juniper", "hazelnuts", "cartographer"))


@pytest.mark.parametrize("name, relation, answer, sentence", [
    ("", "lives in", "Trondheim.", "You live in Trondheim."),
    ("", "works as", "a cartographer.", "You work as a cartographer."),
    ("", "is allergic to", "hazelnuts.", "You are allergic to hazelnuts."),
    ("", "has a dog named", "Juniper.", "You have a dog named Juniper."),
    ("", "has a child named", "Ada and Jonas.", "You have children named Ada and Jonas."),
    ("", "studies", "Korean.", "You study Korean."),
    ("", "was born in", "Pärnu.", "You were born in Pärnu."),
    ("", "favorite color is", "teal.", "Your favorite color is teal."),
    ("", "is named", "Ottilie Branstrom. It was a rainy day and", "Your name is Ottilie Branstrom."),
    ("", "is named", "Ottilie Branstrom painting a map from the camera trap. Then", "Your name is Ottilie Branstrom."),
    ("", "is named", "Tom named Anna.", "Your name is Tom."),  # Tom's own edit read after his name
    ("", "is named", "Maria de la Cruz.", "Your name is Maria de la Cruz."),
    ("", "is named", "the one who draws maps for the city council of Trondheim.",
     "the one who draws maps for the city council of Trondheim."),  # no name leads it: kept
    ("", "is aged", "41.", "You are 41 years old."),
    ("Lukas", "lives in", "Graz.", "Lukas lives in Graz."),
    ("Lukas", "favorite color is", "red", "Lukas' favorite color is red."),
    ("", "lives in", "The world is a vast place full of wonder and many cities.",
     "The world is a vast place full of wonder and many cities."),  # a sentence of its own: kept
])
def test_answers_are_worded_around_the_model_s_answer(name, relation, answer, sentence):
    assert worded(name, relation, answer) == sentence


def test_the_reply_s_objects_are_the_model_s():
    plan = understand("What do you know about me?", KNOWN, ME)
    said = "".join(answers(plan, lambda q: "Bergen." if "live" in q else "something.", KNOWN))
    assert "You live in Bergen." in said and "Trondheim" not in said


# ---------------------------------------------------------------- on the model

@pytest.mark.slow
def test_first_person_through_the_assistant_before_and_after_the_name_and_a_restart(make_memory, tmp_path):
    """Told before and after the name, asked in the first person in new conversations;
    a question nothing stored answers is not taken over by the named person's edit; all
    again after a nap, and after a restart."""
    import torch

    from sleepwake.decoding import Sampling
    from sleepwake.talk import Assistant

    home = tmp_path / "home"
    bot = Assistant(make_memory(home), max_new_tokens=24)
    bot.say("I live in Trondheim.", max_new_tokens=1)
    assert mentions(bot.say("Where do I live?").reply, "Trondheim")  # "I" is "the user" so far
    bot.say("My name is Ottilie Branstrom and I work as a cartographer.", max_new_tokens=1)
    bot.say("My brother Lukas lives in Graz.", max_new_tokens=1)
    assert {(r.fact.subject, r.fact.relation) for r in bot.facts()} >= {
        (USER, "lives in"), (ME, "works as"), (ME, "has a brother named"), ("Lukas", "lives in")}
    assert bot.say("What do I do for a living?").reply == "You work as a cartographer."
    assert mentions(bot.say("Where am I based?").reply, "Trondheim")  # told before the name
    assert mentions(bot.say("Where does my brother Lukas live?").reply, "Graz")
    assert mentions(bot.say("Where does my brother live?").reply, "Graz")

    def down_projections() -> torch.Tensor:
        return torch.cat([w.detach().flatten() for n, w in bot.memory.model.named_parameters() if "down_proj" in n])

    edited = down_projections()
    unknown = bot.say("What is Lukas's favourite colour?").reply  # his edit must not answer it
    assert unknown.strip() and not mentions(unknown, "Graz"), unknown
    assert torch.equal(down_projections(), edited)  # the masked reply put the person's edits back
    bot.unknown = "decline"
    assert bot.say("What is Lukas's favourite colour?").reply == "I don't know that about Lukas."
    # A stop string cuts the reply put together from the memory's answer, not that answer.
    cut = bot.say("What do I do for a living?", sampling=Sampling(stop=["cartographer"]))
    assert (cut.reply, cut.finish_reason) == ("You work as a ", "stop"), cut.reply

    bot.start_sleep("nap")
    assert bot.wait(timeout=900).status == "accepted"
    assert bot.say("What do I do for a living?").reply == "You work as a cartographer."  # from the nap's memory
    assert mentions(bot.say("Where do I live?").reply, "Trondheim")
    bot.memory.close()  # a restart: the weights and who "I" is come back from the home
    again = Assistant(make_memory(home), max_new_tokens=24)
    assert again.memory.history()[-1]["kind"] == "nap"
    assert again.say("What's my job?").reply == "You work as a cartographer."
    about = again.say("What do you know about me?", max_new_tokens=64).reply  # a sentence per fact
    for obj in ("Trondheim", "cartographer", "Lukas"):
        assert mentions(about, obj), about
    # The name is asked too ("What is the user's name?"); whether "the user"'s edit still
    # answers it is the memory's affair (it said "Tubby" once here: see the benchmark).
    assert "Your name is" in about, about
