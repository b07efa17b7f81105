"""Chaos under load: pause, kill and crash containers while clients send jobs through the gateway.

Each scenario runs a few clients back to back through the gateway (:8935), some on the model whose
container is hit and some on another model, injects one fault, clears it and keeps the load on
until the hit model answers 200 again. What must hold:

- every job gets exactly one answer within its bound: a 200 with its own correct result, or a
  JSON 5xx error (``{"error", "detail"}``); never a connection error, a hang, a 4xx or plain text;
- the fault is felt (the hit model fails while it lasts) and stays contained (the other model
  keeps answering 200, the nodes are not restarted);
- once the fault is over the topology recovers by itself: the hit model answers 200 again
  within ``Workload.recovery_bound`` seconds (30, or two job timeouts on a slow host), with nobody
  restarting the gateway or the orchestrator.

``docker kill`` is a manual stop to Docker, so no restart policy brings the container back: the
test starts it again (as an operator would). ``crash`` SIGKILLs the main process as the OOM killer
would, and compose's restart policy alone brings the container back.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import shutil
import subprocess
import threading
import time
import wave
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import httpx
import numpy as np
import pytest
from docker_topology import (
    GATEWAY,
    NODES,
    PROCESSORS,
    bring_up,
    crash,
    kill,
    pause,
    restore_all,
    start,
    started_at,
    unpause,
    wait_healthy,
)

pytestmark = pytest.mark.docker

QUEUE_TIMEOUT = 10  # the orchestrator's -byocQueueTimeout default: a queued job waits this long at most
SLACK = 10  # seconds allowed on top of queue wait and job timeout, for the hops and a busy host
WARMUP_BOUND = 60  # seconds for the first 200s under load, before the fault
RECOVERY_BOUND = 30  # seconds from the end of a fault to the hit model's first 200, at least
BYSTANDER_CLIENTS = 2
BYSTANDER = {"passthrough": "grayscale"}  # the other model under load; green-tint otherwise


# --- jobs: a unique body per request and a check that the answer is that request's result ------


def _image(rng: np.random.Generator) -> bytes:
    ok, jpeg = cv2.imencode(".jpg", rng.integers(0, 256, (90, 160, 3), dtype=np.uint8))
    assert ok
    return jpeg.tobytes()


def _same_size_image(sent: bytes, received: bytes) -> bool:
    image = cv2.imdecode(np.frombuffer(received, np.uint8), cv2.IMREAD_COLOR)
    return image is not None and image.shape == (90, 160, 3)


@functools.cache
def _hello_world() -> tuple[int, np.ndarray]:
    """ "hello world" spoken by espeak-ng (sample rate, 16-bit samples): a second of real speech.

    Noise would not do: whisper decodes it again and again at higher temperatures (~10 s a job).
    """
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng makes the speech for whisper-tiny (apt-get install espeak-ng)")
    spoken = subprocess.run(
        ["espeak-ng", "--stdout", "hello world"], capture_output=True, check=True, timeout=30
    )
    with wave.open(io.BytesIO(spoken.stdout)) as speech:
        return speech.getframerate(), np.frombuffer(speech.readframes(speech.getnframes()), "<i2")


def _speech(rng: np.random.Generator) -> bytes:
    """The spoken words with a faint noise of their own, so that every body is different."""
    rate, samples = _hello_world()
    noisy = np.clip(samples + rng.normal(0, 3, samples.shape), -32768, 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(noisy.tobytes())
    return buffer.getvalue()


def _transcript(sent: bytes, received: bytes) -> bool:
    try:
        return "hello" in json.loads(received)["text"].lower()
    except (ValueError, KeyError, TypeError, AttributeError):
        return False


@dataclass(frozen=True)
class Workload:
    content_type: str
    body: Callable[[np.random.Generator], bytes]
    correct: Callable[[bytes, bytes], bool]
    timeout: int = 6  # X-Timeout-Seconds of every job: shorter than a fault, so timeouts happen
    clients: int = 3  # clients on this model when it is the one hit

    @property
    def answer_bound(self) -> float:
        """Seconds within which every job must be answered: queue wait, run, hops."""
        return QUEUE_TIMEOUT + self.timeout + SLACK

    @property
    def recovery_bound(self) -> float:
        """Seconds from the end of a fault to the first 200: time to finish the job the fault
        interrupted (capacity is held until its work really stops) and to run a new one."""
        return max(RECOVERY_BOUND, 2 * self.timeout)

    @property
    def fault_seconds(self) -> float:
        """How long a fault lasts: longer than a job's timeout."""
        return self.timeout + 4


