"""The teacher engine's prompt log-probs in one batched pass, over the completion positions only.

Scoring asks vLLM for ``prompt_logprobs`` of ``prompt + completion`` and keeps the completion's entries. vLLM 0.32
(``GPUModelRunner._get_prompt_logprobs_dict``, which the CPU runner inherits) computes them one request at a
time, as its comment says ("prompt logprobs are a rare feature"): per request an lm-head, a full log-softmax, a
top-k and a rank count, over every prompt position. For a tiny-pair batch of 128 sequences that loop took 40 of
the teacher's 146 ms (profiled once, 2026-12-03, 2 cores, load about 0.8; the speed-up is in
``benchmarks/results/teacher_scoring_2026-12-03.md``), and
on SmolLM2 the lm-head and 49k-way log-softmax over the teacher's prompt positions are work nobody reads.

:func:`install` replaces that method on the engine's model runner(s) by :func:`batched_prompt_logprobs`: the same
bookkeeping (chunked prefill, requests finishing their prompt, the CPU tensors vLLM hands on), but one lm-head,
log-softmax and gather for all the step's positions, and none for the rows before ``extra_args[LOGPROBS_FROM]``
(the completion's first token): those rows hold the prompt token, a NaN log-prob and rank 0, and are never read
(``shared/engines.py`` keeps ``prompt_logprobs[len(prompt):]``). A request without the key gets every row, as
vLLM's own method gives it.

It is installed only on the vLLM versions it was checked against (:data:`CHECKED`: ``tests/test_teacher_scoring.py``
compares it with vLLM's own method and with transformers); on any other version, or a runner without the
attributes it uses, vLLM's own method stays and :func:`install` says why.
"""

from __future__ import annotations

import math
import sys
import types
from typing import Any

from shared.engines import LOGPROBS_FROM

CHECKED = ("0.32.",)  # vLLM versions whose _get_prompt_logprobs_dict this replaces (same semantics, checked)
_RUNNER_ATTRS = ("_get_prompt_logprobs_dict", "num_prompt_logprobs", "requests", "input_batch", "query_start_loc",
                 "model", "sampler", "model_config")


def install(llm: Any) -> str:
    """Install :func:`batched_prompt_logprobs` on every worker of ``llm`` (a ``vllm.LLM``); ``"batched"``, or
    why vLLM's own method was kept (one line). All workers or none: with tensor parallelism every rank computes
    the logits together, so ranks running different methods would disagree on the number of collectives."""
    try:
        import cloudpickle  # vLLM's own dependency: what it pickles a callable with for worker processes

        cloudpickle.register_pickle_by_value(sys.modules[__name__])  # so they need not import this module
    except (ImportError, ValueError):
        pass
    try:
        replies = llm.collective_rpc(_install_on_worker)
    except Exception as e:  # a worker that could not run it: none keeps ours
        replies = [f"vLLM's own prompt log-probs: installing failed ({type(e).__name__}: {e})"]
    refused = [r for r in replies if r != "batched"]
    if refused:
        try:
            llm.collective_rpc(uninstall)
        except Exception as e:
            raise RuntimeError(f"{refused[0]}, and the workers could not be set back: {e}") from e
        return refused[0]
    return "batched"


def _install_on_worker(worker: Any) -> str:
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    if not version.startswith(CHECKED):
        return f"vLLM's own prompt log-probs: vLLM {version} is not one this was checked against ({', '.join(CHECKED)}x)"
    runner = getattr(worker, "model_runner", None)
    missing = [a for a in _RUNNER_ATTRS if not hasattr(runner, a)]
    if missing:
        return f"vLLM's own prompt log-probs: the model runner has no {missing[0]}"
    runner._get_prompt_logprobs_dict = types.MethodType(batched_prompt_logprobs, runner)
    runner.opd_prompt_logprob_rows = 0  # rows computed (tests/test_teacher_scoring.py reads it)
    return "batched"


def uninstall(worker: Any) -> bool:
    """Back to vLLM's own method on this worker (for comparisons); True if ours was installed."""
    runner = worker.model_runner
    if "_get_prompt_logprobs_dict" not in vars(runner):
        return False
    del runner._get_prompt_logprobs_dict
    return True


def rows_computed(worker: Any) -> int:
    """How many prompt positions :func:`batched_prompt_logprobs` computed on this worker since its install."""
    return int(getattr(worker.model_runner, "opd_prompt_logprob_rows", -1))


