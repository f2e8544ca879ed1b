"""Typed run configuration: TOML files deep-merged left to right, then CLI overrides.

Every field has a default and a one-line description (``Meta(description=...)``); ``rl --dry_run``
prints the resolved result.  Every user mistake becomes a :class:`ConfigError` whose message is one
line starting with the full key path (``trainer.lr: expected float, got "abc"``) or the file, line
and column of a malformed TOML file.
"""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import tomli
import tomli_w
from msgspec import Meta, Struct, field


class ConfigError(ValueError):
    """A user's configuration mistake; its message is one line that names the key or file."""


def _doc(tp: Any, description: str, **constraints: Any) -> Any:
    return Annotated[tp, Meta(description=description, **constraints)]


class _Section(Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class LoraConfig(_Section):
    rank: _doc(int, "LoRA rank r", ge=1, le=256) = 16
    alpha: _doc(float, "LoRA scaling numerator (scale = alpha / rank)", gt=0) = 32.0
    dropout: _doc(float, "LoRA dropout probability", ge=0, lt=1) = 0.0
    target_modules: _doc(list[str], "module names that get adapters") = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


class ModelConfig(_Section):
    name: _doc(str, "student: a local model directory or a built-in alias (tiny-reverse-student, tiny-long-student)") = (
        "tiny-reverse-student"
    )
    dtype: _doc(Literal["float32", "bfloat16"], "weights and compute dtype") = "float32"
    max_model_len: _doc(int, "longest prompt + completion, in tokens", ge=8) = 64
    chat_template: _doc(Literal["auto", "on", "off"], "wrap prompts in the tokenizer's chat template (auto: if it has one)") = (
        "auto"
    )
    lora: LoraConfig = field(default_factory=LoraConfig)


# A role's GPU ids: G is GPU G of the node rl runs on (node 0), "N:G" is GPU G of node N of a Ray cluster
# (shared/placement.py numbers the nodes). Plain ints keep every single-node card as it was.
GpuIds = list[int | str]


class ParallelConfig(_Section):
    dp: _doc(int, "engines (data parallel); 0 = one per tp-sized group of ids (1 on CPU)", ge=0) = 0
    tp: _doc(int, "tensor-parallel size of each engine", ge=1) = 1


class InferenceConfig(_Section):
    gpu_ids: _doc(GpuIds, "GPU ids of the student engines (G, or N:G on node N); empty = CPU") = field(
        default_factory=list
    )
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    temperature: _doc(float, "sampling temperature T; the student's policy is softmax(z / T): at T != 1 the engines "
                             "return and the trainer computes its log-probs (shared/sampling.py)", ge=0) = 1.0
    top_p: _doc(float, "nucleus sampling mass", gt=0, le=1) = 1.0
    max_tokens: _doc(int, "longest completion, in tokens", ge=1) = 16
    kv_cache_gib: _doc(int, "KV cache per engine on CPU (VLLM_CPU_KVCACHE_SPACE), GiB", ge=1) = 1
    gpu_memory_utilization: _doc(float, "fraction of GPU memory vLLM may use", gt=0, le=1) = 0.85
    enforce_eager: _doc(bool, "skip graph capture / compilation (faster start)") = True
    lora_mode: _doc(
        Literal["adapter", "merge"],
        "serve each new adapter as a vLLM LoRA (adapter) or merged into the engine's weights (merge: no LoRA kernels)",
    ) = "adapter"


class TeacherConfig(_Section):
    name: _doc(str, "teacher: a local model directory or a built-in alias (tiny-reverse-teacher, tiny-long-teacher)") = (
        "tiny-reverse-teacher"
    )
    dtype: _doc(Literal["float32", "bfloat16"], "teacher dtype") = "float32"
    gpu_ids: _doc(GpuIds, "GPU ids of the teacher engines (G, or N:G on node N); empty = CPU") = field(
        default_factory=list
    )
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    kv_cache_gib: _doc(int, "KV cache per teacher engine on CPU, GiB", ge=1) = 1
    gpu_memory_utilization: _doc(float, "fraction of GPU memory the teacher may use", gt=0, le=1) = 0.85
    # An external OpenAI-compatible teacher/judge instead of the in-cluster engine (teacher/endpoint.py).
    endpoint: _doc(str, "OpenAI-compatible base URL of an external teacher/judge (http://127.0.0.1:8000/v1); "
                        "empty = the in-cluster vLLM engine. teacher.name then only names the local tokenizer") = ""
    model: _doc(str, "endpoint: the served model's name; empty = the only model it lists") = ""
    endpoint_api: _doc(
        Literal["completions", "chat"],
        "endpoint: completions = /completions on token ids or text (vLLM, Ollama); chat = /chat/completions with "
        "the chat messages (hosted chat APIs; generation only: no teacher log-probs)",
    ) = "completions"
    api_key_env: _doc(str, "endpoint: environment variable (*_API_KEY, *_TOKEN, *_SECRET) holding its API key, sent "
                           "only to the endpoint; empty = none") = ""
    timeout_s: _doc(float, "endpoint: seconds per HTTP request", gt=0) = 60.0
    max_concurrency: _doc(int, "endpoint: requests in flight at once", ge=1, le=256) = 8
    retries: _doc(int, "endpoint: retries of a request after a timeout, connection error, HTTP 429 or 5xx", ge=0,
                  le=20) = 3
    retry_backoff_s: _doc(float, "endpoint: delay before the first retry, doubled for each further one", ge=0) = 0.5
    max_failure_rate: _doc(float, "endpoint: stop the run once more than this fraction of teacher requests failed "
                                  "after retries (their rollouts are dropped and counted until then)", ge=0, le=1) = 0.05
    allow_template_mismatch: _doc(
        bool, "distil even though the teacher's chat template or end-of-sequence token differs from the student's "
              "(preflight warns instead of refusing; shared/chat_templates.py)",
    ) = False
    vocabulary: _doc(
        Literal["same", "align"],
        "same = the teacher scores the student's token ids (one vocabulary, checked in preflight); align = another "
        "vocabulary: the completion's text is re-tokenized by the teacher and its log-probs mapped back by "
        "character spans (shared/align.py; distill workflow only)",
    ) = "same"


ENDPOINT_ONLY = ("model", "api_key_env")  # teacher keys that mean nothing without teacher.endpoint


def _validate_endpoint(cfg: Config) -> None:
    from urllib.parse import urlsplit

    from shared.redact import SECRET_ENV

    tc = cfg.teacher
    if not tc.endpoint:
        for key in ENDPOINT_ONLY:
            if getattr(tc, key):
                raise ConfigError(f"teacher.{key}: only used with teacher.endpoint")
        if tc.endpoint_api != "completions":
            raise ConfigError("teacher.endpoint_api: only used with teacher.endpoint")
        return
    oc = cfg.orchestrator
    if tc.endpoint_api == "chat":
        if kl_in_advantage(cfg):
            raise ConfigError(f"teacher.endpoint_api: \"chat\" returns text, not the per-token teacher log-probs that "
                              f"trainer.loss.teacher_tau = {cfg.trainer.loss.teacher_tau:g} needs; set "
                              "trainer.loss.kl_coef = 0 (judge, comparator) or use \"completions\" with a vLLM server")
        if oc.workflow == "judge" and oc.judge.verdict == "loglik":
            raise ConfigError("teacher.endpoint_api: \"chat\" returns text, not the log-likelihoods that "
                              "orchestrator.judge.verdict = \"loglik\" needs; use verdict = \"reply\"")
    url = urlsplit(tc.endpoint)
    try:
        bad_port = url.port is not None and not 0 < url.port < 65536
    except ValueError:  # not a number, or out of range
        bad_port = True
    if url.username or url.password:
        raise ConfigError("teacher.endpoint: must not contain credentials (they would be written to config.toml); "
                          "put the API key in the variable named by teacher.api_key_env")
    if url.scheme not in ("http", "https") or not url.hostname or bad_port or url.query or url.fragment:
        raise ConfigError(f"teacher.endpoint: expected an http:// or https:// base URL such as "
                          f"http://127.0.0.1:8000/v1, got {json.dumps(tc.endpoint)}")
    if tc.gpu_ids or tc.parallel.dp > 1 or tc.parallel.tp > 1:
        raise ConfigError("teacher.gpu_ids: an external teacher (teacher.endpoint) runs outside the cluster; leave "
                          "teacher.gpu_ids and teacher.parallel unset")
    if tc.api_key_env and not (re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", tc.api_key_env) and SECRET_ENV.match(tc.api_key_env)):
        raise ConfigError(f"teacher.api_key_env: {json.dumps(tc.api_key_env)} must be an environment variable name "
                          "ending in _API_KEY, _TOKEN or _SECRET (such values are redacted from every output)")


class LossConfig(_Section):
    kl_coef: _doc(float, "reverse-KL weight: the default of teacher_tau and student_tau", ge=0) = 1.0
    adv_tau: _doc(
        float, "task-advantage weight: A_t = adv_tau * A_task + teacher_tau * logp_T(t) - student_tau * logp_S(t)", ge=0
    ) = 0.0
    teacher_tau: _doc(Annotated[float, Meta(ge=0)] | None, "weight of the teacher log-prob in A_t; unset = kl_coef") = (
        None
    )
    student_tau: _doc(Annotated[float, Meta(ge=0)] | None, "weight of the student log-prob in A_t; unset = kl_coef") = (
        None
    )
    kl_level: _doc(
        Literal["token", "sequence"], "KL term per token, or summed over the sequence and given to every token"
    ) = "token"
    kl_discount: _doc(float, "token level: token t gets sum_{k>=t} discount^(k-t) of the KL terms (0 = own only)",
                      ge=0, le=1) = 0.0
    reward_std_scale: _doc(bool, "divide A_task (reward minus its prompt group's mean) by the group's std") = False
    kl_baseline: _doc(
        Literal["none", "batch_mean"],
        "subtract the batch's mean per-token advantage (variance reduction; the gradient stays unbiased)",
    ) = "none"
    ref_kl_coef: _doc(float, "weight of a KL term to the frozen starting student (LoRA off, or a frozen copy with "
                              "trainer.finetune = full); 0 = off",
                      ge=0) = 0.0
    ref_kl_estimator: _doc(
        Literal["k1", "k3"], "reference-KL estimator: k1 = logp - ref, k3 = e^(ref-logp) - (ref-logp) - 1"
    ) = "k3"
    lockin_coef: _doc(float, "weight of a supervised NLL term on the completions of rewarded (r > 0) rollouts; 0 = off",
                      ge=0) = 0.0
    corrective_coef: _doc(float, "weight of a supervised NLL term on the teacher's answer to prompts with a failed "
                                 "(r <= 0) rollout; 0 = off", ge=0) = 0.0
    entropy_coef: _doc(float, "weight of an entropy bonus on the student's sampled positions; 0 = off", ge=0) = 0.0
    mask_ratio_low: _doc(float, "tokens whose trainer/inference ratio is below this are masked", gt=0, le=1) = 0.125
    mask_ratio_high: _doc(float, "tokens whose trainer/inference ratio is above this are masked", ge=1) = 8.0
    logprob_floor: _doc(float, "teacher log-probs below this (or -inf/NaN) are clipped to it and counted", lt=0) = (
        -20.0
    )
    teacher_topk: _doc(int, "top-k estimator: the teacher returns its k most likely tokens at each completion position "
                            "and the loss adds a KL over them plus a tail bucket (trainer/topk.py); 0 = off (the "
                            "sampled-token estimator alone)", ge=0, le=256) = 0
    topk_coef: _doc(float, "weight of the top-k KL term (with teacher_topk > 0; set kl_coef = 0 to train on it alone)",
                    ge=0) = 1.0
    topk_reverse_weight: _doc(float, "top-k term: beta in beta * KL(student || teacher) + (1 - beta) * KL(teacher || "
                                     "student) (1 = reverse, 0 = forward)", ge=0, le=1) = 1.0

    def __post_init__(self) -> None:
        # Resolved once, so the written config.toml (TOML has no null) and the trainer see numbers.
        if self.teacher_tau is None:
            self.teacher_tau = self.kl_coef
        if self.student_tau is None:
            self.student_tau = self.kl_coef


class TrainerConfig(_Section):
    gpu_ids: _doc(GpuIds, "GPU ids of the trainer ranks (one FSDP2 rank each; G, or N:G on node N); empty = CPU") = field(
        default_factory=list
    )
    cpu_ranks: _doc(int, "FSDP2 ranks (gloo) when the trainer runs on the CPU", ge=1, le=64) = 1
    lr: _doc(float, "AdamW learning rate", gt=0) = 2e-3
    lr_schedule: _doc(Literal["constant", "cosine"], "learning-rate schedule over max_steps (after warm-up)") = "constant"
    warmup_steps: _doc(int, "linear learning-rate warm-up, in optimizer steps", ge=0) = 0
    min_lr_ratio: _doc(float, "cosine schedule: final learning rate as a fraction of trainer.lr", ge=0, le=1) = 0.0
    weight_decay: _doc(float, "AdamW weight decay", ge=0) = 0.0
    max_grad_norm: _doc(float, "gradient-norm clip; 0 = off", ge=0) = 1.0
    micro_batch_size: _doc(int, "sequences per forward/backward on each rank", ge=1) = 64
    micro_batch_tokens: _doc(int, "pack each forward/backward into one row of at most this many tokens, no padding "
                                  "(trainer/packing.py); 0 = micro_batch_size padded sequences", ge=0, le=1 << 20) = 0
    max_bad_steps: _doc(int, "stop the run after this many skipped (non-finite or empty) steps in a row; 0 = never",
                        ge=0) = 5
    loss: LossConfig = field(default_factory=LossConfig)
    finetune: _doc(Literal["lora", "full"], "train a LoRA adapter (model.lora) or every student weight (full: no "
                                            "peft; broadcast/step_N holds the whole model)") = "lora"
    weight_transfer: _doc(Literal["auto", "filesystem", "memory", "nccl"],
                          "how the engines get each step's weights: broadcast/step_N files; memory (a merged LoRA "
                          "adapter from trainer rank 0 through Ray's object store, the file written afterwards); "
                          "an NCCL broadcast of full weights from trainer rank 0 (GPUs only); auto: memory where "
                          "inference.lora_mode = \"merge\" trains LoRA, else filesystem") = "auto"
    gpu_memory_fraction: _doc(float, "placement.colocate: each trainer rank's share of its GPU while it steps "
                                     "(torch.cuda.set_per_process_memory_fraction)", gt=0, le=1) = 1.0
    gpu_memory_idle_fraction: _doc(float, "placement.colocate with sleeping engines: what a trainer rank keeps of its "
                                          "GPU between steps (weights, adapter, optimizer; its cache is emptied)",
                                   gt=0, le=1) = 0.1


def weight_transfer(cfg: Config) -> str:
    """``trainer.weight_transfer`` with ``auto`` resolved: ``memory`` for a LoRA adapter the engines merge (they
    take tensors), ``filesystem`` otherwise (vLLM's LoRA kernels load an adapter from a directory)."""
    t = cfg.trainer
    if t.weight_transfer != "auto":
        return t.weight_transfer
    return "memory" if t.finetune == "lora" and cfg.inference.lora_mode == "merge" else "filesystem"


def _validate_finetune(cfg: Config) -> None:
    """Full fine-tuning and its weight transfer (trainer/full.py, inference/weights.py)."""
    t = cfg.trainer
    if t.finetune == "full" and cfg.inference.lora_mode == "adapter":
        raise ConfigError('trainer.finetune: "full" trains no LoRA adapter for inference.lora_mode = "adapter" to '
                          'serve; set inference.lora_mode = "merge" (the engines load the full weights in place)')
    if t.weight_transfer == "memory" and (t.finetune != "lora" or cfg.inference.lora_mode != "merge"):
        raise ConfigError('trainer.weight_transfer: "memory" sends a LoRA adapter that the engines merge; it needs '
                          'trainer.finetune = "lora" and inference.lora_mode = "merge"')
    if t.weight_transfer == "nccl":
        if t.finetune != "full":
            raise ConfigError('trainer.weight_transfer: "nccl" sends full weights; it needs trainer.finetune = "full"')
        if not (t.gpu_ids and cfg.inference.gpu_ids):
            raise ConfigError('trainer.weight_transfer: "nccl" needs GPUs (trainer.gpu_ids and inference.gpu_ids); '
                              'on the CPU use "filesystem"')
        if cfg.orchestrator.continual.core_environments and cfg.orchestrator.continual.gate:
            raise ConfigError('trainer.weight_transfer: "nccl" keeps no per-step weights on disk for the continual '
                              'gate to restore; use "filesystem" or orchestrator.continual.gate = false')


class DatasetConfig(_Section):
    path: _doc(str, "JSONL prompt file (one {\"prompt\", \"answer\"?} object per line); empty = generated") = ""
    on_bad_row: _doc(Literal["error", "skip"], "a malformed row stops the run (error) or is counted and skipped") = (
        "error"
    )


class EvalConfig(_Section):
    interval: _doc(int, "evaluate every N steps (and at the start and end); 0 = only start and end", ge=0) = 5
    num_prompts: _doc(int, "held-out prompts per evaluation", ge=1) = 64
    temperature: _doc(float, "sampling temperature of evaluations (0 = greedy)", ge=0) = 0.0


class ChatMessage(_Section):
    role: _doc(Literal["system", "user", "assistant"], "chat role") = "user"
    content: _doc(str, "message text") = ""


class TeacherModelConfig(_Section):
    context: _doc(str, "extra context only the teacher sees (context distillation); empty = none") = ""
    context_mode: _doc(
        Literal["user_prefix", "system", "fewshot"],
        "where the context goes: prefix of the user turn, a system message, or few-shot turns",
    ) = "user_prefix"
    context_messages: _doc(list[ChatMessage], "few-shot turns placed before the prompt (context_mode = fewshot)") = (
        field(default_factory=list)
    )


JUDGE_PLACEHOLDERS = ("question", "answer", "reference")  # {question} and {answer} are required


class JudgeConfig(_Section):
    rubric: _doc(
        str,
        "judge prompt with {question}, {answer} and optional {reference} placeholders ({{ }} for literal braces); "
        "empty = the built-in rubric for mode",
    ) = ""
    system: _doc(str, "system message for the judge; empty = none") = ""
    target_spec: _doc(str, "what a good answer is; given to the judge as {reference} when a prompt has no answer") = ""
    mode: _doc(Literal["binary", "graded"], "binary: VERDICT: PASS/FAIL -> +1/-1; graded: SCORE: s/max -> [-1, 1]") = (
        "binary"
    )
    scale_min: _doc(float, "graded mode: the lowest score on the judge's scale (maps to -1)") = 0.0
    scale_max: _doc(float, "graded mode: the highest score on the judge's scale (maps to +1)") = 10.0
    on_unparseable: _doc(
        Literal["zero", "negative", "skip"],
        "a judge reply without a verdict: reward 0, reward -1, or drop the sample (always counted)",
    ) = "skip"
    max_tokens: _doc(int, "longest judge reply, in tokens", ge=1) = 256
    temperature: _doc(float, "judge sampling temperature (0 = greedy)", ge=0) = 0.0
    verdict: _doc(
        Literal["reply", "loglik"],
        "reply: the judge writes a reply that is parsed; loglik: the judge's log-likelihoods of replying `yes` "
        "and `no` decide (binary: the likelier; graded: 2 P(yes | yes or no) - 1), never unparseable",
    ) = "reply"
    yes: _doc(str, "verdict = loglik: the judge's positive reply") = "Yes"
    no: _doc(str, "verdict = loglik: the judge's negative reply") = "No"


class ComparatorConfig(_Section):
    kind: _doc(
        Literal["exact", "bleu", "semantic"],
        "student vs teacher answer: normalised exact match, sentence BLEU-4, or embedding cosine similarity",
    ) = "exact"
    reward_threshold: _doc(
        Annotated[float, Meta(ge=-1, le=1)] | str,
        "a score >= this counts as correct; \"auto\": exact 1, bleu 0.5, semantic 0.9 (COMPARATOR_THRESHOLDS)",
    ) = "auto"
    normalize_numbers: _doc(bool, "exact: compare numbers canonically (1,000 = 1000, 3.50 = 3.5)") = True
    embedding_model: _doc(
        str, "semantic: a local model directory or alias whose mean-pooled last hidden states embed answers"
    ) = "smollm2-135m-instruct"
    reward_correct: _doc(float, "reward of a correct student answer") = 1.0
    reward_wrong: _doc(float, "reward of a wrong one (which also gets a corrective step on the teacher's answer)") = 0.0
    question_source: _doc(
        Literal["dataset", "generator", "teacher"],
        "questions from orchestrator.dataset.path, from the environment, or written by the teacher",
    ) = "generator"
    num_questions: _doc(int, "question_source = teacher: questions asked for per teacher request", ge=1) = 8
    question_prompt: _doc(str, "question_source = teacher: the request, with an {n} placeholder") = (
        "Write {n} different short questions that each have one clear, factual answer of a few words. "
        "Write one question per line, numbered 1., 2., 3., and nothing else."
    )
    question_max_tokens: _doc(int, "question_source = teacher: longest teacher reply, in tokens", ge=1) = 512
    question_temperature: _doc(float, "question_source = teacher: sampling temperature", ge=0) = 1.0


# reward_threshold = "auto": SmolLM2 mean-pooled cosines of unrelated sentences are ~0.6, paraphrases ~0.95.
COMPARATOR_THRESHOLDS = {"exact": 1.0, "bleu": 0.5, "semantic": 0.9}


def check_template(key: str, text: str, allowed: tuple[str, ...], required: tuple[str, ...]) -> None:
    """A ConfigError naming ``key`` unless ``text`` uses only ``{name}`` placeholders from ``allowed``
    (no positional ``{}``, attributes, conversions or format specs) and contains every ``required`` one."""
    import string

    hint = "; write a literal brace as {{ or }}"
    try:
        parts = list(string.Formatter().parse(text))
    except ValueError as e:
        raise ConfigError(f"{key}: malformed placeholder ({e}){hint}") from None
    names = set()
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in allowed or spec or conversion:
            shown = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            shown = shown if re.fullmatch(r"[\w.!:<>^=+ -]*", shown) else json.dumps(shown)
            known = ", ".join("{" + a + "}" for a in allowed)
            raise ConfigError(f"{key}: unknown placeholder {{{shown}}} (allowed: {known}){hint}")
        names.add(name)
    for name in required:
        if name not in names:
            raise ConfigError(f"{key}: must contain the placeholder {{{name}}}")


def _validate_judge_comparator(cfg: Config) -> None:
    judge, comp = cfg.orchestrator.judge, cfg.orchestrator.comparator
    if judge.rubric:
        check_template("orchestrator.judge.rubric", judge.rubric, JUDGE_PLACEHOLDERS, ("question", "answer"))
    if judge.scale_min >= judge.scale_max:
        raise ConfigError("orchestrator.judge.scale_min: must be below orchestrator.judge.scale_max")
    if judge.verdict == "loglik":
        for key in ("yes", "no"):
            if not getattr(judge, key).strip():
                raise ConfigError(f"orchestrator.judge.{key}: must not be empty with verdict = \"loglik\"")
        if judge.yes.strip() == judge.no.strip():
            raise ConfigError("orchestrator.judge.no: must differ from orchestrator.judge.yes")
    check_template("orchestrator.comparator.question_prompt", comp.question_prompt, ("n",), ("n",))
    if isinstance(comp.reward_threshold, str) and comp.reward_threshold != "auto":
        raise ConfigError(
            f"orchestrator.comparator.reward_threshold: expected a number in [-1, 1] or \"auto\", "
            f"got {json.dumps(comp.reward_threshold)}"
        )
    if cfg.orchestrator.workflow == "comparator" and comp.question_source == "dataset" and not cfg.orchestrator.dataset.path:
        raise ConfigError("orchestrator.comparator.question_source: \"dataset\" needs orchestrator.dataset.path")
    if cfg.orchestrator.workflow != "distill" and cfg.orchestrator.skip_verification:
        raise ConfigError(f"orchestrator.skip_verification: must be false with orchestrator.workflow = "
                          f"{json.dumps(cfg.orchestrator.workflow)} (its reward is the point)")
    cont = cfg.orchestrator.continual
    if not cont.core_environments and cont.replay_ratio:
        raise ConfigError("orchestrator.continual.replay_ratio: needs orchestrator.continual.core_environments")
    if len(set(cont.core_environments)) != len(cont.core_environments):
        raise ConfigError(f"orchestrator.continual.core_environments: duplicate name in {json.dumps(cont.core_environments)}")
    if cfg.orchestrator.environment in cont.core_environments:
        raise ConfigError("orchestrator.continual.core_environments: must not contain orchestrator.environment "
                          f"({json.dumps(cfg.orchestrator.environment)} is the new skill being trained)")


ARITHMETIC_OPERATORS = ("+", "-", "*")
FORMAT_RULES = ("uppercase", "lowercase", "period", "no_commas")  # see orchestrator/environments/format_check.py


class ArithmeticConfig(_Section):
    min_operand: _doc(int, "arithmetic: smallest operand", ge=-(10**9), le=10**9) = 0
    max_operand: _doc(int, "arithmetic: largest operand", ge=-(10**9), le=10**9) = 99
    operators: _doc(list[str], "arithmetic: operators to draw from (+, -, *); * binds tighter") = field(
        default_factory=lambda: ["+", "-", "*"]
    )
    terms: _doc(int, "arithmetic: operands per expression", ge=2, le=6) = 2
    teacher_context: _doc(
        Literal["none", "solution"],
        "arithmetic: what only the teacher sees per prompt: nothing, or the worked solution (the expression "
        "evaluated step by step and the result; generated prompts only)",
    ) = "none"


class FormatCheckConfig(_Section):
    rules: _doc(
        list[str], "format_check: rules to meet (uppercase, lowercase, period, no_commas); score = fraction met"
    ) = field(default_factory=lambda: ["uppercase"])
    instruct: _doc(bool, "format_check: append the rules' instruction to each prompt (off: only the teacher's context)") = (
        False
    )


class ReasoningGymConfig(_Section):
    dataset: _doc(str, "reasoning_gym: a reasoning-gym dataset (e.g. leg_counting, chain_sum, basic_arithmetic)") = (
        "leg_counting"
    )
    options: _doc(dict[str, Any], "reasoning_gym: the dataset's config options, e.g. {min_terms = 2, max_terms = 3}") = (
        field(default_factory=dict)
    )
    instruction: _doc(str, "reasoning_gym: text appended to each question; empty = none") = (
        "Give only the final answer, between <answer> and </answer> tags."
    )


class RunningSumConfig(_Section):
    reward: _doc(
        Literal["exact", "partial"],
        "running_sum: the reward: exact match, or the fraction of steps right before the first wrong one "
        "(evaluations log both as eval/running_sum/exact and /partial)",
    ) = "exact"


class EnvArgsConfig(_Section):
    answers: _doc(list[str], "a fixed answer set: a completion counts as one of these (empty = free-form)") = field(
        default_factory=list
    )
    answer_match: _doc(
        Literal["exact", "nearest"],
        "with answers: only an exact member scores (else 0), or the completion maps to the nearest answer",
    ) = "exact"
    answer_choice: _doc(
        Literal["sample", "loglik"],
        "with answers: sample free text (scored by answer_match), or draw allowed answers by the student's "
        "log-likelihood (inference/answer_choice.py)",
    ) = "sample"
    arithmetic: ArithmeticConfig = field(default_factory=ArithmeticConfig)
    format_check: FormatCheckConfig = field(default_factory=FormatCheckConfig)
    reasoning_gym: ReasoningGymConfig = field(default_factory=ReasoningGymConfig)
    running_sum: RunningSumConfig = field(default_factory=RunningSumConfig)


def _check_choices(key: str, values: list[str], allowed: tuple[str, ...]) -> None:
    if not values:
        raise ConfigError(f"{key}: must not be empty (choose from {', '.join(allowed)})")
    for v in values:
        if v not in allowed:
            raise ConfigError(f"{key}: unknown value {json.dumps(v)} (choose from {', '.join(allowed)})")
    if len(set(values)) != len(values):
        raise ConfigError(f"{key}: duplicate value in {json.dumps(values)}")


def _validate_env_args(cfg: Config) -> None:
    oc, ea = cfg.orchestrator, cfg.orchestrator.env_args
    ar = ea.arithmetic
    if ar.min_operand > ar.max_operand:
        raise ConfigError("orchestrator.env_args.arithmetic.min_operand: must not be above max_operand")
    _check_choices("orchestrator.env_args.arithmetic.operators", ar.operators, ARITHMETIC_OPERATORS)
    _check_choices("orchestrator.env_args.format_check.rules", ea.format_check.rules, FORMAT_RULES)
    for a in ea.answers:
        if not a.strip():
            raise ConfigError("orchestrator.env_args.answers: an answer must not be empty")
    if len({a.strip() for a in ea.answers}) != len(ea.answers):
        raise ConfigError(f"orchestrator.env_args.answers: duplicate answer in {json.dumps(ea.answers)}")
    if ea.answer_choice == "loglik":
        if not ea.answers:
            raise ConfigError('orchestrator.env_args.answer_choice: "loglik" needs orchestrator.env_args.answers')
        if cfg.inference.lora_mode == "adapter" and not cfg.inference.gpu_ids:
            raise ConfigError('orchestrator.env_args.answer_choice: "loglik" scores answers with prompt_logprobs, '
                              'which vLLM\'s CPU path cannot do with LoRA enabled; set inference.lora_mode = "merge"')
    if oc.environment == "exact_answer" and not oc.dataset.path:
        raise ConfigError("orchestrator.environment: \"exact_answer\" needs orchestrator.dataset.path")
    if oc.environment == "reasoning_gym":
        _validate_reasoning_gym(ea.reasoning_gym)


def reasoning_gym_datasets() -> dict[str, Any]:
    """reasoning-gym's registry (name -> (dataset class, config class)); imported on first use (~5 s)."""
    import warnings

    with warnings.catch_warnings():  # a dependency of reasoning-gym has `is` with a literal (SyntaxWarning)
        warnings.simplefilter("ignore")
        from reasoning_gym.factory import DATASETS
    return DATASETS


def _validate_reasoning_gym(rg: ReasoningGymConfig) -> None:
    datasets = reasoning_gym_datasets()
    if rg.dataset not in datasets:
        raise ConfigError(
            f"orchestrator.env_args.reasoning_gym.dataset: unknown dataset {json.dumps(rg.dataset)} "
            f"(e.g. {', '.join(n for n in ('leg_counting', 'chain_sum', 'basic_arithmetic') if n in datasets)}; "
            f"{len(datasets)} in reasoning-gym)"
        )
    if "seed" in rg.options or "size" in rg.options:
        raise ConfigError("orchestrator.env_args.reasoning_gym.options: seed and size are set by the run (seed)")
    try:
        config = datasets[rg.dataset][1](**rg.options, seed=0, size=1)
        if hasattr(config, "validate"):
            config.validate()
    except Exception as e:  # TypeError (unknown option), AssertionError/ValueError (bad value), ...
        detail = " ".join(str(e).split()) or type(e).__name__
        raise ConfigError(f"orchestrator.env_args.reasoning_gym.options: {detail}") from None


class ContinualConfig(_Section):
    core_environments: _doc(
        list[str], "continual learning: environments whose behaviour must be kept (each evaluated as eval/core/<name>); "
                   "empty = off"
    ) = field(default_factory=list)
    replay_ratio: _doc(float, "continual: fraction of each batch's prompts drawn from the core environments (replay)",
                       ge=0, lt=1) = 0.0
    gate: _doc(bool, "continual: stop the run and restore the last passing adapter when a core metric regresses") = True
    max_regression: _doc(float, "continual: the gate fails when eval/core/<name>/avg drops more than this below its "
                                "start value", ge=0) = 0.1


class DeadlineConfig(_Section):
    startup_s: _doc(float, "seconds every role has to start (engines load, trainer ranks meet) before the run stops "
                           "naming the role", gt=0) = 1800.0
    floor_s: _doc(float, "the shortest deadline of any call to a role (sample, score, train step, weight update, "
                         "evaluation, checkpoint)", gt=0) = 600.0
    median_multiple: _doc(float, "after after_calls calls of a kind, its deadline is max(floor_s, this x the median "
                                 "of those calls' durations)", ge=1) = 10.0
    after_calls: _doc(int, "calls of a kind measured before their median counts", ge=1) = 3


class TeacherRouteConfig(_Section):
    by: _doc(
        Literal["default", "env", "column"],
        "with [teachers.NAME]: which teacher scores a prompt: always the default one, the one its environment maps "
        "to (env), or the one its dataset row names in a \"teacher\" field (column; rows without one: default)",
    ) = "default"
    env: _doc(dict[str, str], "by = env: environment name -> teacher name (orchestrator.environment and "
                              "continual.core_environments); an environment not listed gets the default") = field(
        default_factory=dict
    )
    default: _doc(str, "the teacher of prompts no rule names (and of evaluations and baselines); empty = the first "
                       "of [teachers]") = ""


class OrchestratorConfig(_Section):
    environment: _doc(
        str, "prompt source and scorer: reverse_text, arithmetic, format_check, reasoning_gym, exact_answer, french, "
             "reverse_text_long, reverse_text_short, running_sum"
    ) = "reverse_text"
    batch_size: _doc(int, "prompts per step", ge=1) = 16
    group_size: _doc(int, "completions sampled per prompt", ge=1) = 4
    max_async_level: _doc(int, "k: the rollouts of step n may come from the adapter of step n-1-k (sampled and scored "
                               "while the trainer works); 0 = synchronous; older rollouts are dropped", ge=0, le=8) = 0
    drain_timeout: _doc(float, "seconds the end of a run waits for in-flight sampling/scoring before cancelling it",
                        gt=0) = 30.0
    eval_baseline: _doc(bool, "before training, evaluate the student and the teacher (with its context)") = False
    skip_verification: _doc(
        bool, "compute no task reward (env.score is never called); needs trainer.loss.adv_tau = 0"
    ) = False
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    teacher_model: TeacherModelConfig = field(default_factory=TeacherModelConfig)
    teacher_route: TeacherRouteConfig = field(default_factory=TeacherRouteConfig)
    workflow: _doc(
        Literal["distill", "judge", "comparator", "sft"],
        "distill: teacher log-probs (KL); judge: teacher-as-reward-model (RLAIF); comparator: teacher answers as "
        "references; sft: the teacher samples the completions and the trainer fits them by NLL (off-policy "
        "distillation; no student sampling). One module each in orchestrator/workflows/; all compose with "
        "[orchestrator.continual] (sft: its capability suite and gate, replay_ratio 0)",
    ) = "distill"
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    comparator: ComparatorConfig = field(default_factory=ComparatorConfig)
    env_args: EnvArgsConfig = field(default_factory=EnvArgsConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    deadline: DeadlineConfig = field(default_factory=DeadlineConfig)


class CkptConfig(_Section):
    interval: _doc(int, "write a checkpoint (trainer + orchestrator state) every N steps to "
                        "output_dir/checkpoints/step_N; 0 = only when stopped by SIGTERM/SIGINT", ge=0) = 0
    keep: _doc(int, "complete checkpoints kept (older ones are deleted once a newer one is complete)", ge=1) = 2
    stop_timeout: _doc(float, "after SIGTERM/SIGINT, seconds to wait for the step in progress and the checkpoint "
                              "before stopping without one", gt=0) = 300.0
    on_failure: _doc(Literal["stop", "restart"], "a role that fails mid-run: stop the run (exit 1), or restart every "
                                                 "role from the latest checkpoint (up to max_restarts times)") = "stop"
    max_restarts: _doc(int, "with on_failure = \"restart\": restarts per launch before the run stops", ge=0) = 2
    trust_unsigned: _doc(bool, "--resume from a checkpoint whose signed manifest is missing or does not verify "
                               "(another machine's key, changed files); only for one you trust") = False


class WandbConfig(_Section):
    mode: _doc(Literal["offline", "online", "disabled"], "W&B mode (online needs WANDB_API_KEY)") = "offline"
    project: _doc(str, "W&B project") = "opd"
    name: _doc(str, "run name; empty = output_dir's name") = ""
    group: _doc(str, "run group; empty = the experiment's name") = ""


class PlacementConfig(_Section):
    colocate: _doc(bool, "roles may share GPUs (overlapping gpu_ids); each GPU's memory shares are planned and "
                         "checked (shared/placement.py)") = False
    sleep: _doc(bool, "with colocate: engines that share a GPU with the trainer sleep (vLLM sleep level 1) while it "
                      "steps; needs orchestrator.max_async_level = 0") = True


class Config(_Section):
    max_steps: _doc(int, "optimizer steps to run", ge=1) = 20
    seed: _doc(int, "seed for prompts, sampling and initialisation", ge=0, le=2**31 - 1) = 0
    output_dir: _doc(str, "where metrics, adapters, logs and the report go") = "outputs/run"
    dry_run: _doc(bool, "check the input as a run would, print the resolved config and plan; start nothing") = False
    resume: _doc(bool, "continue from the latest complete checkpoint in output_dir/checkpoints") = False
    ray_address: _doc(str, "a running Ray cluster to join (host:port of its head, as `ray start --head` printed, "
                          "or auto); empty = a private Ray on this machine (slurm/multi_node.sbatch sets it)") = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    teachers: _doc(dict[str, TeacherConfig], "several named teachers ([teachers.NAME] tables, the keys of [teacher]), "
                                             "picked per prompt by orchestrator.teacher_route; empty = the one "
                                             "[teacher]") = field(default_factory=dict)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    orchestrator: OrchestratorConfig = field(default_factory=OrchestratorConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)


# Convenience flags of the user's card: `--inference_gpu_ids 0,1` is `--inference.gpu_ids 0,1`.
CLI_ALIASES = {
    "inference_gpu_ids": "inference.gpu_ids",
    "teacher_gpu_ids": "teacher.gpu_ids",
    "trainer_gpu_ids": "trainer.gpu_ids",
}


# ----------------------------------------------------------------------------------------------
# Loading and merging


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, ValueError) as e:  # ValueError: UnicodeDecodeError, or a NUL byte in the path
        raise ConfigError(f"{path}: cannot read config file ({e.__class__.__name__}: {e})") from None
    try:
        return tomli.loads(text)
    except tomli.TOMLDecodeError as e:
        line, col = getattr(e, "lineno", None), getattr(e, "colno", None)
        msg = getattr(e, "msg", str(e))
        if line is None:  # older tomli: "... (at line 3, column 5)"
            m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
            line, col = (m.group(1), m.group(2)) if m else ("?", "?")
            msg = re.sub(r"\s*\(at line.*\)$", "", str(e))
        raise ConfigError(f"{path}: line {line}, column {col}: invalid TOML: {msg}") from None
    except (ValueError, RecursionError) as e:  # an integer of > 4300 digits; nesting deeper than tomli allows
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A new dict: ``override`` on top of ``base``; tables merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _field_type(path: list[str]) -> Any:
    """The declared type at a dotted key path (None if there is no such key)."""
    tp: Any = Config
    for key in path:
        if typing.get_origin(tp) is dict:  # a table of named entries ([teachers.NAME]): any key, the value's type
            tp = typing.get_args(tp)[1]
            while typing.get_origin(tp) is Annotated:
                tp = typing.get_args(tp)[0]
            continue
        if not (isinstance(tp, type) and issubclass(tp, Struct)):
            return None
        fields = {f.name: f.type for f in msgspec.structs.fields(tp)}
        if key not in fields:
            return None
        tp = fields[key]
        while typing.get_origin(tp) is Annotated:
            tp = typing.get_args(tp)[0]
    return tp


def _parse_cli_value(path: list[str], tokens: list[str]) -> Any:
    """CLI tokens → a value.  TOML literal syntax is tried first; lists accept `0,1` and `0 1`."""
    tp = _field_type(path)
    is_list = typing.get_origin(tp) is list
    if is_list:
        parts = [p for tok in tokens for p in tok.split(",") if p != ""]
        item = typing.get_args(tp)[0] if typing.get_args(tp) else None
        return [_scalar(p, item) for p in parts]
    if len(tokens) != 1:
        raise ConfigError(f"{'.'.join(path)}: expected one value, got {len(tokens)} ({' '.join(tokens)})")
    return _scalar(tokens[0], tp)


def _scalar(token: str, tp: Any = None) -> Any:
    try:
        value = tomli.loads(f"v = {token}")["v"]
    except (tomli.TOMLDecodeError, ValueError, RecursionError):
        return token  # a bare string
    if tp is str and not isinstance(value, str):
        return token  # `--wandb.name 123`, `--output_dir 2024-01-01`: a str field takes the token as written
    return value


def parse_cli(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Split ``@ a.toml @ b.toml --x.y V ...`` into config files and an override dict."""
    files: list[str] = []
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "@":
            if i + 1 >= len(argv):
                raise ConfigError("'@' must be followed by a TOML file path")
            files.append(argv[i + 1])
            i += 2
        elif tok.startswith("@"):
            files.append(tok[1:])
            i += 1
        elif tok.startswith("--"):
            key, eq, inline = tok[2:].partition("=")
            key = key.replace("-", "_")
            key = CLI_ALIASES.get(key, key)
            if not key:
                raise ConfigError(f"bad option '{tok}'")
            values = [inline] if eq else []
            i += 1
            if not eq:
                while i < len(argv) and not argv[i].startswith("--") and not argv[i].startswith("@"):
                    values.append(argv[i])
                    i += 1
            path = key.split(".")
            if _field_type(path) is None:
                raise ConfigError(f"{key}: unknown option (see `rl --dry_run` for every key)")
            if not values:
                if _field_type(path) is bool:
                    value: Any = True
                else:
                    raise ConfigError(f"{key}: missing value")
            else:
                value = _parse_cli_value(path, values)
            node = overrides
            for part in path[:-1]:
                if not isinstance(node.get(part), dict):
                    node[part] = {}  # the later option wins over an earlier `--trainer 5`
                node = node[part]
            node[path[-1]] = value
        else:
            raise ConfigError(f"unexpected argument '{tok}' (config files follow '@', options start with '--')")
    return files, overrides


_MSGSPEC_PATH = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)


def _dig(raw: Any, path: str) -> Any:
    node = raw
    for part in re.findall(r"\.(\w+)|\[(\d+)\]", path):
        key, idx = part
        try:
            node = node[key] if key else node[int(idx)]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def from_dict(raw: dict[str, Any]) -> Config:
    """Validate a merged dict into a :class:`Config`; every failure names its key path."""
    try:
        cfg = msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as e:
        m = _MSGSPEC_PATH.match(str(e))
        msg, path = m.group("msg"), (m.group("path") or "")
        key = path.lstrip(".")
        unknown = re.match(r"Object contains unknown field `(.+)`", msg, re.DOTALL)
        if unknown:
            name = unknown.group(1)
            if not re.fullmatch(r"[\w-]+", name):
                name = json.dumps(name)  # keep the message one line: `trainer."a\nb": unknown key`
            full = f"{key}.{name}" if key else name
            raise ConfigError(f"{full}: unknown key") from None
        got = _dig(raw, path)
        if msg.startswith("Invalid enum value"):
            choices = typing.get_args(_field_type(key.split(".")))
            raise ConfigError(f"{key}: expected one of {', '.join(map(json.dumps, choices))}, got {json.dumps(got)}") from None
        msg = msg.replace("`", "")
        msg = msg[0].lower() + msg[1:]
        if ".gpu_ids[" in key:  # GpuIds: say what a string id looks like, not msgspec's `int | str`
            msg = msg.replace("expected int | str", 'expected int or "N:G"')
        if got is not None and not isinstance(got, (dict, list)):
            shown = json.dumps(got) if isinstance(got, str) else repr(got)
            msg = re.sub(r", got \w+$", "", msg) + f", got {shown}"
        raise ConfigError(f"{key or '<root>'}: {msg}") from None
    validate(cfg)
    return cfg


def load(argv: list[str]) -> Config:
    files, overrides = parse_cli(argv)
    raw: dict[str, Any] = {}
    for f in files:
        raw = deep_merge(raw, load_toml(f))
    raw = deep_merge(raw, overrides)
    return from_dict(raw)


# Loss keys that act on the student's own samples (or the task reward), meaningless under workflow = "sft".
ON_POLICY_ONLY = ("adv_tau", "lockin_coef", "corrective_coef", "ref_kl_coef", "entropy_coef", "teacher_topk")


def topk_in_loss(cfg: Config) -> bool:
    """Whether the loss has the top-k term (the teacher must return its top-k log-probs of the student's rollouts)."""
    return cfg.orchestrator.workflow != "sft" and cfg.trainer.loss.teacher_topk > 0 and cfg.trainer.loss.topk_coef > 0


def kl_in_advantage(cfg: Config) -> bool:
    """Whether the advantage uses the teacher's log-probs of the student's rollouts (the reverse-KL term)."""
    return cfg.orchestrator.workflow != "sft" and cfg.trainer.loss.teacher_tau > 0


def needs_teacher_logprobs(cfg: Config) -> bool:
    """Whether the run trains on any per-token teacher log-probs: the KL term, or a judge that decides by the
    log-likelihoods of its replies (what an external teacher must then serve)."""
    oc = cfg.orchestrator
    return kl_in_advantage(cfg) or topk_in_loss(cfg) or (oc.workflow == "judge" and oc.judge.verdict == "loglik")


def _validate_sft(cfg: Config) -> None:
    """``orchestrator.workflow = "sft"`` (SFT on teacher samples): no on-policy term, no student sampling."""
    oc = cfg.orchestrator
    if oc.workflow != "sft":
        return
    for key in ON_POLICY_ONLY:
        if getattr(cfg.trainer.loss, key):
            raise ConfigError(f"trainer.loss.{key}: must be 0 with orchestrator.workflow = \"sft\" "
                              "(SFT trains on the teacher's samples, not the student's)")
    if oc.max_async_level:
        raise ConfigError("orchestrator.max_async_level: must be 0 with orchestrator.workflow = \"sft\" "
                          "(the teacher's samples do not depend on the student)")
    if cfg.teacher.endpoint:
        raise ConfigError("orchestrator.workflow: \"sft\" needs the in-cluster teacher engine (teacher.endpoint is set)")
    if oc.continual.core_environments and oc.continual.replay_ratio:  # the capability suite and gate compose
        raise ConfigError("orchestrator.continual.replay_ratio: must be 0 with orchestrator.workflow = \"sft\" "
                          "(sft composes with the capability suite and the gate only)")


def _validate_topk(cfg: Config) -> None:
    """``trainer.loss.teacher_topk``: the teacher's top-k log-probs come from vLLM's ``prompt_logprobs``."""
    if topk_in_loss(cfg) and cfg.teacher.endpoint and cfg.teacher.endpoint_api == "chat":
        raise ConfigError(f"trainer.loss.teacher_topk: teacher.endpoint_api = \"chat\" returns text, not the top-"
                          f"{cfg.trainer.loss.teacher_topk} teacher log-probs the top-k term needs; use \"completions\" "
                          "with a vLLM server or set trainer.loss.teacher_topk = 0")


def _validate_vocabulary(cfg: Config) -> None:
    """``teacher.vocabulary = "align"`` maps the teacher's log-probs of the student's completions; anything that
    hands teacher token ids to the student (its answers, a judge's yes/no ids) needs one vocabulary."""
    if cfg.teacher.vocabulary != "align":
        return
    oc = cfg.orchestrator
    if oc.workflow != "distill":
        raise ConfigError(f"teacher.vocabulary: \"align\" works with orchestrator.workflow = \"distill\" only, got "
                          f"{json.dumps(oc.workflow)} (it trains on or parses the teacher's own tokens)")
    if cfg.teachers:
        raise ConfigError("teacher.vocabulary: \"align\" works with one teacher ([teacher]), not [teachers.NAME] tables")
    if cfg.trainer.loss.teacher_topk:
        raise ConfigError("trainer.loss.teacher_topk: must be 0 with teacher.vocabulary = \"align\" (the teacher's "
                          "top-k ids are tokens of its own vocabulary)")
    if cfg.trainer.loss.corrective_coef:
        raise ConfigError("trainer.loss.corrective_coef: must be 0 with teacher.vocabulary = \"align\" (a corrective "
                          "sample is the teacher's answer in the teacher's token ids)")


def _validate_ray_address(addr: str) -> None:
    if addr and addr != "auto" and not re.fullmatch(r"[A-Za-z0-9.\-]+:[0-9]{1,5}", addr):
        raise ConfigError(f"ray_address: expected host:port of a Ray head (10.0.0.5:6379) or auto, got {json.dumps(addr)}")
    if addr and addr != "auto" and not 0 < int(addr.rsplit(":", 1)[1]) < 65536:
        raise ConfigError(f"ray_address: port out of range in {json.dumps(addr)}")


_GPU_ID = re.compile(r"(?:([0-9]+):)?([0-9]+)")


def gpu_slot(value: int | str, key: str) -> tuple[int, int]:
    """``(node, gpu)`` of one entry of a role's ``gpu_ids``: ``G`` (an int, as every single-node card has it) is
    GPU G of node 0, the node rl runs on; ``"N:G"`` is GPU G of node N.  One id names its own node, so a role
    can span nodes and GPU 0 of node 1 is not GPU 0 of node 0 (no parallel list of nodes to keep in step)."""
    if isinstance(value, int):
        return 0, value
    m = _GPU_ID.fullmatch(value.strip())
    if m is None:
        raise ConfigError(f"{key}: expected int, got {json.dumps(value)}; a GPU id is G (a GPU of the node rl runs "
                          "on) or \"N:G\" (GPU G of node N)")
    return int(m.group(1) or 0), int(m.group(2))


def gpu_slots(ids: list[int | str], key: str) -> list[tuple[int, int]]:
    """``(node, gpu)`` of every id of ``key`` (``inference.gpu_ids``); a malformed one is named by its index."""
    return [gpu_slot(v, f"{key}[{i}]") for i, v in enumerate(ids)]


def slot_name(slot: tuple[int, int]) -> str:
    """An id as the user writes it: ``G`` on node 0, ``N:G`` elsewhere."""
    return str(slot[1]) if slot[0] == 0 else f"{slot[0]}:{slot[1]}"


def _validate_gpu_ids(cfg: Config) -> None:
    """Ids are >= 0, well-formed, and name each (node, GPU) once across all roles (unless placement.colocate)."""
    roles = {"inference": cfg.inference.gpu_ids, "teacher": cfg.teacher.gpu_ids, "trainer": cfg.trainer.gpu_ids,
             **{f"teachers.{name}": tc.gpu_ids for name, tc in cfg.teachers.items()}}
    slots: dict[str, list[tuple[int, int]]] = {}
    for role, ids in roles.items():
        if any(isinstance(i, int) and i < 0 for i in ids):
            raise ConfigError(f"{role}.gpu_ids: GPU ids must be >= 0, got {ids}")
        slots[role] = gpu_slots(ids, f"{role}.gpu_ids")
        if len(set(slots[role])) != len(ids):
            raise ConfigError(f"{role}.gpu_ids: duplicate GPU id in {ids}")
    seen: dict[tuple[int, int], str] = {}
    for role, role_slots in slots.items():
        for slot in role_slots:
            if slot in seen and not cfg.placement.colocate:
                raise ConfigError(f"{role}.gpu_ids: GPU {slot_name(slot)} is also given to {seen[slot]}.gpu_ids; "
                                  "roles may not share a device unless placement.colocate = true")
            seen[slot] = role


DEFAULT_TEACHER = "default"  # the name of the one [teacher] of a run without [teachers.NAME]
_TEACHER_NAME = re.compile(r"[A-Za-z0-9_-]+")


def teacher_configs(cfg: Config) -> dict[str, TeacherConfig]:
    """Every teacher of the run by name: the ``[teachers.NAME]`` tables, or ``[teacher]`` as ``"default"``."""
    return dict(cfg.teachers) if cfg.teachers else {DEFAULT_TEACHER: cfg.teacher}


def default_teacher(cfg: Config) -> str:
    """The teacher of prompts no routing rule names: ``teacher_route.default``, else the first one."""
    return cfg.orchestrator.teacher_route.default or next(iter(teacher_configs(cfg)))


def primary_teacher(cfg: Config) -> str:
    """The teacher of the run's own environment: what evaluations, baselines and the single-teacher checks use."""
    route = cfg.orchestrator.teacher_route
    env_teacher = route.env.get(cfg.orchestrator.environment) if route.by == "env" else None
    return env_teacher or default_teacher(cfg)


def teacher_view(cfg: Config, name: str | None = None) -> Config:
    """``cfg`` as teacher ``name`` (default: :func:`primary_teacher`) sees it: that teacher's keys in ``[teacher]``,
    so every single-teacher check and backend runs unchanged; ``cfg`` itself without ``[teachers]``."""
    if not cfg.teachers:
        return cfg
    return msgspec.structs.replace(cfg, teacher=cfg.teachers[name or primary_teacher(cfg)])


def _validate_teachers(cfg: Config) -> None:
    """``[teachers.NAME]`` and ``orchestrator.teacher_route`` (orchestrator/teacher_set.py routes the prompts)."""
    route, oc = cfg.orchestrator.teacher_route, cfg.orchestrator
    key = "orchestrator.teacher_route"
    if not cfg.teachers:
        if route.by != "default":
            raise ConfigError(f"{key}.by: {json.dumps(route.by)} picks among [teachers.NAME] tables, and none is given")
        for name in ("env", "default"):
            if getattr(route, name):
                raise ConfigError(f"{key}.{name}: only used with [teachers.NAME] tables")
        return
    if cfg.teacher != TeacherConfig():
        raise ConfigError("teacher: both [teacher] and [teachers.NAME] are given; with named teachers put each one's "
                          "keys in its [teachers.NAME] table (a single teacher needs only [teacher])")
    names = list(cfg.teachers)
    known = f"(teachers: {', '.join(names)})"
    for name in names:
        if not _TEACHER_NAME.fullmatch(name):
            raise ConfigError(f"teachers.{json.dumps(name)}: a teacher's name is letters, digits, _ and - "
                              "(it names the metrics teacher/NAME/...)")
    if route.default and route.default not in cfg.teachers:
        raise ConfigError(f"{key}.default: unknown teacher {json.dumps(route.default)} {known}")
    if route.by == "env" and not route.env:
        raise ConfigError(f'{key}.env: by = "env" needs a table of environment = "teacher" entries')
    if route.by != "env" and route.env:
        raise ConfigError(f'{key}.env: only used with {key}.by = "env"')
    envs = [oc.environment, *oc.continual.core_environments]
    for env, name in route.env.items():
        if env not in envs:
            raise ConfigError(f"{key}.env.{env}: {json.dumps(env)} is not an environment of this run "
                              f"(orchestrator.environment and continual.core_environments: {', '.join(envs)})")
        if name not in cfg.teachers:
            raise ConfigError(f"{key}.env.{env}: unknown teacher {json.dumps(name)} {known}")
    if route.by == "column" and not oc.dataset.path:
        raise ConfigError(f'{key}.by: "column" reads the "teacher" field of orchestrator.dataset.path rows, and no '
                          "dataset is given")
    if len(names) > 1 and oc.workflow != "distill":
        raise ConfigError(f"orchestrator.workflow: {json.dumps(oc.workflow)} asks one teacher; several [teachers.NAME] "
                          "route the scoring of rollouts (workflow = \"distill\")")
    for name in names:  # each teacher's own keys, checked as [teacher]'s are, named by its table
        view = teacher_view(cfg, name)
        try:
            tc = view.teacher
            if tc.gpu_ids and len(tc.gpu_ids) % tc.parallel.tp:
                raise ConfigError(f"teacher.parallel.tp: {tc.parallel.tp} does not divide the {len(tc.gpu_ids)} ids "
                                  "in teacher.gpu_ids")
            if tc.gpu_ids and tc.parallel.dp and tc.parallel.dp * tc.parallel.tp != len(tc.gpu_ids):
                raise ConfigError(f"teacher.parallel.dp: dp*tp = {tc.parallel.dp * tc.parallel.tp} must equal the "
                                  f"{len(tc.gpu_ids)} ids in teacher.gpu_ids")
            if not tc.gpu_ids and tc.parallel.tp > 1:
                raise ConfigError("teacher.parallel.tp: tensor parallelism needs GPU ids (teacher.gpu_ids is empty)")
            _validate_endpoint(view)
            _validate_sft(view)
        except ConfigError as e:
            raise ConfigError(re.sub(r"\bteacher\.", f"teachers.{name}.", str(e))) from None


def validate(cfg: Config) -> None:
    """Cross-field rules that a type cannot express."""
    _validate_ray_address(cfg.ray_address)
    _validate_gpu_ids(cfg)
    for role, sec in (("inference", cfg.inference), ("teacher", cfg.teacher)):
        ids, par = sec.gpu_ids, sec.parallel
        if ids and len(ids) % par.tp:
            raise ConfigError(f"{role}.parallel.tp: {par.tp} does not divide the {len(ids)} ids in {role}.gpu_ids")
        if ids and par.dp and par.dp * par.tp != len(ids):
            raise ConfigError(
                f"{role}.parallel.dp: dp*tp = {par.dp * par.tp} must equal the {len(ids)} ids in {role}.gpu_ids"
            )
        if not ids and par.tp > 1:
            raise ConfigError(f"{role}.parallel.tp: tensor parallelism needs GPU ids ({role}.gpu_ids is empty)")
    lc = cfg.trainer.loss
    if lc.mask_ratio_low >= lc.mask_ratio_high:
        raise ConfigError("trainer.loss.mask_ratio_low: must be below trainer.loss.mask_ratio_high")
    if lc.kl_level == "sequence" and lc.kl_discount:
        raise ConfigError('trainer.loss.kl_discount: only applies to trainer.loss.kl_level = "token"')
    if cfg.orchestrator.skip_verification:
        for key in ("adv_tau", "lockin_coef", "corrective_coef"):  # each needs the task reward
            if getattr(lc, key):
                raise ConfigError(f"trainer.loss.{key}: must be 0 when orchestrator.skip_verification is true")
    _validate_sft(cfg)
    if cfg.inference.max_tokens >= cfg.model.max_model_len:
        raise ConfigError(
            f"inference.max_tokens: {cfg.inference.max_tokens} leaves no room for a prompt in "
            f"model.max_model_len = {cfg.model.max_model_len}"
        )
    tm = cfg.orchestrator.teacher_model
    if tm.context_mode == "fewshot" and not tm.context_messages:
        raise ConfigError("orchestrator.teacher_model.context_messages: context_mode = \"fewshot\" needs at least one message")
    if tm.context_mode != "fewshot" and tm.context_messages:
        raise ConfigError("orchestrator.teacher_model.context_messages: only used with context_mode = \"fewshot\"")
    if tm.context_mode in ("system", "fewshot") and cfg.model.chat_template == "off":
        raise ConfigError(f"orchestrator.teacher_model.context_mode: {tm.context_mode!r} needs model.chat_template on")
    _validate_judge_comparator(cfg)
    _validate_endpoint(cfg)
    _validate_topk(cfg)
    _validate_teachers(cfg)
    _validate_env_args(cfg)
    _validate_finetune(cfg)
    _validate_vocabulary(cfg)
    if not cfg.output_dir.strip():
        raise ConfigError("output_dir: must not be empty")


def to_toml(cfg: Config) -> str:
    data = msgspec.to_builtins(cfg)
    data.pop("dry_run", None)
    data.pop("resume", None)  # how this launch started, not what the run is
    return tomli_w.dumps(data)
