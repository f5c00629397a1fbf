"""systemd integration: our sd_notify against a datagram socket the test binds, the agent's
READY / STATUS / WATCHDOG / STOPPING, the graceful stop on SIGTERM (requests in flight
answered, offline status, exit 0), the second signal, the unit file and install.sh."""

from __future__ import annotations

import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.core.outcome import SHUTTING_DOWN
from agent.service.app import Agent
from agent.service.config import AgentConfig
from agent.service.notifier import ServiceNotifier, status_text
from agent.service.sd_notify import SdNotify, socket_address
from agent.service.settings_table import BY_NAME
from agent.service.shutdown import ShutdownSignals, drain, forced_exit_code
from tests.fake_engine import FakeEngine
from tests.mqtt_broker import Broker, mosquitto_available
from tests.old_client import OldClient
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "vllm-deploy.service"
INSTALL = ROOT / "systemd" / "install.sh"
needs_broker = pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")


class NotifySocket:
    """Plays systemd: a bound AF_UNIX datagram socket that records every notification."""

    def __init__(self, address: str) -> None:
        """``address``: a file path, or ``@name`` for the abstract namespace."""
        self.address = address
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._cond = threading.Condition()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(socket_address(address))  # type: ignore[arg-type]
        self._sock.settimeout(0.1)
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(4096)
            except (TimeoutError, OSError):
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            with self._cond:
                self.messages.append((time.monotonic(), fields))
                self._cond.notify_all()

    def wait(self, key: str, value: str | None = None, n: int = 1, timeout: float = 10.0) -> float:
        """The arrival time of the ``n``-th message with ``key`` (equal to ``value`` if given)."""
        def times() -> list[float]:
            return [t for t, f in self.messages if key in f and value in (None, f[key])]

        with self._cond:
            ok = self._cond.wait_for(lambda: len(times()) >= n, timeout)
            assert ok, (f"{len(times())} of {n} {key}= messages within {timeout} s; the last ones: "
                        f"{self.messages[-8:]}")
            return times()[n - 1]

    def values(self, key: str) -> list[str]:
        with self._cond:
            return [f[key] for _, f in self.messages if key in f]

    def close(self) -> None:
        self._closed = True
        self._thread.join(2)
        self._sock.close()


@pytest.fixture
def notify_socket() -> Iterator[Callable[[bool], NotifySocket]]:
    made: list[NotifySocket] = []
    folder = Path(tempfile.mkdtemp(prefix="sdn-"))  # short: a socket path has 108 bytes at most

    def make(abstract: bool = False) -> NotifySocket:
        name = f"vllm-deploy-test-{secrets.token_hex(4)}"
        made.append(NotifySocket(f"@{name}" if abstract else str(folder / name)))
        return made[-1]

    yield make
    for s in made:
        s.close()
    shutil.rmtree(folder, ignore_errors=True)


# ---- (a) the protocol -------------------------------------------------------------------------

@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notifications_arrive_as_one_datagram_of_key_value_lines(
    notify_socket: Callable[[bool], NotifySocket], abstract: bool,
) -> None:
    listener = notify_socket(abstract)
    sd = SdNotify({"NOTIFY_SOCKET": listener.address})
    text = f"serving {secrets.token_hex(4)}"
    assert sd.enabled and sd.ready(status=text + "\nsecond line")
    assert sd.watchdog() and sd.status(text) and sd.stopping()
    assert sd.notify(extend_timeout_usec=5_000_000)
    listener.wait("EXTEND_TIMEOUT_USEC")
    sd.close()
    assert [f for _, f in listener.messages] == [
        {"READY": "1", "STATUS": text + " second line"}, {"WATCHDOG": "1"}, {"STATUS": text},
        {"STOPPING": "1"}, {"EXTEND_TIMEOUT_USEC": "5000000"}]


