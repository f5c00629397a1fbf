"""Requests on a client's own request topic ``P/user_input/<owner>`` (PROTOCOL.md, "Security
model").

The broker's ACL (``python -m agent.service.mosquitto_acl``) lets only the broker user named
``<owner>`` publish there, and lets it read only the reply trees ``P/assistant_response/<owner>``
and below. MQTT does not tell a subscriber who published a message, so the topic level is
all the agent knows of the sender: a request there may only use the owner's sessions
(``<owner>`` or ``<owner>/<anything>``) and be answered in the owner's reply tree. The
shared ``P/user_input`` names its session in the payload, which no broker can check: the
ACL keeps it for trusted users.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from agent.mqtt.protocol import ChatRequest, ProtocolError, session_id_problem
from agent.mqtt.topics import Topics

log = logging.getLogger(__name__)


def owns_session(owner: str, session_id: str) -> bool:
    return session_id == owner or session_id.startswith(owner + "/")


def _in_tree(topics: Topics, project: str, owner: str, topic: str) -> bool:
    root = topics.reply_root(project)
    return topic.startswith(root) and owns_session(owner, topic[len(root):])


def confine_request(request: ChatRequest, owner: str, topics: Topics) -> ChatRequest:
    """``request`` kept to ``owner``'s sessions and reply tree; ProtocolError (answered in the
    owner's tree) for another's session. A request without a sessionId gets a new session
    under the owner's."""
    project, session_id = request.project, request.session_id
    if request.generated_session:
        session_id = f"{owner}/{session_id}"
        problem = session_id_problem(session_id) or topics.publish_problem(
            topics.default_reply(project, session_id))
        if problem:
            raise ProtocolError(f"Error: the request topic's last level cannot name a session: "
                                f"{problem}", None, project, None, request.request_id)
    elif not owns_session(owner, session_id):
        raise ProtocolError(
            f"Error: sessionId must be {owner!r} or start with '{owner}/' on this request "
            "topic", _owner_default(topics, project, owner), project, None, request.request_id)
    reply_topic = request.reply_topic
    if not _in_tree(topics, project, owner, reply_topic):
        if not request.generated_session:
            log.warning("reply topic %.200r is outside the tree of %.100r; replying on the "
                        "session's default topic", reply_topic, owner)
        reply_topic = topics.default_reply(project, session_id)
    if session_id == request.session_id and reply_topic == request.reply_topic:
        return request
    return replace(request, session_id=session_id, reply_topic=reply_topic)


def confine_error(err: ProtocolError, owner: str, topics: Topics) -> ProtocolError:
    """A refused request from ``owner``'s topic is answered in the owner's tree, and never
    names another's session."""
    if err.reply_topic is not None and not _in_tree(topics, err.project, owner, err.reply_topic):
        err.reply_topic = _owner_default(topics, err.project, owner)
    if err.session_id is not None and not owns_session(owner, err.session_id):
        err.session_id = None
    return err


def _owner_default(topics: Topics, project: str, owner: str) -> str | None:
    """``P/assistant_response/<owner>``, if the agent may publish there."""
    topic = topics.default_reply(project, owner)
    return None if session_id_problem(owner) or topics.publish_problem(topic) else topic