WORKLOADS = {
    "green-tint": Workload("image/jpeg", _image, _same_size_image),
    "grayscale": Workload("image/jpeg", _image, _same_size_image),
    "passthrough": Workload("application/octet-stream", lambda rng: rng.bytes(16384), lambda s, r: s == r),
    # whisper runs one job at a time; a second of speech takes it 0.1 s idle, 15 s on a busy host.
    "whisper-tiny": Workload("audio/wav", _speech, _transcript, timeout=10, clients=2),
}


# --- the load ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    service: str
    started: float  # time.monotonic() when the request was sent
    seconds: float
    status: int | None  # None: no HTTP answer at all
    problem: str | None  # why this answer breaks the contract, None if it keeps it


def _judge(workload: Workload, sent: bytes, response: httpx.Response, seconds: float) -> str | None:
    if seconds > workload.answer_bound:
        return f"answered after {seconds:.1f} s (bound {workload.answer_bound} s)"
    if response.status_code == 200:
        return None if workload.correct(sent, response.content) else "200 with a result that is not its own"
    try:
        error = response.json()
    except ValueError:
        return f"{response.status_code} that is not JSON: {response.text[:120]!r}"
    if not (isinstance(error, dict) and "error" in error and "detail" in error):
        return f"{response.status_code} without error and detail: {response.text[:120]!r}"
    if response.status_code < 500:
        return f"{response.status_code} for a valid job: {response.text[:160]}"
    return None


