import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.mqtt.topics import Topics, normalize_prefix

PROJECTS = ("maze", "driving")


@pytest.fixture
def topics() -> Topics:
    return Topics(PROJECTS)


def test_names(topics: Topics) -> None:
    assert topics.user_input("maze") == "maze/user_input"
    assert topics.default_reply("maze", "s1") == "maze/assistant_response/s1"
    assert topics.subscriptions() == ["maze/user_input", "driving/user_input"]
    assert topics.project_of("driving/user_input") == "driving"
    assert topics.project_of("driving/user_input/x") is None
    assert topics.project_of("other/user_input") is None


@pytest.mark.parametrize("prefix", ["clinic1/", "clinic1"])
def test_prefix(prefix: str) -> None:
    topics = Topics(PROJECTS, prefix)
    assert topics.user_input("maze") == "clinic1/maze/user_input"
    assert topics.default_reply("maze", "s") == "clinic1/maze/assistant_response/s"
    assert topics.project_of("clinic1/maze/user_input") == "maze"
    assert topics.project_of("maze/user_input") is None
    reply = "clinic1/maze/assistant_response/s/c"
    assert topics.confine_reply("maze", reply, "s") == reply
    assert topics.confine_reply("maze", "maze/assistant_response/s/c", "s") == \
        "clinic1/maze/assistant_response/s"


@pytest.mark.parametrize("prefix", ["a/#", "+/", "$SYS/"])
def test_bad_prefix(prefix: str) -> None:
    with pytest.raises(ValueError):
        normalize_prefix(prefix)


@pytest.mark.parametrize("requested, expected", [
    ("maze/assistant_response/s1/client7", "maze/assistant_response/s1/client7"),
    ("maze/assistant_response/s1/client7/req9", "maze/assistant_response/s1/client7/req9"),
    ("maze/assistant_response/other", "maze/assistant_response/other"),
    ("maze/assistant_response/s1/", "maze/assistant_response/s1"),  # trailing / stripped
    ("maze/assistant_response/", "maze/assistant_response/s1"),  # empty remainder
    ("maze/assistant_response", "maze/assistant_response/s1"),
    ("maze/assistant_response//", "maze/assistant_response/s1"),
    ("maze/assistant_response/#", "maze/assistant_response/s1"),
    ("maze/assistant_response/s1/+", "maze/assistant_response/s1"),
    ("maze/assistant_response/s\x001", "maze/assistant_response/s1"),
    ("driving/assistant_response/s1", "maze/assistant_response/s1"),  # another project
    ("maze/user_input", "maze/assistant_response/s1"),
    ("maze/template", "maze/assistant_response/s1"),
    ("elsewhere/topic", "maze/assistant_response/s1"),
    ("", "maze/assistant_response/s1"),
    (42, "maze/assistant_response/s1"),
    (None, "maze/assistant_response/s1"),
    ("maze/assistant_response/" + "x" * 70000, "maze/assistant_response/s1"),
    ("maze/assistant_response/\ud800", "maze/assistant_response/s1"),
])
def test_confine_reply(topics: Topics, requested: object, expected: str) -> None:
    assert topics.confine_reply("maze", requested, "s1") == expected


def test_reserved(topics: Topics) -> None:
    for topic in ("maze/user_input", "driving/user_input", "maze/template", "maze/template/s1",
                  "driving/clear_history/x", "driving/delete_session", "maze/state",
                  "llama/user_input/abc", "llama/session"):
        assert topics.is_reserved(topic), topic
        assert not topics.publishable(topic), topic
    for topic in ("maze/assistant_response/s", "driving/state", "maze/templates"):
        assert not topics.is_reserved(topic), topic


def test_reserved_prefixes_seam() -> None:
    topics = Topics(["maze"], reserved_prefixes=["maze/assistant_response/status/"])
    assert topics.confine_reply("maze", "maze/assistant_response/status/x", "s") == \
        "maze/assistant_response/s"


