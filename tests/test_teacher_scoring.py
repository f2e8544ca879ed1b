"""teacher/prompt_logprobs.py: the teacher's batched prompt log-probs against vLLM's own and against
transformers, on a real engine that prefills prompts in chunks; and when it refuses to install."""

import json
import math
import subprocess
import sys
import types

import pytest

from tests.conftest import ROOT


@pytest.mark.engine
def test_batched_prompt_logprobs_equal_vllms_own_and_transformers_and_skip_the_prompt(tiny_pair):
    import torch
    from transformers import AutoModelForCausalLM

    teacher = tiny_pair[0]
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "teacher_scoring_probe.py"), str(teacher)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["install"] == "batched"
    own, ours = r["own"], r["batched"]
    # the same numbers as vLLM's own per-request loop, to the bit (the same kernels on the same rows)
    assert ours["logprobs"] == own["logprobs"] and ours["topk_logprobs"] == own["topk_logprobs"]
    assert ours["topk_ids"] == own["topk_ids"] and ours["topk_top"] == own["topk_top"]
    # only the completions' rows were computed: two scoring calls (k = 0 and k = 3) over 20 completions
    n_completion = sum(len(c) for c in r["completions"])
    assert r["rows_scored"] == 2 * n_completion
    # asked without the key (not through scoring_params): every row, as vLLM's own method gives them
    assert r["batched_whole"] == r["own_whole"]
    n_prompt_rows = sum(len(p) + len(c) - 1 for p, c in zip(r["prompts"], r["completions"]))
    assert r["rows_total"] - r["rows_scored"] == n_prompt_rows
    # and the teacher's own log-probs, as transformers computes them in float32
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    worst = 0.0
    for p, c, got in zip(r["prompts"], r["completions"], ours["logprobs"]):
        with torch.no_grad():
            logits = model(torch.tensor([p + c])).logits[0].log_softmax(-1)
        want = [float(logits[len(p) - 1 + j, t]) for j, t in enumerate(c)]
        worst = max(worst, max(abs(a - b) for a, b in zip(got, want)))
    assert worst < 1e-4
    assert all(math.isfinite(x) for lps in ours["logprobs"] for x in lps)


class _Runner(types.SimpleNamespace):
    _get_prompt_logprobs_dict = "vllm's own"  # a class attribute, as vLLM's method is: uninstall falls back to it


def _worker():
    return types.SimpleNamespace(model_runner=_Runner(**{a: None for a in (
        "num_prompt_logprobs", "requests", "input_batch", "query_start_loc", "model", "sampler", "model_config")}))


def test_install_only_on_the_checked_vllm_and_a_runner_it_knows(monkeypatch):
    import vllm

    from teacher import prompt_logprobs as tp

    monkeypatch.setattr(vllm, "__version__", "0.33.1")
    worker = _worker()
    assert tp._install_on_worker(worker) == ("vLLM's own prompt log-probs: vLLM 0.33.1 is not one this was "
                                             "checked against (0.32.x)")
    assert worker.model_runner._get_prompt_logprobs_dict == "vllm's own"
    monkeypatch.setattr(vllm, "__version__", "0.32.0")
    bare = _worker()
    del bare.model_runner.query_start_loc
    assert tp._install_on_worker(bare) == "vLLM's own prompt log-probs: the model runner has no query_start_loc"
    assert tp._install_on_worker(worker) == "batched"
    assert worker.model_runner._get_prompt_logprobs_dict.__func__ is tp.batched_prompt_logprobs
    assert tp.rows_computed(worker) == 0


class _Workers:
    """What ``install`` needs of a ``vllm.LLM``: ``collective_rpc`` over its workers (tensor-parallel ranks)."""

    def __init__(self, *workers, fail=None):
        self.workers, self.fail = workers, fail

    def collective_rpc(self, fn):
        if self.fail:  # the first call only
            fail, self.fail = self.fail, None
            raise fail
        return [fn(w) for w in self.workers]


def test_install_is_all_workers_or_none(monkeypatch):
    import vllm

    from teacher import prompt_logprobs as tp

    monkeypatch.setattr(vllm, "__version__", "0.32.0")
    good, bare = _worker(), _worker()
    del bare.model_runner.sampler
    llm = _Workers(good, bare)  # rank 1's runner lacks an attribute: rank 0 must not keep ours either
    assert tp.install(llm) == "vLLM's own prompt log-probs: the model runner has no sampler"
    assert good.model_runner._get_prompt_logprobs_dict == "vllm's own"
    both = _Workers(_worker(), _worker())
    assert tp.install(both) == "batched"
    assert all(w.model_runner._get_prompt_logprobs_dict.__func__ is tp.batched_prompt_logprobs for w in both.workers)
    assert tp.install(_Workers(_worker(), fail=ModuleNotFoundError("No module named 'teacher'"))) == (
        "vLLM's own prompt log-probs: installing failed (ModuleNotFoundError: No module named 'teacher')")


@pytest.mark.parametrize("extra, n_prompt, unread", [
    (None, 10, 0),  # no key: every row
    ({"opd_logprobs_from": 4}, 10, 3),  # completion from token 4: rows 0..2 (tokens 1..3) unread
    ({"opd_logprobs_from": 1}, 10, 0),  # the completion starts after the first token: all rows read
    ({"opd_logprobs_from": 50}, 10, 9),  # past the end (no completion): nothing to compute
    ({"other": 1}, 10, 0),
])
def test_unread_rows(extra, n_prompt, unread):
    from shared.engines import LOGPROBS_FROM
    from teacher.prompt_logprobs import unread_rows

    assert LOGPROBS_FROM == "opd_logprobs_from"
    request = types.SimpleNamespace(sampling_params=types.SimpleNamespace(extra_args=extra))
    assert unread_rows(request, n_prompt) == unread
