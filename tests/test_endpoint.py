"""External teacher endpoints (teacher/endpoint.py).

Engine-free: config checks, the start-up probe and fault injection (retries, drop counting, the
failure-rate bound, the API key) against a small local HTTP server that speaks the parts of vLLM's
OpenAI API we use.  Marked ``engine``: a real ``vllm serve`` of the tiny teacher on 127.0.0.1, scored
against transformers, and 2-step distillation and judge runs through the real ``rl`` command.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import msgspec
import pytest

from shared.config import ConfigError, load
from shared.wire import TEACHER_FAILED, RolloutBatch, ScoreRequest, ScoreResult, decode, encode
from teacher.endpoint import PROBE_TEXT, EndpointError, EndpointTeacher, probe
from tests.conftest import RL, ROOT, stop_process_group

KEY_VAR = "OPD_TEST_TEACHER_API_KEY"
KEY = "sk-test-0123456789abcdef"
BAD = 99  # a prompt containing this token id always gets HTTP 500 from the fake server


def fake_logprob(token: int, position: int) -> float:
    return -0.1 * (token % 7 + 1) - 0.01 * position


def fake_top(k: int, position: int) -> dict:
    """The fake server's ``k`` most likely tokens at a position (``prompt_logprobs = k``): ids 40, 41, ...
    with log-probs -0.05, -0.10, ... (minus 0.01 per position)."""
    return {str(40 + j): {"logprob": -0.05 * (j + 1) - 0.01 * position, "rank": j + 1} for j in range(k)}


class FakeServer(ThreadingHTTPServer):
    """``/v1/models``, ``/tokenize`` (vllm=True only) and ``/v1/completions`` with token-id prompts and
    ``prompt_logprobs``.  ``faults``: a list consumed one per completions request, each None (answer),
    an HTTP status, a float (seconds to stall before answering), a str (a reply without log-probs) or a function
    that rewrites the ``prompt_logprobs`` entries of the reply (wrong numbers, wrong positions)."""

    daemon_threads = True

    def __init__(self, tokenizer, vllm: bool = True, models=("tiny-teacher",), shift: int = 0, context: int = 65):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.tok, self.vllm, self.models, self.shift, self.context = tokenizer, vllm, list(models), shift, context
        self.faults: list = []
        self.max_logprobs = 20  # vLLM's default --max-logprobs
        self.requests: list[tuple[str, dict, dict]] = []  # (path, headers, body)
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def completions(self, path: str) -> list[dict]:
        return [b for p, _, b in self.requests if p == path]


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        srv: FakeServer = self.server
        srv.requests.append((self.path, dict(self.headers), {}))
        if self.path == "/v1/models":
            return self._reply(200, {"data": [{"id": m, "owned_by": "vllm", "max_model_len": srv.context}
                                              for m in srv.models]})
        self._reply(404, {"error": {"message": "not found"}})

    def do_POST(self):
        srv: FakeServer = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv.requests.append((self.path, dict(self.headers), body))
        if self.path == "/tokenize" and srv.vllm:
            ids = srv.tok(body["prompt"], add_special_tokens=body.get("add_special_tokens", True)).input_ids
            return self._reply(200, {"tokens": [t + srv.shift for t in ids], "count": len(ids), "max_model_len": 64})
        if self.path != "/v1/completions":
            return self._reply(404, {"error": {"message": "not found"}})
        with srv.lock:
            fault = srv.faults.pop(0) if srv.faults else None
        if isinstance(fault, float):
            time.sleep(fault)
        elif isinstance(fault, str):  # a 200 reply of the wrong shape
            return self._reply(200, {"choices": [{"index": 0, "text": fault}]})
        elif isinstance(fault, int):
            return self._reply(fault, {"error": {"message": f"injected {fault}"}})
        prompt = body["prompt"]
        if isinstance(prompt, list) and BAD in prompt:
            return self._reply(500, {"error": {"message": "injected 500 for a bad prompt"}})
        if body.get("prompt_logprobs") is not None:
            if not srv.vllm:
                return self._reply(400, {"error": {"message": "unknown field prompt_logprobs"}})
            k = body["prompt_logprobs"]
            if k > srv.max_logprobs:  # as vLLM refuses it
                return self._reply(400, {"error": {"message": f"Requested prompt logprobs of {k}, which is greater "
                                                              f"than max allowed: {srv.max_logprobs}"}})
            entries = [None] + [{**fake_top(k, i), str(t): {"logprob": fake_logprob(t, i), "rank": 1}}
                                for i, t in enumerate(prompt)][1:]
            if callable(fault):
                entries = fault(entries)
            return self._reply(200, {"choices": [{"index": 0, "text": "", "prompt_logprobs": entries}]})
        n = body.get("n", 1)
        text = "dcba" if isinstance(prompt, list) else f"<{prompt}>"
        ids = srv.tok(text, add_special_tokens=False).input_ids
        choices = [{"index": k, "text": text, "finish_reason": "stop", **({"token_ids": ids} if srv.vllm else {})}
                   for k in range(n)]
        self._reply(200, {"choices": choices})


@pytest.fixture(scope="module")
def tok(tiny_pair):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_pair[0]))


@pytest.fixture
def server(tok):
    srv = FakeServer(tok)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _cfg(url: str, *extra: str):
    return load(["--teacher.endpoint", url, "--teacher.retry_backoff_s", "0.01", "--teacher.timeout_s", "2", *extra])


def _teacher(cfg, tiny_pair, prompts: str = "ids") -> EndpointTeacher:
    return EndpointTeacher(msgspec.json.encode(cfg), "tiny-teacher", prompts, str(tiny_pair[0]))


def _score(teacher: EndpointTeacher, prompts, completions) -> ScoreResult:
    return decode(teacher.score(encode(ScoreRequest(prompt_ids=prompts, completion_ids=completions))), ScoreResult)


# ------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("argv, match", [
    (["--teacher.endpoint", "ftp://127.0.0.1/v1"], r"^teacher\.endpoint: expected an http:// or https:// base URL"),
    (["--teacher.endpoint", "http://127.0.0.1:99999/v1"], r"^teacher\.endpoint: expected"),
    (["--teacher.endpoint", "http://user:pw@127.0.0.1:8000/v1"], r"^teacher\.endpoint: must not contain credentials"),
    (["--teacher.model", "m"], r"^teacher\.model: only used with teacher\.endpoint"),
    (["--teacher.api_key_env", "OPENAI_API_KEY"], r"^teacher\.api_key_env: only used with teacher\.endpoint"),
    (["--teacher.endpoint", "http://h/v1", "--teacher.api_key_env", "MYKEY"], r"^teacher\.api_key_env: \"MYKEY\" must be"),
    (["--teacher.endpoint", "http://h/v1", "--teacher_gpu_ids", "0"], r"^teacher\.gpu_ids: an external teacher"),
    (["--teacher.endpoint", "http://h/v1", "--teacher.max_failure_rate", "1.5"], r"^teacher\.max_failure_rate: expected"),
    (["--teacher.endpoint", "http://h/v1", "--teacher.max_concurrency", "0"], r"^teacher\.max_concurrency: expected"),
    (["--teacher.endpoint_api", "chat"], r"^teacher\.endpoint_api: only used with teacher\.endpoint$"),
    (["--teacher.endpoint", "http://h/v1", "--teacher.endpoint_api", "chat"],
     r"^teacher\.endpoint_api: \"chat\" returns text, not the per-token teacher log-probs that "
     r"trainer\.loss\.teacher_tau = 1 needs; set trainer\.loss\.kl_coef = 0"),
    (["--teacher.endpoint", "http://h/v1", "--teacher.endpoint_api", "chat", "--trainer.loss.kl_coef", "0",
      "--orchestrator.workflow", "judge", "--orchestrator.judge.verdict", "loglik"],
     r"^teacher\.endpoint_api: \"chat\" returns text, not the log-likelihoods that orchestrator\.judge\.verdict"),
    (["--teacher.endpoint", "http://h/v1", "--teacher.endpoint_api", "messages"], r"^teacher\.endpoint_api: "),
])
def test_endpoint_config_errors_name_the_key(argv, match):
    with pytest.raises(ConfigError, match=match):
        load(argv)


def test_the_plan_has_one_cpu_teacher_actor_forwarding_to_the_endpoint():
    from shared.placement import describe, plan

    actors = [a for a in plan(load(["--teacher.endpoint", "http://127.0.0.1:8000/v1"])) if a.role == "teacher"]
    assert len(actors) == 1 and actors[0].devices == [] and actors[0].endpoint == "http://127.0.0.1:8000/v1"
    assert "teacher-0      CPU -> http://127.0.0.1:8000/v1" in describe(actors)


# ------------------------------------------------------------------------------------------------
# Start-up probe


def test_probe_accepts_a_vllm_server_for_scoring(server, tok):
    info = probe(_cfg(server.url), tok)
    assert info == {"endpoint_model": "tiny-teacher", "endpoint_prompts": "ids"}
    scored = server.completions("/v1/completions")[-1]
    assert scored["prompt"] == tok(PROBE_TEXT, add_special_tokens=False).input_ids
    assert scored["prompt_logprobs"] == 0 and scored["max_tokens"] == 0 and scored["echo"] is True


def test_probe_fails_in_seconds_on_an_unreachable_endpoint(tok):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"^teacher\.endpoint: cannot use http://127\.0\.0\.1:{port}/v1 \(GET /v1/models: "
                                          "ConnectionRefusedError"):
        probe(_cfg(f"http://127.0.0.1:{port}/v1"), tok)
    assert time.perf_counter() - t0 < 5


def test_probe_names_the_missing_model_and_what_is_served_and_a_short_context(tok):
    srv = FakeServer(tok, models=("a", "b"), context=64)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ConfigError, match=r"^teacher\.endpoint: a at .* has max_model_len 64; scoring sequences of "
                                              r"model\.max_model_len = 64 tokens needs at least 65 \(vllm serve --max"):
            probe(_cfg(srv.url, "--teacher.model", "a"), tok)
        with pytest.raises(ConfigError, match=r"^teacher\.model: \"x\" is not served by .* \(it serves: a, b\)$"):
            probe(_cfg(srv.url, "--teacher.model", "x"), tok)
        with pytest.raises(ConfigError, match=r"^teacher\.model: .* serves 2 models \(a, b\); name one$"):
            probe(_cfg(srv.url), tok)
    finally:
        srv.shutdown()
        srv.server_close()


def test_probe_refuses_scoring_on_a_server_without_logprobs_but_allows_a_judge(tok):
    srv = FakeServer(tok, vllm=False)  # no /tokenize, no prompt_logprobs: an Ollama-like server
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ConfigError) as e:
            probe(_cfg(srv.url), tok)
        msg = str(e.value)
        assert msg.startswith('teacher.endpoint: orchestrator.workflow = "distill" with trainer.loss.teacher_tau = 1 '
                              "needs per-token teacher log-probs")
        assert "no /tokenize route" in msg and "\n" not in msg
        judge = _cfg(srv.url, "--orchestrator.workflow", "judge", "--trainer.loss.kl_coef", "0")
        assert probe(judge, tok) == {"endpoint_model": "tiny-teacher", "endpoint_prompts": "text"}
    finally:
        srv.shutdown()
        srv.server_close()


def test_probe_refuses_scoring_when_the_server_tokenizes_differently(tok):
    srv = FakeServer(tok, shift=1)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ConfigError, match=r"^teacher\.endpoint: .*lacks them: .*the server tokenizes"):
            probe(_cfg(srv.url), tok)
    finally:
        srv.shutdown()
        srv.server_close()


def test_probe_needs_the_named_key_variable_and_reports_a_refused_key(server, tok, monkeypatch):
    monkeypatch.delenv(KEY_VAR, raising=False)
    cfg = _cfg(server.url, "--teacher.api_key_env", KEY_VAR)
    with pytest.raises(ConfigError, match=rf"^teacher\.api_key_env: environment variable {KEY_VAR} is not set"):
        probe(cfg, tok)
    monkeypatch.setenv(KEY_VAR, KEY)
    probe(cfg, tok)
    assert all(h.get("Authorization") == f"Bearer {KEY}" for _, h, _ in server.requests)


# ------------------------------------------------------------------------------------------------
# Fault injection: retries, drops, the failure-rate bound


def test_score_values_and_retries_of_transient_errors(server, tiny_pair):
    teacher = _teacher(_cfg(server.url, "--teacher.retries", "3"), tiny_pair)
    server.faults = [503, 0.0, 502]  # two of the first three requests fail once each; the retries succeed
    res = _score(teacher, [[1, 4], [1, 5, 6]], [[7, 8, 9], [10]])
    assert res.failed == []
    assert res.logprobs[0] == pytest.approx([fake_logprob(t, i) for i, t in ((2, 7), (3, 8), (4, 9))])
    assert res.logprobs[1] == pytest.approx([fake_logprob(10, 3)])
    assert teacher.stats() == {"teacher/endpoint_requests": 2.0, "teacher/endpoint_failed": 0.0,
                               "teacher/endpoint_retries": 2.0, "teacher/endpoint_failure_rate": 0.0}


def test_topk_scoring_returns_the_top_k_most_likely_first_and_refuses_an_entry_without_them(server, tiny_pair):
    """``ScoreRequest.topk = 3``: ``prompt_logprobs = 3`` is sent, and each position's 3 most likely tokens come
    back sorted (here the fake's ids 40, 41, 42 at -0.05, -0.10, -0.15 minus 0.01 per position; the scored
    token's own entry is not among them); a reply whose entries lack the top 3 is refused and counted."""
    teacher = _teacher(_cfg(server.url, "--trainer.loss.teacher_topk", "3"), tiny_pair)
    req = ScoreRequest(prompt_ids=[[1, 4], [1, 5, 6]], completion_ids=[[13, 6], [20]], topk=3)  # -0.7 - 0.01 * position
    res = decode(teacher.score(encode(req)), ScoreResult)
    assert res.failed == [] and server.completions("/v1/completions")[-1]["prompt_logprobs"] == 3
    assert res.logprobs[0] == pytest.approx([fake_logprob(13, 2), fake_logprob(6, 3)])
    assert res.topk_ids == [[[40, 41, 42], [40, 41, 42]], [[40, 41, 42]]]
    assert res.topk_logprobs[0][0] == pytest.approx([-0.07, -0.12, -0.17])
    assert res.topk_logprobs[0][1] == pytest.approx([-0.08, -0.13, -0.18])
    assert res.topk_logprobs[1][0] == pytest.approx([-0.08, -0.13, -0.18])
    server.faults = [lambda entries: [e and dict(list(e.items())[-1:]) for e in entries]]  # the scored token only
    res = decode(teacher.score(encode(ScoreRequest(prompt_ids=[[1, 4]], completion_ids=[[7]], topk=3))), ScoreResult)
    assert res.failed == [0] and res.topk_ids == [[]] and teacher.stats()["teacher/endpoint_failed"] == 1.0


def test_probe_asks_for_the_top_k_and_refuses_a_server_that_serves_fewer(server, tok):
    cfg = _cfg(server.url, "--trainer.loss.teacher_topk", "5", "--trainer.loss.kl_coef", "0")
    assert probe(cfg, tok)["endpoint_prompts"] == "ids"
    assert server.completions("/v1/completions")[-1]["prompt_logprobs"] == 5
    server.max_logprobs = 4
    with pytest.raises(ConfigError, match=r"^trainer\.loss\.teacher_topk: 5 needs the teacher's top-5 log-probs at "
                                          r"each position, and .* lacks them: /completions with prompt_logprobs = 5 "
                                          r"fails \(.*HTTP 400.*\)\. Serve the teacher with vLLM \(vllm serve "
                                          r"--max-logprobs 20\)") as e:
        probe(cfg, tok)
    assert "\n" not in str(e.value)


def test_a_chat_endpoint_cannot_serve_the_top_k():
    with pytest.raises(ConfigError, match=r'^trainer\.loss\.teacher_topk: teacher\.endpoint_api = "chat" returns text'):
        load(["--teacher.endpoint", "http://h/v1", "--teacher.endpoint_api", "chat", "--trainer.loss.kl_coef", "0",
              "--trainer.loss.teacher_topk", "4", "--orchestrator.workflow", "judge"])


def test_a_stalled_request_times_out_and_is_retried(server, tiny_pair):
    teacher = _teacher(_cfg(server.url, "--teacher.timeout_s", "0.3", "--teacher.retries", "1"), tiny_pair)
    server.faults = [1.0]  # the first request stalls past the timeout
    t0 = time.perf_counter()
    res = _score(teacher, [[1]], [[5, 6]])
    assert res.failed == [] and len(res.logprobs[0]) == 2
    assert teacher.retries == 1 and 0.3 <= time.perf_counter() - t0 < 1.0


def test_unscorable_completions_are_reported_and_counted_and_4xx_is_not_retried(server, tiny_pair):
    teacher = _teacher(_cfg(server.url, "--teacher.retries", "2", "--teacher.max_failure_rate", "1"), tiny_pair)
    res = _score(teacher, [[1], [1], [1]], [[5], [BAD, 6], [7]])
    assert res.failed == [1] and res.logprobs[1] == [] and len(res.logprobs[2]) == 1
    assert len([b for b in server.completions("/v1/completions") if BAD in b["prompt"]]) == 3  # 1 + 2 retries
    assert teacher.failed == 1 and teacher.retries == 2
    server.faults = [400]  # a client error is final: no retry
    assert _score(teacher, [[1]], [[5]]).failed == [0]
    assert teacher.retries == 2 and teacher.stats()["teacher/endpoint_failed"] == 2.0
    server.faults = ["no log-probs here"]  # a malformed reply fails the item, and is not retried
    assert _score(teacher, [[1]], [[5]]).failed == [0]
    assert teacher.retries == 2 and teacher.failed == 3 and "unexpected reply (KeyError" in teacher.last_error


def _set(value):
    """A fault: the last position's log-prob replaced by ``value`` (json writes NaN/Infinity as Python reads them)."""
    def rewrite(entries):
        (token,) = entries[-1]
        return [*entries[:-1], {token: {"logprob": value, "rank": 1}}]
    return rewrite


@pytest.mark.parametrize("entries, problem", [
    ([None, {"5": {"logprob": -0.5}}, {"6": {"logprob": 0.7}}], "log-prob 0.7 of token 6 is not a log-probability"),
    ([None, {"5": {"logprob": -0.5}}, {"6": {"logprob": float("inf")}}], "log-prob inf of token 6"),
    ([None, {"5": {"logprob": float("-inf")}}, {"6": {"logprob": -1.0}}], "log-prob -inf of token 5"),
    ([None, {"5": {"logprob": float("nan")}}, {"6": {"logprob": -1.0}}], "log-prob nan of token 5"),
    ([None, {"5": {"logprob": -0.5}}], "prompt_logprobs for 2 positions, expected 3 (1 prompt + 2 completion"),
    ([None, {"5": -0.5}, {"6": -1.0}, {"7": -1.0}], "prompt_logprobs for 4 positions, expected 3"),
    ([None, {"5": {"logprob": -0.5}}, {"9": {"logprob": -1.0}}], "no log-prob for token 6"),
])
def test_completion_logprobs_refuses_what_is_no_log_probability(entries, problem):
    from teacher.endpoint import completion_logprobs

    reply = json.loads(json.dumps({"choices": [{"prompt_logprobs": entries}]}))  # NaN/Infinity survive as Python's json
    with pytest.raises(ValueError, match=re.escape(problem)):
        completion_logprobs(reply, 1, [5, 6])


def test_completion_logprobs_keeps_zero_and_rounding_above_it():
    from teacher.endpoint import completion_logprobs

    reply = {"choices": [{"prompt_logprobs": [None, {"5": {"logprob": 0.0}}, {"6": {"logprob": 3e-5}}]}]}
    assert completion_logprobs(reply, 1, [5, 6]) == [0.0, 3e-5]  # probability 1 (up to float rounding)


def test_bad_log_probs_from_the_endpoint_are_refused_and_counted(server, tiny_pair):
    """Positive log-probs, Infinity, NaN and the wrong number of positions from a server: each such completion is
    failed (the orchestrator drops it and counts it in ``teacher/score_failed``), never handed on with its numbers;
    the good one between them is scored exactly."""
    teacher = _teacher(_cfg(server.url, "--teacher.retries", "2", "--teacher.max_failure_rate", "1",
                            "--teacher.max_concurrency", "1"), tiny_pair)  # one at a time: the faults in item order
    server.faults = [_set(0.5), _set(float("inf")), _set(float("nan")), None, lambda e: e[:-1]]
    res = _score(teacher, [[1]] * 5, [[5, 6]] * 5)
    assert res.failed == [0, 1, 2, 4]
    assert [res.logprobs[i] for i in (0, 1, 2, 4)] == [[], [], [], []]
    assert res.logprobs[3] == pytest.approx([fake_logprob(5, 1), fake_logprob(6, 2)])
    assert teacher.failed == 4 and teacher.retries == 0  # a malformed reply is final: not retried
    assert "is not a log-probability" in teacher.last_error or "positions" in teacher.last_error


def test_the_failure_rate_bound_stops_the_run(server, tiny_pair):
    prompts, comps = [[1]] * 20, [[5]] * 15 + [[BAD]] * 5  # 25% fail
    ok = _teacher(_cfg(server.url, "--teacher.retries", "0", "--teacher.max_failure_rate", "0.3"), tiny_pair)
    assert len(_score(ok, prompts, comps).failed) == 5
    strict = _teacher(_cfg(server.url, "--teacher.retries", "0", "--teacher.max_failure_rate", "0.2"), tiny_pair)
    with pytest.raises(EndpointError) as e:
        _score(strict, prompts, comps)
    msg = str(e.value)
    assert "5 of 20 requests failed after 0 retries (25% > teacher.max_failure_rate = 0.2)" in msg
    assert "HTTP 500 injected 500 for a bad prompt" in msg and "\n" not in msg


def test_generate_marks_failed_prompts_and_decodes_text_prompts(server, tiny_pair, tok):
    teacher = _teacher(_cfg(server.url, "--teacher.retries", "0", "--teacher.max_failure_rate", "1"), tiny_pair)
    batch = decode(teacher.generate([[1, 4, 5], [1, BAD]], [7, 8], 2, 1.0, 1.0, 8, 100), RolloutBatch)
    assert [(r.prompt_index, r.text, r.finish_reason) for r in batch.rollouts] == [
        (7, "dcba", "stop"), (7, "dcba", "stop"), (8, "", TEACHER_FAILED), (8, "", TEACHER_FAILED)]
    sent = next(b for b in server.completions("/v1/completions") if b["prompt"] == [1, 4, 5])  # sent concurrently
    assert sent["n"] == 2 and sent["seed"] == 107 and sent["max_tokens"] == 8
    texts = _teacher(_cfg(server.url), tiny_pair, prompts="text")  # a server that does not take token ids
    ids = tok("ab=", add_special_tokens=False).input_ids
    out = decode(texts.generate([ids], [0], 1, 0.0, 1.0, 8, 0), RolloutBatch).rollouts[0]
    assert server.completions("/v1/completions")[-1]["prompt"] == "ab="
    assert out.text == "<ab=>" and out.completion_ids == tok("<ab=>", add_special_tokens=False).input_ids


def test_the_api_key_goes_only_into_the_authorization_header(server, tiny_pair, monkeypatch):
    monkeypatch.setenv(KEY_VAR, KEY)
    cfg = _cfg(server.url, "--teacher.api_key_env", KEY_VAR, "--teacher.retries", "0", "--teacher.max_failure_rate", "0")
    teacher = _teacher(cfg, tiny_pair)
    with pytest.raises(EndpointError) as e:
        _score(teacher, [[1]] * 16, [[BAD]] * 16)
    assert KEY not in str(e.value) and KEY not in repr(teacher.client)
    for _, headers, body in server.requests:
        assert headers["Authorization"] == f"Bearer {KEY}" and KEY not in json.dumps(body)
    from shared.config import to_toml
    from shared.redact import redact_toml

    assert KEY not in redact_toml(to_toml(cfg)) and KEY_VAR in redact_toml(to_toml(cfg))


def test_rl_refuses_an_unreachable_endpoint_in_seconds(tiny_pair, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    p = subprocess.run([RL, "@", "experiments/reverse_text/rl.toml", "--output_dir", str(tmp_path / "r"),
                        "--teacher.endpoint", f"http://127.0.0.1:{port}/v1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: teacher.endpoint: cannot use http://127.0.0.1:{port}/v1")
    assert time.perf_counter() - t0 < 60  # interpreter + transformers import; the probe itself takes milliseconds


# ------------------------------------------------------------------------------------------------
# A real `vllm serve` of the tiny teacher on 127.0.0.1 (the teacher without LoRA: vLLM's CPU path crashes on
# prompt_logprobs with LoRA enabled)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_serve(tiny_pair, tmp_path_factory):
    """The base URL of `vllm serve` on the tiny teacher (served as "tiny-teacher"; a 33-token context scores the
    experiments' 32-token sequences: the API counts one output position even when nothing is generated)."""
    import urllib.request

    port = _free_port()
    log = tmp_path_factory.mktemp("vllm") / "serve.log"
    template = log.parent / "chat_template.jinja"  # /v1/chat/completions: the contents as plain text
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_pair[0]),
           "--served-model-name", "tiny-teacher", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "33", "--enforce-eager", "--seed", "0",
           "--chat-template", str(template),
           "--distributed-executor-backend", "uni"]  # the worker inside the engine-core process: one process fewer
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 600  # ~1 min on a quiet machine, 4 min with 2 cores shared
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"vllm serve not up after 600 s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop_process_group(proc, 30)


class FaultProxy(ThreadingHTTPServer):
    """Forwards to ``upstream``; every ``every``-th POST to /v1/completions gets HTTP 503 instead.
    ``posts`` records the path of every POST."""

    daemon_threads = True

    def __init__(self, upstream: str, every: int):
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream, self.every, self.count, self.injected = upstream, every, 0, 0
        self.posts: list[str] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


@contextlib.contextmanager
def running_proxy(upstream: str, every: int):
    """A :class:`FaultProxy` serving on a thread for the ``with`` block."""
    proxy = FaultProxy(upstream, every)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()


class _ProxyHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _forward(self, method: str) -> None:
        import http.client
        from urllib.parse import urlsplit

        srv: FaultProxy = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "POST" else None
        if method == "POST":
            srv.posts.append(self.path)
        if method == "POST" and self.path == "/v1/completions":
            with srv.lock:
                srv.count += 1
                fail = srv.count % srv.every == 0
                srv.injected += fail
            if fail:
                data = b'{"error": {"message": "injected 503"}}'
                self.send_response(503)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
        up = urlsplit(srv.upstream)
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
        conn.request(method, self.path, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        self.send_response(resp.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._forward("GET")

    def do_POST(self):
        self._forward("POST")


SMALL = ["--max_steps", "2", "--orchestrator.batch_size", "8", "--orchestrator.eval.num_prompts", "16",
         "--wandb.mode", "disabled"]


def _rl(config: str, out: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([RL, "@", config, "--output_dir", str(out), *SMALL, "--teacher.endpoint", url, *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)


def _train_rows(out: Path) -> list[dict]:
    from shared.metrics import read_metrics

    return [r for r in read_metrics(out / "metrics.jsonl") if "teacher_kl" in r]


@pytest.mark.engine
def test_vllm_serve_scores_exactly_like_the_teacher_in_transformers(vllm_serve, tiny_pair, tok):
    import torch
    from transformers import AutoModelForCausalLM

    cfg = _cfg(vllm_serve, "--teacher.timeout_s", "30", "--model.max_model_len", "32", "--inference.max_tokens", "12")
    assert probe(cfg, tok) == {"endpoint_model": "tiny-teacher", "endpoint_prompts": "ids"}
    teacher = _teacher(cfg, tiny_pair)
    prompts = [tok("abcde=", add_special_tokens=True).input_ids, tok("xyz=", add_special_tokens=True).input_ids]
    comps = [tok("edcba", add_special_tokens=False).input_ids, tok("zyq", add_special_tokens=False).input_ids]
    res = _score(teacher, prompts, comps)
    assert res.failed == []
    model = AutoModelForCausalLM.from_pretrained(str(tiny_pair[0]), dtype=torch.float32)
    for p, c, got in zip(prompts, comps, res.logprobs):
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0].double(), -1)  # (T, V)
        want = [float(logp[len(p) - 1 + k, t]) for k, t in enumerate(c)]
        assert got == pytest.approx(want, abs=2e-3)
    # the top-k estimator's scoring (trainer.loss.teacher_topk = 5): the same log-probs and the 5 most likely
    top = decode(teacher.score(encode(ScoreRequest(prompt_ids=prompts, completion_ids=comps, topk=5))), ScoreResult)
    assert top.failed == [] and all(a == pytest.approx(b, abs=1e-6) for a, b in zip(top.logprobs, res.logprobs))
    for p, c, ids, lps in zip(prompts, comps, top.topk_ids, top.topk_logprobs):
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0].double(), -1)
        want = torch.topk(logp[len(p) - 1: len(p) - 1 + len(c)], 5, -1)
        assert len(ids) == len(c) and [row[0] for row in ids] == want.indices[:, 0].tolist()  # the arg-max
        assert torch.allclose(torch.tensor(lps, dtype=torch.float64), want.values, atol=2e-3)
    answer = decode(teacher.generate([prompts[0]], [0], 1, 0.0, 1.0, 8, 0), RolloutBatch).rollouts[0]
    assert answer.text.startswith("edcba") and answer.completion_ids[:len(comps[0])] == comps[0]  # greedy reversal


@pytest.mark.engine
def test_vllm_serve_scores_another_vocabulary_through_character_spans(vllm_serve, tiny_pair, tok):
    """teacher.vocabulary = "align" against the real server: a "student" reading letter pairs (the pair teacher's
    tokenizer; no model needed) hands its completions to the character-level tiny teacher; each group's mapped
    log-probs sum to the teacher's own (transformers) over the group's characters, and a student with the
    teacher's vocabulary gets exactly what the same-vocabulary path gets."""
    import torch
    from transformers import AutoModelForCausalLM

    from orchestrator.prompts import ChatIds
    from orchestrator.vocabulary import Aligned
    from shared.builders.tiny_cross_vocab import build_tokenizer

    cfg = _cfg(vllm_serve, "--teacher.timeout_s", "30", "--model.max_model_len", "32", "--inference.max_tokens", "12",
               "--teacher.vocabulary", "align")
    teacher, pairs = _teacher(cfg, tiny_pair), build_tokenizer()
    texts = [("abcde=", "edcba"), ("hgf=", "fgh")]
    prompts = [ChatIds(pairs(p).input_ids, [{"role": "user", "content": p}]) for p, _ in texts]
    comps = [pairs(c, add_special_tokens=False).input_ids + [pairs.eos_token_id] for _, c in texts]  # ed|cb|a|</s>
    student_lp = [[-0.5] * len(c) for c in comps]
    a = Aligned(cfg, "", "", pairs, tok)
    t_prompts, t_comps = a.to_teacher(prompts, comps)
    assert t_prompts[0] == tok("abcde=").input_ids and t_comps[0] == tok("edcba</s>", add_special_tokens=False).input_ids
    res = _score(teacher, t_prompts, t_comps)
    mapped = a.to_student(comps, res.logprobs, student_lp)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_pair[0]), dtype=torch.float32)
    for p, c, got in zip(t_prompts, t_comps, mapped):
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0].double(), -1)  # (T, V)
        want = [float(logp[len(p) - 1 + k, t]) for k, t in enumerate(c)]  # per character
        groups = a.teacher_completion(comps[t_prompts.index(p)])[1]
        for g in groups:  # e.g. ed: the pair token's two mapped values sum to log p(e) + log p(d)
            assert sum(got[g.s0:g.s1]) == pytest.approx(sum(want[g.t0:g.t1]), abs=4e-3)
    assert a.metrics()["align/multi_token_frac"] == pytest.approx(3 / 7)  # ed, cb | fg: 3 of 4 + 3 student tokens
    same = Aligned(cfg, "", "", tok, tok)  # one vocabulary through the align path: one-to-one, bit for bit
    c_ids = [tok("edcba", add_special_tokens=False).input_ids + [tok.eos_token_id]]
    p_ids = [ChatIds(tok("abcde=").input_ids, [{"role": "user", "content": "abcde="}])]
    direct = _score(teacher, [list(p_ids[0])], c_ids).logprobs
    assert same.to_student(c_ids, _score(teacher, *same.to_teacher(p_ids, c_ids)).logprobs, [[-1.0] * 6]) == direct


