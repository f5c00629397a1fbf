"""The HTTP door's security and the tool-call parsers: HTTPS with the real ``openai`` client,
CORS for browser origins, no non-loopback listening without a key, keys never logged; the
hermes and llama3_json parsers on the outputs vLLM's parsers read."""

from __future__ import annotations

import json
import logging
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from agent.http.tool_calls import HERMES, LLAMA3_JSON, parse, parser_for
from agent.service.settings import SettingsError, parse_settings
from tests.test_http_door import KEY, HttpAgent
from tests.test_mqtt_tls import Pki, pki  # noqa: F401 (the fixture)

pytestmark = pytest.mark.integration


def test_https_with_the_openai_client(broker, pki: Pki) -> None:  # noqa: F811
    h = HttpAgent(broker, _fake(), http_ssl_certfile=str(pki.server_cert),
                  http_ssl_keyfile=str(pki.server_key))
    try:
        url = f"https://127.0.0.1:{h.agent.http.port}/v1"
        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0,
                               http_client=openai.DefaultHttpxClient(
                                   verify=ssl.create_default_context(cafile=str(pki.ca))))
        reply = client.chat.completions.create(
            model="general", messages=[{"role": "user", "content": "over tls"}])
        assert reply.choices[0].message.content == "echo: over tls"
        with pytest.raises(openai.APIConnectionError):  # a client that does not trust it
            openai.OpenAI(base_url=url, api_key=KEY, max_retries=0).models.list()
    finally:
        h.agent.stop()


def test_cors_allows_the_named_origins_only(broker) -> None:
    h = HttpAgent(broker, _fake(), http_cors_origins=("https://portal.lab.example",))
    try:
        def preflight(origin: str) -> str | None:
            request = urllib.request.Request(
                h.url + "/v1/chat/completions", method="OPTIONS",
                headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                         "Access-Control-Request-Headers": "authorization,content-type"})
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    return response.headers.get("access-control-allow-origin")
            except urllib.error.HTTPError as err:
                return err.headers.get("access-control-allow-origin")

        assert preflight("https://portal.lab.example") == "https://portal.lab.example"
        assert preflight("https://elsewhere.example") is None
    finally:
        h.agent.stop()


def test_keys_are_never_logged(broker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    h = HttpAgent(broker, _fake())
    try:
        h.client.chat.completions.create(model="general",
                                         messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=h.url + "/v1", api_key="a-wrong-secret-key",
                          max_retries=0).models.list()
    finally:
        h.agent.stop()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert KEY not in text and "a-wrong-secret-key" not in text and "second-key" not in text


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::", "box.lan"])
def test_listening_beyond_loopback_needs_a_key(host: str, tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="--api_key"):
        parse_settings(["--http_port", "8000", "--http_host", host], environ={})
    keys = tmp_path / "keys"
    keys.write_text("# site keys\nk-one\n\nk-two\n")
    settings = parse_settings(["--http_port", "8000", "--http_host", host,
                               "--api_key_file", str(keys)], environ={})
    assert settings.agent_config().api_key == ("k-one", "k-two")
    for loopback in ("127.0.0.1", "localhost", "::1"):
        parse_settings(["--http_port", "8000", "--http_host", loopback], environ={})


def test_https_files_are_checked_at_start(tmp_path: Path, pki: Pki) -> None:  # noqa: F811
    with pytest.raises(SettingsError, match="not a PEM certificate and its private key"):
        parse_settings(["--http_port", "8000", "--http_ssl_certfile", str(pki.server_cert),
                        "--http_ssl_keyfile", str(pki.client_key)], environ={})  # not its key
    parse_settings(["--http_port", "8000", "--http_ssl_certfile", str(pki.server_cert),
                    "--http_ssl_keyfile", str(pki.server_key)], environ={})
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(SettingsError, match="--http_ssl_certfile .*not a PEM"):
        parse_settings(["--http_port", "8000", "--http_ssl_certfile", str(garbage),
                        "--http_ssl_keyfile", str(garbage)], environ={})
    with pytest.raises(SettingsError, match="go together"):
        parse_settings(["--http_port", "8000", "--http_ssl_certfile", str(garbage)], environ={})


# ---------------------------------------------------------------- tool-call parsers


def test_the_parser_follows_the_chat_template() -> None:
    assert parser_for("... <tool_call>\\n{{ tool_call | tojson }}</tool_call> ...") == HERMES
    assert parser_for("{{- '<|python_tag|>' }} Environment: ipython") == LLAMA3_JSON
    assert parser_for("{% for message in messages %}{{ message.content }}{% endfor %}") is None


def test_hermes_calls_and_the_text_before_them() -> None:
    text = ('Let me check.\n<tool_call>\n{"name": "move", "arguments": {"direction": "up"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "look", "arguments": {}}\n</tool_call>')
    content, calls = parse(text, HERMES)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("move", {"direction": "up"}), ("look", {})]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    assert parse("no call here", HERMES) == ("no call here", [])
    broken = '<tool_call>\n{"name": "move", "arguments": {oops}\n</tool_call>'
    assert parse(broken, HERMES) == (broken, [])  # left as text, as vLLM leaves it


def test_llama3_json_calls() -> None:
    text = ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
            '{"name": "get_time", "parameters": {"zone": "CET"}}')
    content, calls = parse(text, LLAMA3_JSON)
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    plain = "The weather in Paris is sunny."
    assert parse(plain, LLAMA3_JSON) == (plain, [])
    assert parse('{"no_name": 1}', LLAMA3_JSON) == ('{"no_name": 1}', [])


def _fake():
    from tests.fake_engine import FakeEngine

    return FakeEngine()
