"""Run by tests/test_teacher_scoring.py in a process of its own (an in-process vLLM engine sets up torch's
process group and threads): scores a fixed batch on the tiny teacher with vLLM's own prompt log-probs and with
teacher/prompt_logprobs.py's batched ones, on one engine whose small token budget splits prompts over steps
(chunked prefill), and prints the results as JSON."""

import json
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.engines import LOGPROBS_FROM, completion_logprobs, completion_topk, engine_env, make_llm  # noqa: E402

os.environ.update(engine_env(1, cpu=True))

from teacher import prompt_logprobs as tp  # noqa: E402


def main(teacher: str) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    # 24 tokens a step: most prompts (9..40 tokens with their completions) are prefilled over several steps
    llm = make_llm(teacher, dtype="float32", max_model_len=64, seed=0,
                   extra={"max_num_batched_tokens": 24, "max_num_seqs": 8, "max_logprobs": 5})
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, 60) for _ in range(rng.randrange(4, 24))] for _ in range(20)]
    completions = [[rng.randrange(3, 60) for _ in range(rng.randrange(1, 16))] for _ in range(20)]

    def whole_rows():  # every row of prompt_logprobs, asked without the key
        outs = llm.generate([TokensPrompt(prompt_token_ids=p + c) for p, c in zip(prompts, completions)],
                            SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False), use_tqdm=False)
        return [[None if e is None else [[int(t), float(x.logprob)] for t, x in e.items()]
                 for e in o.prompt_logprobs] for o in outs]

    def score():
        lps, ids, tops = completion_topk(llm, prompts, completions, 3)
        return {"logprobs": completion_logprobs(llm, prompts, completions), "topk_logprobs": lps, "topk_ids": ids,
                "topk_top": tops}

    result = {"prompts": prompts, "completions": completions, "own": score(), "own_whole": whole_rows()}
    result["install"] = tp.install(llm)
    result["batched"] = score()
    result["rows_scored"] = llm.collective_rpc(tp.rows_computed)[0]
    result["batched_whole"] = whole_rows()
    result["rows_total"] = llm.collective_rpc(tp.rows_computed)[0]
    result["key"] = LOGPROBS_FROM
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