@given(requested=st.one_of(st.none(), st.integers(), st.text(max_size=80),
                           st.text(max_size=40).map(lambda s: "maze/assistant_response/" + s)))
@settings(max_examples=300, deadline=None)
def test_confined_reply_is_always_publishable(requested: object) -> None:
    topics = Topics(PROJECTS)
    topic = topics.confine_reply("maze", requested, "s1")
    assert topic.startswith("maze/assistant_response/") and len(topic) > len("maze/assistant_response/")
    assert topics.publishable(topic)


def test_game_and_control_subscriptions() -> None:
    topics = Topics(PROJECTS, "site/")
    subs = dict(topics.all_subscriptions())
    assert subs["site/maze/state"] == 1 and subs["site/driving/template/+"] == 1
    assert "site/maze/clear_history" in subs and "site/driving/delete_session/+" in subs
    assert "site/driving/state" not in subs and not any(t.startswith(("llama", "site/llama")) for t in subs)
    legacy = dict(Topics(PROJECTS).all_subscriptions(legacy=True))
    assert legacy["llama/user_input/+"] == 0 and legacy["llama/session"] == 0
    for topic in legacy:  # never a wildcard that could catch a reply
        assert "#" not in topic and not topic.endswith(("assistant_response/+", "hint/+"))


def test_parse_control(topics: Topics) -> None:
    assert topics.parse_control("maze/template") == ("maze", "template", None)
    assert topics.parse_control("driving/clear_history/s1") == ("driving", "clear_history", "s1")
    assert topics.parse_control("maze/delete_session/s/deeper") is None
    assert topics.parse_control("maze/user_input") is None
    assert topics.parse_control("other/template") is None


def test_legacy_replies_are_publishable(topics: Topics) -> None:
    for topic in ("llama/session/response", "llama/assistant_response/abc",
                  "llama/driving/assistant_response/abc", "maze/hint/s1"):
        assert topics.publishable(topic), topic
    assert topics.confine("maze/hint/", "maze/hint/s1/c", "maze/hint/s1") == "maze/hint/s1/c"
    assert topics.confine("maze/hint/", "maze/state", "maze/hint/s1") == "maze/hint/s1"


def test_remembered_verdicts_stay_right_and_bounded(topics: Topics) -> None:
    """publish_problem remembers its verdicts: asking again gives the same answer, whether
    the topic was refused or not, and the memory never grows past its bound."""
    from agent.mqtt import topics as module

    cases = {"maze/assistant_response/s1": None,
             "driving/user_input": "it is a request or control topic",
             "maze/assistant_response/a+b": "it contains '+', '#' or NUL",
             "x/maze/template": "it is a request or control topic"}
    for _ in range(2):
        for topic, problem in cases.items():
            assert topics.publish_problem(topic) == problem
            assert topics.publishable(topic) == (problem is None)
    long_topic = "maze/assistant_response/" + "x" * module.VERDICT_MAX_CHARS
    assert topics.publishable(long_topic) and long_topic not in topics._verdicts
    for i in range(module.VERDICT_ENTRIES + 10):
        topics.publish_problem(f"maze/assistant_response/s{i}")
    assert len(topics._verdicts) <= module.VERDICT_ENTRIES
    assert topics.publish_problem("driving/user_input") == "it is a request or control topic"


def test_ascii_topics_get_the_same_verdict_as_any_topic() -> None:
    """topic_problem checks an ASCII topic with a smaller character class: for every ASCII
    character it must refuse what the full class (taken for a non-ASCII topic) refuses."""
    from agent.mqtt.topics import topic_problem

    refused = set()
    for c in map(chr, range(128)):
        ascii_verdict = topic_problem(f"a/{c}b")
        assert (ascii_verdict is None) == (topic_problem(f"a/{c}b\u00e9") is None), repr(c)
        if ascii_verdict is not None:
            refused.add(c)
    assert refused == {chr(i) for i in range(32)} | {"\x7f", "+", "#"}