@pytest.mark.engine
def test_distill_two_steps_through_vllm_serve(vllm_serve, tmp_path):
    """Through the align path (teacher.vocabulary = "align", here with one vocabulary: the whole of rl's
    re-rendering, re-tokenizing and mapping back runs; the same-vocabulary path through the server runs in
    test_failures_mid_run_are_dropped_and_counted_then_stop_the_run)."""
    out = tmp_path / "d"
    p = _rl("experiments/reverse_text/rl.toml", out, vllm_serve, "--teacher.vocabulary", "align")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    train = _train_rows(out)
    assert [r["step"] for r in train] == [1, 2]
    scored = 0
    for r in train:
        scored += 8 * 4 - r["rollouts/empty"]  # one scoring request per non-empty rollout
        assert r["teacher/endpoint_requests"] == scored
        assert r["teacher/score_failed"] == 0 and r["teacher/endpoint_failed"] == 0
        assert 0.5 < r["teacher_kl"] < 10  # README: 4.08 over steps 1-3
        # a mapped log-prob can reach the floor: in a stretch the teacher's tokenizer spells otherwise (the
        # untrained student's <extra_i> padding tokens) or in a group holding a very unlikely student token (the
        # group's log-ratio is spread over its tokens from the student's own log-probs); a few tokens, not many
        assert r["teacher/logprob_clipped"] <= 0.1 * r["tokens/step"], r
        # one vocabulary: every group one-to-one, but where a token does not survive re-tokenization (the
        # untrained student's <extra_i> padding is spelled <unk>extra_i<unk> by the same tokenizer)
        assert r["align/respelled"] > 0 or (r["align/multi_token_frac"] == 0 and r["align/teacher_per_student"] == 1)
        assert r["align/respelled"] > 0 or r["align/kl"] == pytest.approx(r["teacher_kl"])
    assert (out / "broadcast" / "step_2" / "COMPLETE").exists()
    assert "endpoint = " in (out / "config.toml").read_text()


