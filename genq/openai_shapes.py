"""OpenAI's response shapes for finished text jobs: what the OpenAI-compatible
routes (api/openai_compat.py) answer and what a batch's result file holds
(genq.batches), from the same jobs."""
from __future__ import annotations

from typing import Sequence

from genq.schema import Job


def usage(jobs: Sequence[Job]) -> dict:
    """Token counts: the prompt once (every choice has the same), the completions summed."""
    prompt = max((j.output or {}).get("prompt_tokens", 0) for j in jobs)
    completion = sum((j.output or {}).get("tokens", 0) for j in jobs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_body(kind: str, jobs: Sequence[Job], model: str) -> dict:
    """A completion ("completion") or chat completion ("chat") of succeeded jobs, one choice each."""
    created = int(jobs[0].created_at.timestamp())
    if kind == "completion":
        choices = [{"text": j.output["text"], "index": k, "logprobs": None,
                    "finish_reason": j.output.get("finish_reason")} for k, j in enumerate(jobs)]
        return {"id": f"cmpl-{jobs[0].id}", "object": "text_completion", "created": created, "model": model,
                "choices": choices, "usage": usage(jobs)}
    choices = [{"index": k, "message": {"role": "assistant", "content": j.output["text"]}, "logprobs": None,
                "finish_reason": j.output.get("finish_reason")} for k, j in enumerate(jobs)]
    return {"id": f"chatcmpl-{jobs[0].id}", "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage(jobs), "system_fingerprint": None}