@dataclass
class Load:
    """Clients sending jobs back to back through the gateway, each on its own connection."""

    workloads: dict[str, Workload]
    services: list[str]
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for number, service in enumerate(self.services):
            thread = threading.Thread(target=self._client, args=(service, number), daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop sending; every request in flight must be answered within its bound."""
        self._stop.set()
        wait = max(self.workloads[service].answer_bound for service in self.services) + 5
        deadline = time.monotonic() + wait
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        hung = sum(thread.is_alive() for thread in self._threads)
        assert hung == 0, f"{hung} clients still wait for an answer {wait:.0f} s after the load stopped"

    def _client(self, service: str, number: int) -> None:
        workload, model = self.workloads[service], PROCESSORS[service][1]
        rng = np.random.default_rng(number + int(time.time() * 1000))
        headers = {
            "X-Model-Id": model,
            "Content-Type": workload.content_type,
            "X-Timeout-Seconds": str(workload.timeout),
        }
        with httpx.Client(timeout=workload.answer_bound + 5) as client:
            while not self._stop.is_set():
                body = workload.body(rng)
                started = time.monotonic()
                try:
                    response = client.post(f"{GATEWAY}/process/request/chaos", content=body, headers=headers)
                except httpx.HTTPError as exc:
                    seconds = time.monotonic() - started
                    outcome = Outcome(service, started, seconds, None, f"no answer: {exc!r}")
                else:
                    seconds = time.monotonic() - started
                    problem = _judge(workload, body, response, seconds)
                    outcome = Outcome(service, started, seconds, response.status_code, problem)
                with self._lock:
                    self.outcomes.append(outcome)

    def ok_since(self, service: str, since: float) -> bool:
        with self._lock:
            return any(o.service == service and o.status == 200 and o.started >= since for o in self.outcomes)


def _summary(outcomes: list[Outcome]) -> str:
    counts: dict[tuple[str, int | None], int] = {}
    for outcome in outcomes:
        counts[(outcome.service, outcome.status)] = counts.get((outcome.service, outcome.status), 0) + 1
    return ", ".join(f"{service} {status}: {n}" for (service, status), n in sorted(counts.items(), key=str))


def _fitted(service: str) -> Workload:
    """The service's workload once it answers 200, its timeout raised to 3x that job's time.

    The model must answer before the load starts (the previous test may have just restored it),
    and on a host busy with other work a job can take many times its usual time: a timeout
    fitted to the host keeps timeouts for the faults.
    """
    workload, model = WORKLOADS[service], PROCESSORS[service][1]
    headers = {"X-Model-Id": model, "Content-Type": workload.content_type, "X-Timeout-Seconds": "60"}
    deadline = time.monotonic() + 90
    status = None
    while time.monotonic() < deadline:
        body = workload.body(np.random.default_rng())
        started = time.monotonic()
        status = httpx.post(
            f"{GATEWAY}/process/request/warmup", content=body, headers=headers, timeout=75
        ).status_code
        if status == 200:
            seconds = time.monotonic() - started
            return dataclasses.replace(workload, timeout=max(workload.timeout, math.ceil(3 * seconds)))
        time.sleep(0.5)
    pytest.fail(f"{model} does not answer 200 before the test (last: {status})")


def run_chaos(target: str, hit: str, fault: Callable[[], None], clear: Callable[[], None]) -> None:
    """Load on ``target`` and a bystander, ``fault`` on container ``hit``, then ``clear`` it."""
    bystander = BYSTANDER.get(target, "green-tint")
    untouched = [name for name in NODES if name != hit]
    before = [started_at(name) for name in untouched]
    workloads = {target: _fitted(target), bystander: _fitted(bystander)}
    load = Load(workloads, [target] * workloads[target].clients + [bystander] * BYSTANDER_CLIENTS)
    loaded = time.monotonic()
    load.start()
    try:
        while not (load.ok_since(target, loaded) and load.ok_since(bystander, loaded)):
            assert time.monotonic() - loaded < WARMUP_BOUND, f"no 200s under load: {_summary(load.outcomes)}"
            time.sleep(0.2)
        time.sleep(1)
        fault_started = time.monotonic()
        fault()
        time.sleep(workloads[target].fault_seconds)
        clear()
        cleared = time.monotonic()
        recovery_bound = workloads[target].recovery_bound
        while not load.ok_since(target, cleared) and time.monotonic() - cleared < recovery_bound:
            time.sleep(0.2)
        recovered = load.ok_since(target, cleared)
        time.sleep(2)  # a little steady state after recovery
    finally:
        load.stop()
    outcomes = load.outcomes
    summary = _summary(outcomes)
    problems = [o for o in outcomes if o.problem]
    assert not problems, f"{len(problems)} broken answers ({summary}), e.g. " + "; ".join(
        f"{o.service} {o.status}: {o.problem}" for o in problems[:8]
    )
    felt = any(o.service == target and o.status != 200 and o.started >= fault_started for o in outcomes)
    assert felt, f"the fault was not felt: {summary}"
    assert recovered, (
        f"{target} did not answer 200 within {recovery_bound} s after the fault ended: {summary}"
    )
    if hit not in NODES:
        during = [o for o in outcomes if o.service == bystander and fault_started <= o.started < cleared]
        assert any(o.status == 200 for o in during), (
            f"{bystander} stopped too while {hit} was down: {summary}"
        )
    assert [started_at(name) for name in untouched] == before, "a node was restarted"


@pytest.fixture(scope="module", autouse=True)
def topology() -> None:
    bring_up()


@pytest.fixture(autouse=True)
def healthy_before_and_after() -> object:
    restore_all()
    yield
    restore_all()


@pytest.mark.parametrize("service", list(PROCESSORS))
def test_a_paused_processor_fails_its_jobs_as_json_and_recovers_when_unpaused(service: str) -> None:
    container = PROCESSORS[service][0]
    run_chaos(service, container, lambda: pause(container), lambda: unpause(container))


@pytest.mark.parametrize("service", list(PROCESSORS))
def test_a_killed_processor_fails_its_jobs_as_json_and_recovers_when_started(service: str) -> None:
    container = PROCESSORS[service][0]

    def bring_back() -> None:
        start(container)
        wait_healthy(container)

    run_chaos(service, container, lambda: kill(container), bring_back)


def test_a_crashed_processor_is_restarted_by_compose_and_recovers_under_load() -> None:
    container = PROCESSORS["green-tint"][0]
    run_chaos("green-tint", container, lambda: crash(container), lambda: wait_healthy(container))


def test_a_killed_orchestrator_fails_jobs_as_json_and_the_gateway_recovers() -> None:
    def bring_back() -> None:
        start("byoc-orchestrator")
        wait_healthy("byoc-orchestrator")

    run_chaos("passthrough", "byoc-orchestrator", lambda: kill("byoc-orchestrator"), bring_back)


def test_a_crashed_orchestrator_is_restarted_by_compose_and_the_gateway_recovers() -> None:
    run_chaos(
        "green-tint",
        "byoc-orchestrator",
        lambda: crash("byoc-orchestrator"),
        lambda: wait_healthy("byoc-orchestrator"),
    )


def test_every_job_has_its_own_answer_under_load_without_faults() -> None:
    """The baseline the chaos runs are judged against: no fault, no broken answer, all 200."""
    load = Load(
        {service: _fitted(service) for service in ("passthrough", "green-tint")},
        ["passthrough"] * 3 + ["green-tint"] * 2,
    )
    load.start()
    time.sleep(8)
    load.stop()
    failed = [o for o in load.outcomes if o.status != 200 or o.problem]
    assert load.outcomes and not failed, _summary(load.outcomes)