def test_without_a_socket_every_call_is_a_no_op_and_errors_never_raise(tmp_path: Path) -> None:
    off = SdNotify({})
    assert not off.enabled and off.watchdog_interval is None
    assert not off.ready() and not off.watchdog() and not off.stopping()
    gone = SdNotify({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens"), "WATCHDOG_USEC": "1000000"})
    assert gone.enabled and not gone.ready() and not gone.watchdog()  # logged, not raised
    assert SdNotify({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled is False


@pytest.mark.parametrize(("env", "interval"), [
    ({"WATCHDOG_USEC": "60000000"}, 30.0),
    ({"WATCHDOG_USEC": "300000", "WATCHDOG_PID": str(os.getpid())}, 0.15),
    ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),  # not ours
    ({"WATCHDOG_USEC": "sixty"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({}, None),
])
def test_watchdog_interval_is_half_of_watchdog_usec(env: dict[str, str], interval: float | None,
                                                     tmp_path: Path) -> None:
    sd = SdNotify({"NOTIFY_SOCKET": str(tmp_path / "s"), **env})
    assert sd.watchdog_interval == pytest.approx(interval) if interval else sd.watchdog_interval is None


class StubEngine:
    def __init__(self) -> None:
        self.progress = time.monotonic()

    def last_progress(self) -> float:
        return self.progress


def test_watchdog_pings_only_while_the_engine_loop_progresses(
    notify_socket: Callable[[bool], NotifySocket],
) -> None:
    listener = notify_socket(False)
    service = ServiceNotifier(SdNotify({"NOTIFY_SOCKET": listener.address,
                                        "WATCHDOG_USEC": "100000"}))
    engine = StubEngine()
    engine.progress = time.monotonic() - 2 * service.stall_limit  # hung
    service.watch(engine, lambda: "unused")
    service.start()
    try:
        time.sleep(0.5)
        assert listener.values("WATCHDOG") == []
        engine.progress = time.monotonic() + 3600  # progressing (for the rest of the test)
        listener.wait("WATCHDOG", "1", n=3, timeout=5)
    finally:
        service.stop()


# ---- the watchdog and the MQTT network loop (a real broker, a fake engine) ---------------------

def watched_agent(broker: Broker, listener: NotifySocket, reconnect_max_delay: float = 1.0) -> Agent:
    """An agent whose watchdog pings every 0.1 s and stops after 1 s without MQTT loop progress.
    FakeEngine has no ``last_progress``: only the MQTT loop is watched."""
    config = AgentConfig(projects=("general",), mqtt_broker=broker.host, mqtt_port=broker.port,
                         connect_timeout=5.0, agent_id=f"test-{secrets.token_hex(3)}",
                         stats_interval=0, reconnect_max_delay=reconnect_max_delay)
    sd = SdNotify({"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "200000"})
    return Agent(config, FakeEngine(), service=ServiceNotifier(sd, min_stall=1.0))


def pings_since(listener: NotifySocket, since: float) -> list[float]:
    with listener._cond:
        return [t for t, f in listener.messages if "WATCHDOG" in f and t >= since]


def longest_silence(listener: NotifySocket, since: float) -> float:
    """The longest time without a WATCHDOG=1 from ``since`` until now."""
    times = [since, *pings_since(listener, since), time.monotonic()]
    return max(b - a for a, b in zip(times, times[1:], strict=False))



@needs_broker
@pytest.mark.integration
def test_watchdog_pings_go_on_while_the_broker_is_down_and_the_agent_reconnects(
    broker: Broker, notify_socket: Callable[[bool], NotifySocket],
) -> None:
    listener = notify_socket(False)
    agent = watched_agent(broker, listener, reconnect_max_delay=3.0)  # waits longer than a stall
    agent.start()
    try:
        listener.wait("READY", "1")
        broker.process.terminate()  # the broker goes away; the agent retries after 1, 2, 3 s
        broker.process.wait(5)
        down = time.monotonic()
        time.sleep(5 * agent.service.stall_limit)
        assert not agent.ready and "cannot reach" in agent.mqtt._last_error  # really reconnecting
        assert longest_silence(listener, down) < agent.service.stall_limit
        broker.restart()
        assert wait_until(lambda: agent.ready, 10)
        back = time.monotonic()
        listener.wait("WATCHDOG", "1", n=len(pings_since(listener, 0)) + 5)
        assert longest_silence(listener, back) < agent.service.stall_limit
    finally:
        agent.stop()


@needs_broker
@pytest.mark.integration
def test_watchdog_pings_stop_while_the_mqtt_loop_is_stuck_in_a_callback(
    broker: Broker, client: OldClient, notify_socket: Callable[[bool], NotifySocket],
    caplog: pytest.LogCaptureFixture,
) -> None:
    listener = notify_socket(False)
    agent = watched_agent(broker, listener)
    release, entered = threading.Event(), threading.Event()
    door_on_message = agent.door.on_message

    def stuck(*args: object) -> None:  # e.g. a deadlock: paho's thread never returns
        entered.set()
        release.wait(30)
        door_on_message(*args)

    agent.start()
    try:
        listener.wait("READY", "1")
        listener.wait("WATCHDOG", "1", n=3)
        agent.door.on_message = stuck  # type: ignore[method-assign]
        reply_topic = client.request("general", "s1", "hello")
        assert entered.wait(10)
        stalled = wait_until(lambda: longest_silence(listener, time.monotonic() - 1.0) >= 1.0,
                             agent.service.stall_limit + 3)
        assert stalled, "WATCHDOG=1 went on while paho's network thread was stuck"
        assert "the MQTT network loop made no progress" in caplog.text
        release.set()
        resumed = time.monotonic()
        listener.wait("WATCHDOG", "1", n=len(pings_since(listener, 0)) + 3)
        assert pings_since(listener, resumed)
        assert client.wait(reply_topic, 1)[0] == "echo: hello"  # and it serves again
        assert "the MQTT network loop progresses again" in caplog.text
    finally:
        release.set()
        agent.stop()


@needs_broker
@pytest.mark.integration
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_watchdog_pings_stop_for_good_once_the_mqtt_thread_died(
    broker: Broker, notify_socket: Callable[[bool], NotifySocket],
) -> None:
    listener = notify_socket(False)
    agent = watched_agent(broker, listener)
    agent.start()
    try:
        listener.wait("READY", "1")

        def fail(*args: object) -> None:
            raise RuntimeError("a bug in a paho callback")

        # the CONNACK after the reconnect calls on_connect in paho's thread: an exception
        # there ends the thread, and with it every later request; only the watchdog can notice
        agent.mqtt._client.on_connect = fail
        broker.restart()
        assert wait_until(lambda: agent.mqtt.loop_age() == float("inf"), 10)
        dead = time.monotonic()
        time.sleep(2 * agent.service.stall_limit)
        assert pings_since(listener, dead + 0.3) == []  # one in flight may still arrive
    finally:
        agent.stop()


def test_an_idle_engine_loop_still_ticks_its_heartbeat() -> None:
    import torch

    from engine import create_engine
    from engine.api import EngineConfig, SamplingParams
    from engine.llm_engine import IDLE_TICK_S
    from tests.checkpoints import tiny_checkpoint

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = create_engine(EngineConfig(model_path=str(tiny_checkpoint("qwen2")), device="cpu",
                                        dtype="float32", max_model_len=256))
    try:
        engine.start()
        prompt = [int(t) for t in torch.randint(10, 200, (12,))]
        engine.generate([prompt], SamplingParams(max_tokens=4), timeout=30)
        after_work = engine.last_progress()
        time.sleep(1.5 * IDLE_TICK_S)  # idle: nothing in the inbox, yet the loop wakes
        assert engine.last_progress() - after_work >= 0.5 * IDLE_TICK_S
        assert time.monotonic() - engine.last_progress() <= IDLE_TICK_S + 0.5
    finally:
        engine.shutdown()
        torch.set_num_threads(threads)


def test_status_text_summarizes_the_metrics() -> None:
    counts = {"processed": secrets.randbelow(1000), "errors": secrets.randbelow(9),
              "rejected": secrets.randbelow(9), "queueSize": secrets.randbelow(9), "tokensPerS": 35.5}
    assert status_text(["maze", "driving"], counts) == (
        f"serving maze, driving: {counts['processed']} answered, {counts['errors']} errors, "
        f"{counts['rejected']} rejected, queue {counts['queueSize']}, 35.5 tokens/s")


def test_first_signal_calls_back_the_second_exits_with_128_plus_its_number() -> None:
    calls: list[str] = []
    exits: list[int] = []
    signals = ShutdownSignals(lambda: calls.append("stop"), exit=exits.append)
    signals.handle(signal.SIGTERM)
    assert calls == ["stop"] and exits == [] and signals.received == signal.SIGTERM
    signals.handle(signal.SIGINT)
    assert calls == ["stop"] and exits == [130] == [forced_exit_code(signal.SIGINT)]


def test_drain_waits_for_the_pending_requests_up_to_the_timeout() -> None:
    pending = [3]

    def count() -> int:
        pending[0] = max(0, pending[0] - 1)
        return pending[0]

    assert drain(count, timeout=5, poll=0.001) == 0 and pending == [0]
    started = time.monotonic()
    assert drain(lambda: 2, timeout=0.2, poll=0.01) == 2  # never finish
    assert 0.2 <= time.monotonic() - started < 2


# ---- the graceful stop in process (fake engine: its delay is the generation time) --------------

@needs_broker
@pytest.mark.integration
@pytest.mark.parametrize("timeout", [5.0, 0.5])
def test_graceful_stop_finishes_in_time_answers_the_rest_and_refuses_new_ones(
    broker: Broker, client: OldClient, notify_socket: Callable[[bool], NotifySocket], timeout: float,
) -> None:
    listener = notify_socket(True)
    config = AgentConfig(projects=("general",), mqtt_broker=broker.host, mqtt_port=broker.port,
                         connect_timeout=5.0, agent_id=f"test-{secrets.token_hex(3)}",
                         stats_interval=0)
    engine = FakeEngine(delay=2.0)
    agent = Agent(config, engine, service=ServiceNotifier(SdNotify({"NOTIFY_SOCKET": listener.address})))
    agent.start()
    listener.wait("READY", "1")
    status_topic = f"vllm_deploy/{agent.agent_id}/status"
    client.subscribe(status_topic)
    words = secrets.token_hex(4)
    in_flight = client.request("general", "s1", words)
    deadline = time.monotonic() + 5
    while not engine.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    stopper = threading.Thread(target=agent.stop_gracefully, args=(timeout,))
    stopper.start()
    try:
        listener.wait("STOPPING", "1")
        assert client.ask("general", "s2", "too late", qos=0) == SHUTTING_DOWN
        kept = client.request("general", "s3", "for the next process")  # QoS 1
        [reply] = client.wait(in_flight, 1, timeout=10)
    finally:
        stopper.join(15)
    assert reply == (f"echo: {words}" if timeout > engine.delay else SHUTTING_DOWN)
    assert client.messages(kept) == []  # left unacknowledged at the broker
    assert json.loads(client.wait(status_topic, 2)[-1])["state"] == "offline"
    assert not stopper.is_alive() and engine.shut_down


# ---- (b, c) the launcher under a notify socket, with a tiny real model ------------------------

def launcher(broker: Broker, listener: NotifySocket, log: Path, *flags: str) -> subprocess.Popen[str]:
    """vLLMDeploy.py on a tiny model under a notify socket; its stderr goes to ``log``."""
    from tests.checkpoints import tiny_checkpoint

    command = [sys.executable, str(ROOT / "vLLMDeploy.py"), "--projects", "general",
               "--model", str(tiny_checkpoint("qwen2")), "--device", "cpu",
               "--mqtt_broker", broker.host, "--mqtt_port", str(broker.port),
               "--max_model_len", "2048", "--max_tokens", "1800", "--max_history_tokens", "200",
               "--stats_interval", "0", *flags]
    env = {**os.environ, "NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "300000",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with log.open("w") as err:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)


def finish(proc: subprocess.Popen, timeout: float, log: Path) -> tuple[int, str]:
    """The exit code and the log, once the process exits within ``timeout`` s."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"the agent did not exit within {timeout} s:\n"
                             f"{log.read_text()[-3000:]}") from None
    return proc.returncode, log.read_text()


@needs_broker
@pytest.mark.integration
def test_ready_after_subscribing_watchdog_and_sigterm_during_generation(
    broker: Broker, client: OldClient, notify_socket: Callable[[bool], NotifySocket], tmp_path: Path,
) -> None:
    listener = notify_socket(True)
    agent_id = f"test-{secrets.token_hex(3)}"
    status_topic = f"vllm_deploy/{agent_id}/status"
    client.subscribe(status_topic)
    log = tmp_path / "agent.log"
    proc = launcher(broker, listener, log, "--agent_id", agent_id, "--shutdown_timeout", "30")
    try:
        try:
            ready = listener.wait("READY", "1", timeout=90)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nthe agent's log:\n{log.read_text()[-3000:]}") from None
        # subscribed before READY: a request sent now is answered
        assert client.ask("general", "first", "hello", maxTokens=4, timeout=20)
        assert listener.values("STATUS")[0].startswith("loading model ")
        assert any(s.startswith("serving general: ") for s in listener.values("STATUS"))
        listener.wait("WATCHDOG", "1", n=4, timeout=10)  # every 0.15 s
        assert listener.wait("WATCHDOG", "1", n=1) < ready + 5

        long = client.request("general", "long", "tell me everything", maxTokens=1800,
                              temperature=1.0, stream=True, subscribe=False)
        client.subscribe(long)
        client.subscribe(f"{long}/stream")
        client.wait(f"{long}/stream", 1, timeout=20)  # generating now
        proc.send_signal(signal.SIGTERM)
        stopping = listener.wait("STOPPING", "1", timeout=10)
        assert client.ask("general", "late", "one more?", timeout=10, qos=0) == SHUTTING_DOWN
        [reply] = client.wait(long, 1, timeout=40)
        assert not reply.startswith("Error") and len(reply) > 100  # finished, not cut off
        code, err = finish(proc, 40, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, err[-3000:]
    assert ready < stopping and json.loads(client.messages(status_topic)[-1][1])["state"] == "offline"
    assert "not finished within" not in err  # nothing had to be cut short


# ---- (d) a second signal -----------------------------------------------------------------------

SLOW_AGENT = """
import json, sys
from agent.service.app import Agent
from agent.service.config import AgentConfig
from tests.fake_engine import FakeEngine

class Engine(FakeEngine):
    def submit(self, request):
        super().submit(request)
        print("submitted", flush=True)

c = json.loads(sys.argv[1]); c["projects"] = tuple(c["projects"])
Agent(AgentConfig(**c), Engine(delay=60)).run_forever()
"""


@needs_broker
@pytest.mark.integration
def test_a_second_signal_exits_at_once(
    broker: Broker, client: OldClient, notify_socket: Callable[[bool], NotifySocket], tmp_path: Path,
) -> None:
    listener = notify_socket(False)
    config = {"projects": ["general"], "mqtt_broker": broker.host, "mqtt_port": broker.port,
              "agent_id": f"test-{secrets.token_hex(3)}", "shutdown_timeout": 60.0,
              "stats_interval": 0}
    status_topic = f"vllm_deploy/{config['agent_id']}/status"
    client.subscribe(status_topic)
    log = tmp_path / "agent.log"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-c", SLOW_AGENT, json.dumps(config)], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT),
                                     "NOTIFY_SOCKET": listener.address},
                                stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        listener.wait("READY", "1", timeout=30)
        client.request("general", "s1", "take your time")
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready and proc.stdout.readline().strip() == "submitted"  # type: ignore[union-attr]
        proc.send_signal(signal.SIGTERM)
        listener.wait("STOPPING", "1")
        time.sleep(0.3)
        assert proc.poll() is None  # draining: the request has 60 s
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        code, err = finish(proc, 5, log)
        assert time.monotonic() - started < 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == forced_exit_code(signal.SIGINT) == 130, err[-3000:]
    assert "second signal SIGINT" in err
    client.wait(status_topic, 2)  # the Last Will, for the connection dropped without DISCONNECT
    assert json.loads(client.messages(status_topic)[-1][1])["state"] == "offline"


# ---- (e) the unit file -------------------------------------------------------------------------

def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_unit_is_notify_with_watchdog_and_stops_after_the_drain() -> None:
    unit = unit_settings()
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    assert unit["Restart"] == ["on-failure"] and int(unit["WatchdogSec"][0]) > 0
    shutdown_timeout = BY_NAME["shutdown_timeout"].default
    assert int(unit["TimeoutStopSec"][0]) >= shutdown_timeout + 15  # drain, then flush and stop
    for key, value in [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("ProtectHome", "yes"), ("PrivateTmp", "yes"), ("DevicePolicy", "closed")]:
        assert unit[key] == [value], key
    assert unit["EnvironmentFile"] == ["/etc/vllm-deploy/vllm-deploy.env"]


def test_unit_filters_system_calls_hides_other_processes_and_bounds_memory_and_tasks() -> None:
    unit = unit_settings()
    assert unit["SystemCallFilter"] == ["@system-service", "~@privileged"]
    assert unit["SystemCallErrorNumber"] == ["EPERM"]  # refused, not killed
    assert unit["SystemCallArchitectures"] == ["native"]
    assert unit["ProtectProc"] == ["invisible"]
    # pid would hide /proc/meminfo (psutil, CPU KV sizing) and /proc/driver/nvidia (libcuda)
    assert unit["ProcSubset"] == ["all"]
    assert unit["MemoryDenyWriteExecute"] == ["no"]  # PyTorch's oneDNN writes x86 code at run time
    assert unit["MemoryMax"] == ["90%"] and unit["TasksMax"] == ["4096"]


def systemd_analyze_security(unit: Path) -> float:
    """The overall exposure ``systemd-analyze security --offline=true`` gives a unit file."""
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                            capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found, result.stdout[-2000:] + result.stderr[-2000:]
    return float(found.group(1))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_security_rates_the_unit_at_most_two(tmp_path: Path) -> None:
    # 3.4 before SystemCallFilter, ProtectProc and the limits; 1.8 with them
    unit = tmp_path / "vllm-deploy.service"
    unit.write_text(UNIT.read_text().replace("/opt/vllm-deploy", str(ROOT)))
    assert systemd_analyze_security(unit) <= 2.0


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: point the unit at this checkout
    unit = tmp_path / "vllm-deploy.service"
    unit.write_text(UNIT.read_text().replace("/opt/vllm-deploy", str(ROOT)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "vllm-deploy.service" not in result.stdout + result.stderr  # no warnings about it


def test_env_example_names_only_known_flags() -> None:
    text = (ROOT / "systemd" / "vllm-deploy.env.example").read_text()
    names = re.findall(r"^#?VLLM_DEPLOY_(\w+)=", text, flags=re.MULTILINE)
    assert len(names) > 10
    assert [n for n in names if n.lower() not in BY_NAME] == []
    others = re.findall(r"^#?(?!VLLM_DEPLOY_)([A-Z]\w*)=", text, flags=re.MULTILINE)
    assert others == ["UNIT_MEMORY_MAX", "UNIT_TASKS_MAX"]  # install.sh's, not the agent's


# ---- (f) install.sh ----------------------------------------------------------------------------

def run_install(*args: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": f"{path}:{os.environ['PATH']}"})


def test_install_with_a_root_folder_installs_the_files_and_keeps_the_env_file(tmp_path: Path) -> None:
    fake_bin, root, calls = tmp_path / "bin", tmp_path / "root", tmp_path / "calls"
    fake_bin.mkdir()
    for tool in ("systemctl", "useradd", "usermod", "chown"):  # must not be called with --root
        (fake_bin / tool).write_text(f"#!/bin/sh\necho {tool} \"$@\" >> {calls}\n")
        (fake_bin / tool).chmod(0o755)
    result = run_install("--root", str(root), "--no-venv", path=fake_bin)
    assert result.returncode == 0, result.stderr
    assert not calls.exists(), calls.read_text()
    code = root / "opt/vllm-deploy"
    assert (code / "vLLMDeploy.py").read_bytes() == (ROOT / "vLLMDeploy.py").read_bytes()
    assert (code / "agent/service/sd_notify.py").is_file() and not (code / "tests").exists()
    assert not list(code.rglob("__pycache__"))
    unit = (root / "etc/systemd/system/vllm-deploy.service").read_text()
    assert unit == UNIT.read_text()  # the default prefix: paths unchanged
    env = root / "etc/vllm-deploy/vllm-deploy.env"
    assert env.read_text() == (ROOT / "systemd/vllm-deploy.env.example").read_text()
    assert env.stat().st_mode & 0o777 == 0o640
    mine = f"VLLM_DEPLOY_MODEL=/srv/models/{secrets.token_hex(4)}\n"
    env.write_text(mine)

    again = run_install("--root", str(root), "--no-venv", "--prefix", "/srv/vd", path=fake_bin)
    assert again.returncode == 0, again.stderr
    assert env.read_text() == mine and "kept the existing" in again.stderr  # never overwritten
    unit = (root / "etc/systemd/system/vllm-deploy.service").read_text()
    assert "ExecStart=/srv/vd/.venv/bin/python /srv/vd/vLLMDeploy.py" in unit
    assert "/opt/vllm-deploy" not in unit and (root / "srv/vd/vLLMDeploy.py").is_file()
    assert not calls.exists()


LIMITS = "etc/systemd/system/vllm-deploy.service.d/50-limits.conf"


def test_install_writes_memory_and_tasks_limits_from_the_env_file(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert run_install("--root", str(root), "--no-venv", path=tmp_path).returncode == 0
    assert not (root / LIMITS).exists()  # the example sets none: the unit's own apply
    env = root / "etc/vllm-deploy/vllm-deploy.env"
    memory, tasks = f"{secrets.randbelow(90) + 8}G", str(secrets.randbelow(4000) + 100)
    env.write_text(env.read_text() + f'UNIT_MEMORY_MAX="{memory}"\n  UNIT_TASKS_MAX={tasks}  \n')
    shutil.rmtree(root / "opt")
    result = run_install("--root", str(root), "--limits", path=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = (root / LIMITS).read_text().splitlines()
    assert lines[2:] == ["[Service]", f"MemoryMax={memory}", f"TasksMax={tasks}"]
    assert not (root / "opt").exists()  # --limits: the drop-in only, no code copied
    if shutil.which("systemd-analyze"):  # systemd takes the drop-in without a warning
        check = tmp_path / "check"
        (check / "vllm-deploy.service.d").mkdir(parents=True)
        (check / "vllm-deploy.service").write_text(
            UNIT.read_text().replace("/opt/vllm-deploy", str(ROOT)))
        shutil.copy(root / LIMITS, check / "vllm-deploy.service.d")
        shown = subprocess.run(["systemd-analyze", "verify", str(check / "vllm-deploy.service")],
                               capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0 and "50-limits.conf" not in shown.stderr, shown.stderr

    env.write_text(env.read_text() + "UNIT_MEMORY_MAX=\nUNIT_TASKS_MAX=infinity\n")  # last one wins
    assert run_install("--root", str(root), "--limits", path=tmp_path).returncode == 0
    assert (root / LIMITS).read_text().splitlines()[2:] == ["[Service]", "TasksMax=infinity"]
    env.write_text(env.read_text() + "UNIT_TASKS_MAX=\n")
    assert run_install("--root", str(root), "--limits", path=tmp_path).returncode == 0
    assert not (root / LIMITS).exists()


@pytest.mark.parametrize("line", ["UNIT_MEMORY_MAX=lots", "UNIT_TASKS_MAX=12G",
                                  "UNIT_MEMORY_MAX=1G ExecStartPre=/bin/sh"])
def test_install_refuses_a_limit_systemd_would_not_take(tmp_path: Path, line: str) -> None:
    root = tmp_path / "root"
    assert run_install("--root", str(root), "--no-venv", path=tmp_path).returncode == 0
    env = root / "etc/vllm-deploy/vllm-deploy.env"
    env.write_text(env.read_text() + line + "\n")
    result = run_install("--root", str(root), "--limits", path=tmp_path)
    assert result.returncode != 0 and f"{line.split('=')[0]}=" in result.stderr
    assert "infinity" in result.stderr and not (root / LIMITS).exists()


def test_install_refuses_a_relative_prefix_and_unknown_options(tmp_path: Path) -> None:
    for args, message in [(["--prefix", "opt/x"], "absolute path"), (["--bogus"], "unknown option")]:
        result = run_install("--root", str(tmp_path), "--no-venv", *args, path=tmp_path)
        assert result.returncode != 0 and message in result.stderr