@pytest.mark.engine
def test_judge_two_steps_through_vllm_serve_chat_api(vllm_serve, tmp_path):
    """A judge behind a chat API (teacher.endpoint_api = chat, no KL term): every judge prompt goes to
    /v1/chat/completions as messages; nothing asks for log-probs. (Generation on /v1/completions is
    checked against the same server in test_vllm_serve_scores_exactly_like_the_teacher_in_transformers.)"""
    with running_proxy(vllm_serve, every=10**9) as proxy:  # no faults: it records the routes
        out = tmp_path / "j"
        # the tiny teacher (not the toml's verifier) asked to write a verdict, as the toml once had it
        p = _rl("experiments/judge/tiny.toml", out, proxy.url, "--teacher.endpoint_api", "chat",
                "--model.max_model_len", "32",  # the server's 33-token context (the toml's 40 is for its verifier)
                "--trainer.loss.kl_coef", "0", "--teacher.name", "tiny-reverse-teacher",
                "--orchestrator.judge.verdict", "reply", "--orchestrator.judge.mode", "binary",
                "--orchestrator.judge.on_unparseable", "zero", "--orchestrator.judge.max_tokens", "8")
        assert p.returncode == 0, p.stderr[-3000:]
        train = _train_rows(out)
        assert [r["step"] for r in train] == [1, 2]
        requests = 0
        for r in train:
            n = 8 * 4 - r["rollouts/empty"]
            requests += n - r["judge/too_long"]  # a judge reply per judge prompt that fits, no scoring
            assert r["teacher/endpoint_requests"] == requests
            assert r["judge/teacher_failed"] == 0 and r["judge/unparseable"] >= 1  # the tiny teacher cannot judge
            assert "reward/mean" in r and r["teacher_kl"] is None  # not scored: NaN, written as null
        assert proxy.posts == ["/v1/chat/completions"] * (1 + int(requests))  # the probe, then the judge prompts