def unread_rows(request: Any, num_prompt_tokens: int) -> int:
    """How many leading rows of a request's prompt log-probs nobody reads: row ``i`` is token ``i + 1``'s
    log-prob, so with ``extra_args[LOGPROBS_FROM] = p`` rows ``0 .. p - 2`` (0 without the key)."""
    params = getattr(request, "sampling_params", None)
    start = ((params.extra_args or {}) if params is not None else {}).get(LOGPROBS_FROM)
    if start is None:
        return 0
    return max(0, min(int(start) - 1, num_prompt_tokens - 1))


def batched_prompt_logprobs(self: Any, hidden_states: Any, num_scheduled_tokens: dict[str, int]) -> dict:
    """vLLM 0.32's ``GPUModelRunner._get_prompt_logprobs_dict`` (``self`` is the runner) with one lm-head pass for
    the step and no rows before :func:`unread_rows`; returns ``{request id: LogprobsTensors}`` for the requests
    whose prompt is done, as vLLM's does."""
    import torch
    from vllm.v1.outputs import LogprobsTensors

    pending = self.num_prompt_logprobs
    if not pending:
        return {}
    done: dict[str, Any] = {}
    finished: list[str] = []
    jobs: dict[int, list[tuple[Any, int, int, int, list[int]]]] = {}  # k -> (tensors, first row, rows, hidden at, prompt)
    for req_id, k in pending.items():
        scheduled = num_scheduled_tokens.get(req_id)
        if scheduled is None:  # preempted during its prefill
            continue
        request = self.requests[req_id]
        prompt = request.prompt_token_ids
        if prompt is None:  # prompt embeddings: no prompt log-probs
            continue
        n_prompt = len(prompt)
        skip = unread_rows(request, n_prompt)
        tensors = request.in_progress_prompt_logprobs_cpu
        if tensors is None:
            tensors = LogprobsTensors.empty_cpu(n_prompt - 1, k + 1)
            if skip:  # defined values where nothing is computed
                tensors.logprob_token_ids[:skip].zero_()
                tensors.logprob_token_ids[:skip, 0] = torch.tensor(prompt[1:skip + 1], dtype=torch.int32)
                tensors.logprobs[:skip] = math.nan
                tensors.selected_token_ranks[:skip] = 0
            request.in_progress_prompt_logprobs_cpu = tensors
        start = request.num_computed_tokens  # this step's first scheduled position
        remaining = n_prompt - start - 1
        if scheduled <= remaining:  # a chunk; more of the prompt follows (== : returned with the next step)
            rows = scheduled
        else:  # the prompt's last chunk
            rows = remaining
            finished.append(req_id)
            done[req_id] = tensors
        first = max(start, skip)
        if start + rows <= first:
            continue
        at = self.query_start_loc.np[self.input_batch.req_id_to_index[req_id]].item() + first - start
        jobs.setdefault(k, []).append((tensors, first, start + rows - first, at, prompt))

    for k, group in jobs.items():
        index = torch.cat([torch.arange(at, at + n) for _, _, n, at, _ in group])
        targets = torch.tensor([t for _, first, n, _, prompt in group for t in prompt[first + 1:first + 1 + n]],
                               dtype=torch.int64)
        logits = self.model.compute_logits(hidden_states[index.to(hidden_states.device)])
        if self.model_config.logprobs_mode in ("raw_logits", "processed_logits"):
            scores = logits.to(torch.float32)
        else:
            scores = self.sampler.compute_logprobs(logits)
        ids, lps, ranks, *_ = self.sampler.gather_logprobs(scores, k, targets.to(scores.device))
        ids, lps, ranks = ids.cpu(), lps.cpu(), ranks.cpu()
        self.opd_prompt_logprob_rows += int(index.numel())
        row = 0
        for tensors, first, n, _, _ in group:
            tensors.logprob_token_ids[first:first + n].copy_(ids[row:row + n])
            tensors.logprobs[first:first + n].copy_(lps[row:row + n])
            tensors.selected_token_ranks[first:first + n].copy_(ranks[row:row + n])
            row += n

    for req_id in finished:
        del pending[req_id]
        self.requests[req_id].in_progress_prompt_logprobs_cpu = None
    return done
