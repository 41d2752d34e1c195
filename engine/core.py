"""The engine's step loop body: schedule, forward, sample, turn tokens into output deltas.

`EngineCore` is single-threaded and synchronous; `AsyncEngine` runs it on its own thread
and connects it to asyncio. Requests are validated in `check` before they reach the loop,
so a bad request never disturbs the others.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import torch

from engine.cuda_graphs import cuda_graph_config
from engine.errors import InvalidRequest, OutOfMemory
from engine.kv_manager import KVCacheManager
from engine.model import DeepseekV3ForCausalLM
from engine.request import ChoiceDelta, EngineRequest, RequestOutput, RequestTimings, Usage
from engine.runner import ModelRunner, StepInputs
from engine.sampler import Sampler, SamplingRow
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from engine.sequence import FinishReason, Sequence, SeqStatus
from engine.text.logprobs import LogprobFormatter
from engine.text.pipeline import TextPipeline
from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_model_len: int
    num_blocks: int
    block_size: int = 16
    scheduler: SchedulerConfig = SchedulerConfig()
    enable_prefix_caching: bool = True
    cuda_graphs: bool = True  # decode steps replay CUDA graphs where the model runs on CUDA and can be recorded

    def __post_init__(self) -> None:
        if self.max_model_len < 2 or self.block_size < 1 or self.num_blocks < 1:
            raise ValueError("max_model_len >= 2, block_size >= 1 and num_blocks >= 1 are required")

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size


def check_request(req: EngineRequest, config: EngineConfig, vocab_size: int) -> int:
    """Validates req against the model and cache; returns its effective max_tokens.

    Pure, so the serving front end can refuse a bad request before it reaches the loop.
    """
    n_prompt, limit = len(req.prompt_ids), config.max_model_len
    if not n_prompt:
        raise InvalidRequest("prompt", "the prompt is empty")
    if n_prompt >= limit:
        raise InvalidRequest("prompt", f"the prompt has {n_prompt} tokens; the context holds {limit}, "
                                       "and at least one must be left to generate")
    bad = [t for t in req.prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequest("token_ids", f"token id {bad[0]} is outside the vocabulary (size {vocab_size})")
    if any(not 0 <= t < vocab_size for t, _ in req.params.logit_bias):
        raise InvalidRequest("logit_bias", f"token ids must be in [0, {vocab_size})")
    max_tokens = req.params.max_tokens
    if max_tokens is None:
        max_tokens = limit - n_prompt
    elif n_prompt + max_tokens > limit:
        raise InvalidRequest("max_tokens", f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds "
                                           f"the context ({limit} tokens)")
    if -(-(n_prompt + max_tokens) // config.block_size) > config.num_blocks:
        raise InvalidRequest("max_tokens", f"prompt + max_tokens ({n_prompt + max_tokens}) exceeds the KV cache "
                                           f"({config.capacity_tokens} tokens)")
    return max_tokens


@dataclass(frozen=True)
class EngineStats:
    waiting: int
    running: int
    used_blocks: int


class _SeqState:
    """Per-choice output state: text pipeline, sampling row, reasoning count."""

    def __init__(self, seq: Sequence, req: EngineRequest, tokenizer: Tokenizer, think_ids: tuple[int, int]) -> None:
        p = req.params
        self.seq = seq
        self.text = TextPipeline(tokenizer, p.stop, req.reasoning_started, req.parse_reasoning, req.parse_tools,
                                 p.skip_special_tokens)
        # Choice i of a seeded request draws from the stream of seed + i, so choices differ
        # and each repeats; the row reads the sequence's own lists, preemption included.
        seed = None if p.seed is None else p.seed + seq.index
        self.row = SamplingRow(p, seed, seq.prompt_ids, seq.output_ids)
        self.in_reasoning = req.parse_reasoning and req.reasoning_started
        self.think_open, self.think_close = think_ids
        self.reasoning_tokens = 0

    def count_reasoning(self, token: int) -> None:
        if self.seq.output_ids == [token] and token == self.think_open and not self.in_reasoning:
            self.in_reasoning = True
        if self.in_reasoning:
            self.reasoning_tokens += 1
            self.in_reasoning = token != self.think_close


class EngineCore:
    def __init__(self, model: DeepseekV3ForCausalLM, tokenizer: Tokenizer, config: EngineConfig) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.kv = KVCacheManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv)
        # CUDA graphs record one process's work; over several ranks steps run eagerly for now
        graphs = cuda_graph_config(model, config.scheduler.max_num_seqs, config.max_model_len,
                                   config.block_size) if config.cuda_graphs and model.parallel.world_size == 1 else None
        self.runner = ModelRunner(model, self.kv, config.num_blocks, graphs)
        self.sampler = Sampler()
        self.logprobs = LogprobFormatter(tokenizer)
        self.requests: dict[str, tuple[EngineRequest, list[_SeqState]]] = {}
        self.timings: dict[str, RequestTimings] = {}
        self.arrivals = itertools.count()
        ids = (tokenizer.token_to_id("<think>"), tokenizer.token_to_id("</think>"))
        self.think_ids = (ids[0] if ids[0] is not None else -1, ids[1] if ids[1] is not None else -1)

    # -- admission ------------------------------------------------------------------

    def check(self, req: EngineRequest) -> int:
        return check_request(req, self.config, self.model.cfg.vocab_size)

    def add(self, req: EngineRequest) -> None:
        if req.request_id in self.requests:
            raise InvalidRequest("request_id", f"{req.request_id!r} is already running")
        max_tokens = self.check(req)
        arrival = next(self.arrivals)
        states = []
        for i in range(req.params.n):
            seq = Sequence(f"{req.request_id}/{i}", list(req.prompt_ids), req.params, max_tokens,
                           group=req.request_id, index=i, arrival=arrival)
            states.append(_SeqState(seq, req, self.tokenizer, self.think_ids))
            self.scheduler.add(seq)
        self.requests[req.request_id] = (req, states)
        self.timings[req.request_id] = RequestTimings(queued_ns=time.time_ns())

    def abort(self, request_id: str) -> RequestOutput | None:
        """Ends the request now, freeing its blocks; returns its final output (usage so far)."""
        if request_id not in self.requests:
            return None
        _, states = self.requests[request_id]
        deltas = []
        for st in states:
            if not st.seq.finished:
                self.scheduler.finish(st.seq, FinishReason.ABORT)
                deltas.append(ChoiceDelta(st.seq.index, finish_reason=FinishReason.ABORT))
        return self._finish_request(request_id, deltas)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # -- the step -------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        planned = self.plan_step()
        if planned is None:
            return []
        out, step = planned
        try:
            logits = self.runner.execute(step)
        except torch.OutOfMemoryError as exc:
            return [self._fail_largest(out, exc)]
        return self.complete_step(out, logits, step.sampled)

    def _fail_largest(self, out: SchedulerOutput, exc: Exception) -> RequestOutput:
        """After a step ran out of device memory: the request with the most tokens in it (the
        likeliest cause, a long prefill chunk) ends with the error. The others keep what
        earlier steps computed (this step's writes are redone) and run again at the next step."""
        seq, n = max(out.scheduled, key=lambda item: item[1])
        log.warning("step of %d tokens ran out of memory; ending request %s (%d of them): %s",
                    out.num_tokens, seq.group, n, str(exc).splitlines()[0] if str(exc) else exc)
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()
        result = self.abort(seq.group)
        result.error = OutOfMemory(f"the device ran out of memory in a step holding {n} tokens of this request; "
                                   "the other requests go on (a shorter prompt, or a smaller "
                                   "--max-num-batched-tokens, needs less)")
        return result

    def plan_step(self) -> tuple[SchedulerOutput, StepInputs] | None:
        """Schedules the next step and prepares its inputs; None when nothing can run."""
        out = self.scheduler.schedule()
        if not out.scheduled:
            return None
        self._time_scheduled(out.scheduled)
        return out, self.runner.prepare(out.scheduled)

    def complete_step(self, out: SchedulerOutput, logits, seqs: list[Sequence]) -> list[RequestOutput]:
        """After the forward of a planned step: samples `seqs` from logits [N, V] and turns
        the tokens into output deltas."""
        self.scheduler.on_step_done(out)
        if not seqs:
            return []
        states = [self._state(seq) for seq in seqs]
        samples = self.sampler(logits, [st.row for st in states])
        deltas: dict[str, list[ChoiceDelta]] = {}
        for i, st in enumerate(states):
            delta = self._append(st, samples.token_ids[i], self.logprobs.row(samples, i, st.row.params))
            deltas.setdefault(st.seq.group, []).append(delta)
        self._time_sampled(deltas)
        return [self._output(rid, ds) for rid, ds in deltas.items()]

    def _time_scheduled(self, scheduled: list[tuple[Sequence, int]]) -> None:
        now = time.time_ns()
        for seq, n in scheduled:
            t = self.timings[seq.group]
            t.scheduled_ns = t.scheduled_ns or now
            if seq.num_uncomputed > 1 or seq.num_computed_tokens < seq.num_prompt_tokens:
                t.prefill_tokens += n  # a prompt chunk or a recompute after preemption, not a decode

    def _time_sampled(self, deltas: dict[str, list[ChoiceDelta]]) -> None:
        now = time.time_ns()
        for rid in deltas:
            t = self.timings[rid]
            if t.first_token_ns:
                t.decode_steps += 1
            else:
                t.first_token_ns = now

    def _state(self, seq: Sequence) -> _SeqState:
        return self.requests[seq.group][1][seq.index]

    def _append(self, st: _SeqState, token: int, logprob) -> ChoiceDelta:
        seq, p = st.seq, st.seq.params
        seq.output_ids.append(token)
        st.count_reasoning(token)
        delta = ChoiceDelta(seq.index, token_ids=[token], logprobs=[logprob] if logprob else [])
        reason, matched = None, ""
        if token == self.tokenizer.eos_id and not p.ignore_eos:
            reason = FinishReason.STOP
        elif token in p.stop_token_ids:
            reason, matched = FinishReason.STOP, str(token)
        else:
            text, stopped = st.text.push([token])
            self._merge(delta, text)
            if stopped:
                reason, matched = FinishReason.STOP, st.text.matched_stop
            elif len(seq.output_ids) >= seq.max_tokens:
                reason = FinishReason.LENGTH
        if reason is not None:
            self._merge(delta, st.text.finish())
            if reason is FinishReason.STOP and st.text.tool_calls:
                reason = FinishReason.TOOL_CALLS
            delta.finish_reason, delta.matched_stop = reason, matched
            self.scheduler.finish(seq, reason)
        return delta

    @staticmethod
    def _merge(delta: ChoiceDelta, text) -> None:
        delta.text += text.content
        delta.reasoning += text.reasoning
        delta.tool_calls += text.tool_calls

    def _output(self, request_id: str, deltas: list[ChoiceDelta]) -> RequestOutput:
        req, states = self.requests[request_id]
        if all(st.seq.finished for st in states):
            return self._finish_request(request_id, deltas)
        return RequestOutput(request_id, deltas, prompt=self._prompt_usage(req, states))

    @staticmethod
    def _prompt_usage(req: EngineRequest, states: list[_SeqState]) -> tuple[int, int]:
        """(prompt tokens, of which served from the prefix cache at the first admission)."""
        return len(req.prompt_ids), max(states[0].seq.num_cached_prompt_tokens, 0)

    def _finish_request(self, request_id: str, deltas: list[ChoiceDelta]) -> RequestOutput:
        req, states = self.requests.pop(request_id)
        for st in states:
            self.sampler.release(st.row)  # its token-count slot, if penalized
        timings = self.timings.pop(request_id)
        timings.finished_ns = time.time_ns()
        prompt, cached = self._prompt_usage(req, states)
        usage = Usage(prompt_tokens=prompt, cached_prompt_tokens=cached,
                      completion_tokens=sum(len(st.seq.output_ids) for st in states),
                      reasoning_tokens=sum(st.reasoning_tokens for st in states))
        return RequestOutput(request_id, deltas, finished=True, usage=usage, prompt=(prompt, cached), timings=timings)

    def fail_all(self, error: Exception) -> list[RequestOutput]:
        """After an internal error: ends every request with that error, frees every block."""
        outputs = []
        for rid in list(self.requests):
            out = self.abort(rid)
            out.error = error
            outputs.append(out)
        return outputs

    def stats(self) -> EngineStats:
        return EngineStats(len(self.scheduler.waiting), len(self.scheduler.running),
                           self.config.num_blocks - self.kv.num_free_blocks)