@pytest.mark.engine
def test_failures_mid_run_are_dropped_and_counted_then_stop_the_run(vllm_serve, tmp_path):
    with running_proxy(vllm_serve, every=5) as proxy:  # 20% of completions requests fail, after the probe's
        out = tmp_path / "drop"
        p = _rl("experiments/reverse_text/rl.toml", out, proxy.url, "--teacher.retries", "0",
                "--teacher.max_failure_rate", "0.5")
        assert p.returncode == 0, p.stderr[-3000:]
        train = _train_rows(out)
        failed = sum(r["teacher/score_failed"] for r in train)
        assert failed >= 8 and train[-1]["teacher/endpoint_failed"] == failed  # every failure dropped a rollout
        assert train[-1]["teacher/endpoint_retries"] == 0
        p = _rl("experiments/reverse_text/rl.toml", tmp_path / "stop", proxy.url, "--teacher.retries", "0",
                "--teacher.max_failure_rate", "0.1")
        assert p.returncode == 1
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith("error: teacher failed: teacher-0: EndpointError: teacher.endpoint http://127.0.0.1:"), \
            p.stderr[-2000:]
        assert last.endswith("(see logs/teacher-0.log)")
        assert "> teacher.max_failure_rate = 0.1); last error: POST /v1/completions: HTTP 503 injected 503" in last
        assert "Traceback" not in p.stderr
