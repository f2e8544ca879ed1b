"""An external OpenAI-compatible teacher or judge (``vllm serve``, Ollama, a hosted API) in place of the
in-cluster teacher engine (``[teacher] endpoint``).

:class:`EndpointTeacher` has the methods of :class:`teacher.engine.TeacherEngine` (``ready``, ``score``,
``generate``), so the orchestrator starts it as the teacher actor and calls it the same way.  It talks
to the endpoint's ``/v1/completions`` over plain HTTP (``http.client``), ``max_concurrency`` requests at
a time, one request per completion to score or prompt to answer:

- scoring (per-token log-probs of given token ids): vLLM only, ``prompt`` as token ids with
  ``prompt_logprobs = 0`` and ``echo = true, max_tokens = 0`` (nothing is generated, so a prompt of
  exactly ``max_model_len`` tokens fits);
- generation: token-id prompts when the server tokenizes exactly as our tokenizer (vLLM), otherwise
  the prompt decoded to text (any OpenAI-compatible server) and the answer re-tokenized locally; with
  ``teacher.endpoint_api = "chat"``, ``/v1/chat/completions`` with the chat messages each prompt was
  rendered from (hosted chat APIs, which apply their own template), the answer re-tokenized locally.

A request that times out, loses its connection or gets HTTP 429/5xx is retried ``retries`` times with
exponential backoff; one that still fails is reported back (``ScoreResult.failed``; a generated
rollout with ``finish_reason = TEACHER_FAILED``) so the orchestrator drops what it belongs to and
counts it, and once more than ``max_failure_rate`` of all requests have failed the next call raises
:class:`EndpointError`, which stops the run with one line.

:func:`probe` runs in the launcher's preflight, before Ray or any engine starts: endpoint reachable,
model served, tokenizer identical on a fixed text (for token-id prompts), per-token log-probs
returned (for scoring); every failure is a one-line ``ConfigError``.

The API key is read from the environment variable ``teacher.api_key_env`` inside the process that
makes the requests, sent only as this endpoint's ``Authorization`` header (``http.client`` follows no
redirect and uses no proxy), and never put in a message, a log or the config.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, NoReturn
from urllib.parse import urlsplit

from shared.config import Config, ConfigError, needs_teacher_logprobs, topk_in_loss
from shared.wire import TEACHER_FAILED, Rollout, RolloutBatch, ScoreRequest, ScoreResult, decode, encode

# The fixed text whose tokenization must match ours before token ids are sent (letters, digits,
# punctuation, spaces and a newline; for the tiny pair, its reverse-text alphabet).
PROBE_TEXT = "abcd=dcba The quick brown fox, 12 + 30 = 42.\nzyx"
RATE_MIN_REQUESTS = 16  # the failure-rate bound is checked once this many requests were made
MAX_BACKOFF_S = 30.0


class EndpointError(RuntimeError):
    """The endpoint failed beyond the configured bound; stops the run (``teacher failed: ...``)."""


class HttpError(Exception):
    """One failed HTTP attempt; ``transient`` ones (timeouts, connection errors, 429, 5xx) are retried."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status

    @property
    def transient(self) -> bool:
        return self.status == 0 or self.status in (408, 429) or self.status >= 500


class Client:
    """JSON over HTTP to one endpoint.  ``base`` is the OpenAI base URL (``http://host:port/v1``);
    ``root`` (the same without ``/v1``) serves vLLM's ``/tokenize``."""

    def __init__(self, base: str, api_key: str = "", timeout_s: float = 60.0):
        url = urlsplit(base.rstrip("/"))
        self.https = url.scheme == "https"
        self.host = url.hostname or ""
        self.port = url.port or (443 if self.https else 80)
        self.prefix = url.path  # "/v1"
        self.root = self.prefix[: -len("/v1")] if self.prefix.endswith("/v1") else self.prefix
        self.timeout_s = timeout_s
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"

    def __repr__(self) -> str:  # never shows the headers (the key)
        return f"Client({'https' if self.https else 'http'}://{self.host}:{self.port}{self.prefix})"

    def request(self, method: str, path: str, body: dict | None = None, timeout_s: float | None = None) -> Any:
        """The decoded JSON reply; :class:`HttpError` on a transport error, a non-2xx status or bad JSON."""
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=timeout_s or self.timeout_s)
        data = json.dumps(body).encode() if body is not None else None
        try:
            conn.request(method, path, body=data, headers=self._headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as e:  # refused, reset, timeout, DNS, TLS
            kind = "timed out" if isinstance(e, (socket.timeout, TimeoutError)) else f"{type(e).__name__}: {e}"
            raise HttpError(f"{method} {path}: {kind}") from None
        finally:
            conn.close()
        if not 200 <= resp.status < 300:
            raise HttpError(f"{method} {path}: HTTP {resp.status} {_error_text(raw)}".rstrip(), resp.status)
        try:
            return json.loads(raw)
        except ValueError:
            raise HttpError(f"{method} {path}: reply is not JSON ({raw[:80]!r})", resp.status) from None

    def post(self, route: str, body: dict, timeout_s: float | None = None) -> Any:
        return self.request("POST", self.prefix + route, body, timeout_s)


def _error_text(raw: bytes) -> str:
    """The server's error message, one line and short."""
    try:
        data = json.loads(raw)
        err = data.get("error", data) if isinstance(data, dict) else data
        msg = err.get("message", err) if isinstance(err, dict) else err
        text = str(msg)
    except ValueError:
        text = raw.decode("utf-8", "replace")
    return " ".join(text.split())[:200]


def api_key(cfg: Config) -> str:
    """The key from ``teacher.api_key_env`` ("" when none is configured)."""
    name = cfg.teacher.api_key_env
    if not name:
        return ""
    value = os.environ.get(name, "")
    if not value.strip():
        raise ConfigError(f"teacher.api_key_env: environment variable {name} is not set (it must hold the API key "
                          f"of {cfg.teacher.endpoint})")
    return value.strip()


# --------------------------------------------------------------------------------------------------
# Preflight


def probe(cfg: Config, tokenizer: Any) -> dict[str, str]:
    """Check the endpoint before anything starts; returns what the teacher actor needs
    (``endpoint_model``, ``endpoint_prompts`` = ``ids`` | ``text``).  ``tokenizer`` is the local one
    whose token ids the run sends (the teacher's, which preflight has checked equals the student's)."""
    tc = cfg.teacher
    client = Client(tc.endpoint, api_key(cfg), timeout_s=min(tc.timeout_s, 10.0))
    try:
        listing = client.request("GET", client.prefix + "/models")
    except HttpError as e:
        if e.status in (401, 403):
            raise ConfigError(f"teacher.api_key_env: {tc.endpoint} refused the request (HTTP {e.status}); check the key"
                              + (f" in {tc.api_key_env}" if tc.api_key_env else " (none is set)")) from None
        hint = "; an OpenAI base URL usually ends in /v1" if e.status == 404 and not client.prefix.endswith("/v1") else ""
        raise ConfigError(f"teacher.endpoint: cannot use {tc.endpoint} ({e}){hint}") from None
    cards = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(cards, list):
        raise ConfigError(f"teacher.endpoint: {tc.endpoint}/models did not list models (not an OpenAI-compatible API?)")
    served = {str(c.get("id")): c for c in cards if isinstance(c, dict)}
    model = tc.model
    if not model:
        if len(served) != 1:
            raise ConfigError(f"teacher.model: {tc.endpoint} serves {len(served)} models "
                              f"({', '.join(sorted(served)) or 'none'}); name one")
        model = next(iter(served))
    elif model not in served:
        raise ConfigError(f"teacher.model: {json.dumps(model)} is not served by {tc.endpoint} "
                          f"(it serves: {', '.join(sorted(served)) or 'nothing'})")
    # vLLM's API counts one output position even when nothing is generated: a full-length sequence needs one more.
    card_len, need = served[model].get("max_model_len"), cfg.model.max_model_len + 1
    if isinstance(card_len, int) and card_len < need:
        raise ConfigError(f"teacher.endpoint: {model} at {tc.endpoint} has max_model_len {card_len}; scoring sequences "
                          f"of model.max_model_len = {cfg.model.max_model_len} tokens needs at least {need} "
                          f"(vllm serve --max-model-len {need})")
    if tc.endpoint_api == "chat":  # generation only (the config refuses chat for scoring modes)
        try:
            client.post("/chat/completions", {"model": model, "messages": [{"role": "user", "content": "Hi"}],
                                              "max_tokens": 1, "temperature": 0.0})
        except HttpError as e:
            raise ConfigError(f"teacher.endpoint: {tc.endpoint}/chat/completions fails for {model} ({e})") from None
        return {"endpoint_model": model, "endpoint_prompts": "chat"}
    same, why = _same_tokenizer(client, model, tokenizer)
    if needs_teacher_logprobs(cfg):
        if not same:
            _refuse_scoring(cfg, f"its tokenizer cannot be checked against ours: {why}")
        _check_prompt_logprobs(cfg, client, model, tokenizer)
        if topk_in_loss(cfg):
            _check_topk(cfg, client, model, tokenizer)
    else:  # completions only: one short generation shows the route works
        try:
            client.post("/completions", {"model": model, "prompt": "Hi", "max_tokens": 1, "temperature": 0.0})
        except HttpError as e:
            raise ConfigError(f"teacher.endpoint: {tc.endpoint}/completions fails for {model} ({e})") from None
    return {"endpoint_model": model, "endpoint_prompts": "ids" if same else "text"}


def _same_tokenizer(client: Client, model: str, tokenizer: Any) -> tuple[bool, str]:
    """Whether the server tokenizes PROBE_TEXT to our ids (vLLM's ``/tokenize``), and if not, why."""
    ours = tokenizer(PROBE_TEXT, add_special_tokens=False).input_ids
    try:
        reply = client.request("POST", client.root + "/tokenize",
                               {"model": model, "prompt": PROBE_TEXT, "add_special_tokens": False})
    except HttpError as e:
        return False, f"no /tokenize route ({e}; vLLM has one)"
    theirs = reply.get("tokens") if isinstance(reply, dict) else None
    if theirs != ours:
        return False, f"the server tokenizes {json.dumps(PROBE_TEXT)} to {str(theirs)[:60]}, ours to {str(ours)[:60]}"
    return True, ""


def _check_prompt_logprobs(cfg: Config, client: Client, model: str, tokenizer: Any) -> None:
    ids = tokenizer(PROBE_TEXT, add_special_tokens=False).input_ids[: cfg.model.max_model_len]  # fits
    try:
        reply = client.post("/completions", _score_body(model, ids))
        completion_logprobs(reply, 1, ids[1:])  # the first position has no log-prob
        ok = True
    except HttpError as e:
        _refuse_scoring(cfg, f"/completions with prompt_logprobs on token ids fails ({e})")
    except (KeyError, IndexError, TypeError, AttributeError, ValueError):
        ok = False
    if not ok:
        _refuse_scoring(cfg, "/completions returned no per-token prompt_logprobs for token ids")


def _check_topk(cfg: Config, client: Client, model: str, tokenizer: Any) -> None:
    """The top-k estimator (``trainer.loss.teacher_topk = k``) needs the server's k most likely tokens at each
    position: vLLM returns them for ``prompt_logprobs = k`` up to its ``--max-logprobs`` (20 by default)."""
    k = cfg.trainer.loss.teacher_topk
    ids = tokenizer(PROBE_TEXT, add_special_tokens=False).input_ids[: cfg.model.max_model_len]
    try:
        completion_topk(client.post("/completions", _score_body(model, ids, k)), 1, ids[1:], k)
        return
    except HttpError as e:
        lacks = f"/completions with prompt_logprobs = {k} fails ({e})"
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
        lacks = f"/completions did not return the top {k} prompt log-probs at each position ({e})"
    raise ConfigError(f"trainer.loss.teacher_topk: {k} needs the teacher's top-{k} log-probs at each position, and "
                      f"{cfg.teacher.endpoint} lacks them: {lacks}. Serve the teacher with vLLM (vllm serve "
                      f"--max-logprobs {max(k, 20)}), or set trainer.loss.teacher_topk = 0")


def _refuse_scoring(cfg: Config, lacks: str) -> NoReturn:
    oc = cfg.orchestrator
    if cfg.trainer.loss.teacher_tau > 0:
        mode, fix = (f"orchestrator.workflow = {json.dumps(oc.workflow)} with trainer.loss.teacher_tau = "
                     f"{cfg.trainer.loss.teacher_tau:g}", "use workflow judge/comparator with trainer.loss.kl_coef = 0")
    else:
        mode, fix = 'orchestrator.judge.verdict = "loglik"', 'use orchestrator.judge.verdict = "reply"'
    raise ConfigError(
        f"teacher.endpoint: {mode} needs per-token teacher log-probs of the student's token ids, and "
        f"{cfg.teacher.endpoint} lacks them: {lacks}. Serve the teacher with vLLM, or {fix}"
    )


def _score_body(model: str, ids: list[int], topk: int = 0) -> dict:
    # echo + max_tokens 0: nothing is generated, so prompt + completion may fill max_model_len exactly.
    # return_token_ids: the echoed prompt is not detokenized. prompt_logprobs = k: also the k most likely tokens.
    return {"model": model, "prompt": ids, "max_tokens": 0, "echo": True, "prompt_logprobs": topk, "temperature": 0.0,
            "return_token_ids": True}


LOGPROB_SLACK = 1e-4  # a log-prob above 0 by more than rounding is no log-prob


def _token_logprob(entry: Any, token: int) -> float:
    """vLLM's prompt_logprobs entry (``{"<id>": {"logprob": x, ...}}``) -> the log-prob of ``token``.

    Raises ValueError when the entry lacks ``token`` or its value cannot be a log-probability: not finite
    (``NaN``, ``Infinity``, ``-Infinity``, which Python's JSON reader accepts; vLLM itself writes -9999 for a
    probability of 0) or above 0 (a probability above 1). The item it belongs to is then refused and counted
    (``ScoreResult.failed``), never trained on: one wrong number in a teacher's log-probs is an advantage of
    any size."""
    if not isinstance(entry, dict) or str(token) not in entry:
        raise ValueError(f"no log-prob for token {token}")
    value = entry[str(token)]
    x = float(value["logprob"] if isinstance(value, dict) else value)
    if not math.isfinite(x) or x > LOGPROB_SLACK:
        raise ValueError(f"log-prob {x!r} of token {token} is not a log-probability (finite, at most 0)")
    return x


def completion_logprobs(reply: dict, n_prompt: int, completion: list[int]) -> list[float]:
    """The teacher's log-prob of each ``completion`` token from a ``/completions`` reply that echoed
    ``prompt + completion`` with ``prompt_logprobs``; ValueError (the item is refused) when the reply has another
    number of positions than ``n_prompt + len(completion)`` or a value is not a log-probability."""
    entries = reply["choices"][0]["prompt_logprobs"]
    if len(entries) != n_prompt + len(completion):
        raise ValueError(f"prompt_logprobs for {len(entries)} positions, expected {n_prompt + len(completion)} "
                         f"({n_prompt} prompt + {len(completion)} completion tokens)")
    return [_token_logprob(e, t) for e, t in zip(entries[n_prompt:], completion)]


def completion_topk(reply: dict, n_prompt: int, completion: list[int], k: int
                    ) -> tuple[list[float], list[list[int]], list[list[float]]]:
    """:func:`completion_logprobs` plus, at each completion position, the ``k`` most likely tokens and their
    log-probs (most likely first) from a reply with ``prompt_logprobs = k`` (each entry holds the top k and the
    scored token); ValueError (the item is refused) when an entry has fewer than ``k`` tokens or a value is not
    a log-probability."""
    lps = completion_logprobs(reply, n_prompt, completion)
    ids, tops = [], []
    for entry in reply["choices"][0]["prompt_logprobs"][n_prompt:]:
        if len(entry) < k:
            raise ValueError(f"{len(entry)} tokens in a prompt_logprobs entry, expected the top {k}")
        best = sorted(((_token_logprob(entry, int(t)), int(t)) for t in entry), reverse=True)[:k]
        ids.append([t for _, t in best])
        tops.append([x for x, _ in best])
    return lps, ids, tops


# --------------------------------------------------------------------------------------------------
# The actor


class EndpointTeacher:
    """Ray actor body standing in for ``TeacherEngine`` (see the module docstring)."""

    def __init__(self, cfg_json: bytes, model: str, prompts: str, tokenizer_path: str, log_path: str | None = None):
        import msgspec

        from shared.runtime import redirect_output

        redirect_output(log_path)
        cfg = msgspec.json.decode(cfg_json, type=Config)
        self.tc = cfg.teacher
        self.model, self.prompts = model, prompts
        self.client = Client(self.tc.endpoint, api_key(cfg), self.tc.timeout_s)
        self.pool = ThreadPoolExecutor(max_workers=self.tc.max_concurrency, thread_name_prefix="teacher-endpoint")
        self.tokenizer_path = tokenizer_path
        self._tok = None
        self.requests = self.failed = self.retries = 0  # requests and failures are counted on the calling thread
        self.lock = threading.Lock()  # retries are counted on the pool's threads
        self.last_error = ""

    @property
    def tok(self) -> Any:
        if self._tok is None:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.tokenizer_path)
        return self._tok

    def ready(self) -> float:
        return 0.0

    def stats(self) -> dict[str, float]:
        """Cumulative request counts, for the step's metrics row."""
        return {"teacher/endpoint_requests": float(self.requests), "teacher/endpoint_failed": float(self.failed),
                "teacher/endpoint_retries": float(self.retries),
                "teacher/endpoint_failure_rate": self.failed / max(self.requests, 1)}

    def _call(self, body: dict, parse: Any, route: str = "/completions") -> Any:
        """POST ``route`` with retries and ``parse`` the reply; None when every attempt failed or the reply
        did not have the expected shape (a malformed reply is not retried)."""
        tc = self.tc
        for attempt in range(tc.retries + 1):
            try:
                reply = self.client.post(route, body)
            except HttpError as e:
                self.last_error = str(e)
                if not e.transient or attempt == tc.retries:
                    return None
                with self.lock:
                    self.retries += 1
                time.sleep(min(tc.retry_backoff_s * 2**attempt, MAX_BACKOFF_S))
                continue
            try:
                return parse(reply)
            except (TypeError, KeyError, IndexError, ValueError, AttributeError) as e:
                self.last_error = f"POST {self.client.prefix}{route}: unexpected reply ({type(e).__name__}: {e})"
                return None
        return None

    def _map(self, jobs: list[tuple]) -> list:
        """Every ``(body, parse[, route])`` job's parsed reply (None: failed), up to max_concurrency requests in flight;
        failures are counted, and past the failure-rate bound the call raises :class:`EndpointError`."""
        results = list(self.pool.map(lambda job: self._call(*job), jobs))
        self.requests += len(jobs)
        self.failed += sum(1 for r in results if r is None)
        rate = self.failed / max(self.requests, 1)
        if self.requests >= RATE_MIN_REQUESTS and rate > self.tc.max_failure_rate:
            raise EndpointError(
                f"teacher.endpoint {self.tc.endpoint}: {self.failed} of {self.requests} requests failed after "
                f"{self.tc.retries} retries ({rate:.0%} > teacher.max_failure_rate = {self.tc.max_failure_rate:g}); "
                f"last error: {self.last_error}"
            )
        return results

    def score(self, request: bytes) -> bytes:
        req = decode(request, ScoreRequest)
        if req.topk:  # the top-k estimator (trainer/topk.py)
            got = self._map([(_score_body(self.model, p + c, req.topk),
                              partial(completion_topk, n_prompt=len(p), completion=c, k=req.topk))
                             for p, c in zip(req.prompt_ids, req.completion_ids)])
            return encode(ScoreResult(logprobs=[r[0] if r else [] for r in got],
                                      failed=[i for i, r in enumerate(got) if r is None],
                                      topk_ids=[r[1] if r else [] for r in got],
                                      topk_logprobs=[r[2] if r else [] for r in got]))

        results = self._map([(_score_body(self.model, p + c), partial(completion_logprobs, n_prompt=len(p), completion=c))
                             for p, c in zip(req.prompt_ids, req.completion_ids)])
        failed = [i for i, r in enumerate(results) if r is None]
        return encode(ScoreResult(logprobs=[r or [] for r in results], failed=failed))

    def generate(self, prompt_ids: list[list[int]], prompt_indices: list[int], n: int, temperature: float,
                 top_p: float, max_tokens: int, seed: int) -> bytes:
        """``n`` answers per prompt (seeded per prompt like the engine's); a prompt whose request failed gets
        ``n`` empty rollouts with ``finish_reason = TEACHER_FAILED``.  The tokenizer is used on this thread only
        (a fast tokenizer shared between threads can fail with "Already borrowed")."""

        chat = self.tc.endpoint_api == "chat"

        def parse(reply: dict) -> list[dict]:
            choices = sorted(reply["choices"], key=lambda c: c.get("index", 0))
            if len(choices) != n:
                raise ValueError(f"{len(choices)} choices, expected {n}")
            if chat:
                return [{"text": str(c["message"].get("content") or ""), "token_ids": None,
                         "finish_reason": str(c.get("finish_reason") or "")} for c in choices]
            return [{"text": str(c.get("text") or ""), "token_ids": c.get("token_ids"),
                     "finish_reason": str(c.get("finish_reason") or "")} for c in choices]

        jobs: list[tuple] = []
        for idx, ids in zip(prompt_indices, prompt_ids):
            if chat:  # the chat messages the ids were rendered from (orchestrator.prompts.ChatIds)
                messages = getattr(ids, "messages", None)
                if not messages:
                    raise EndpointError("teacher.endpoint_api = \"chat\": a prompt reached the teacher without its chat "
                                        "messages (only token ids)")
                jobs.append(({"model": self.model, "messages": messages, "n": n, "temperature": temperature,
                              "top_p": top_p, "max_tokens": max_tokens, "seed": seed + idx}, parse, "/chat/completions"))
                continue
            prompt: Any = ids
            if self.prompts == "text":  # a server that takes no token ids gets the text (without our BOS)
                prompt = self.tok.decode(ids, skip_special_tokens=False)
                if self.tok.bos_token and prompt.startswith(self.tok.bos_token):
                    prompt = prompt[len(self.tok.bos_token):]
            jobs.append(({"model": self.model, "prompt": prompt, "n": n, "temperature": temperature, "top_p": top_p,
                          "max_tokens": max_tokens, "seed": seed + idx, "return_token_ids": True}, parse))
        rollouts = []
        for idx, ids, choices in zip(prompt_indices, prompt_ids, self._map(jobs)):
            for c in choices or [None] * n:
                if c is None:
                    rollouts.append(Rollout(prompt_index=idx, prompt_ids=list(ids), completion_ids=[], logprobs=[],
                                            finish_reason=TEACHER_FAILED))
                    continue
                toks = c["token_ids"]
                if chat or self.prompts == "text" or not isinstance(toks, list):
                    toks = self.tok(c["text"], add_special_tokens=False).input_ids
                rollouts.append(Rollout(prompt_index=idx, prompt_ids=list(ids), completion_ids=[int(t) for t in toks],
                                        logprobs=[], finish_reason=c["finish_reason"], text=c["text"]))
        return encode(RolloutBatch(rollouts=rollouts))
