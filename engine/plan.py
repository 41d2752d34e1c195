"""Will it fit? Per-rank weights, KV cache and decode collectives of a parallel layout.

Pure arithmetic on a `ModelConfig` (no tensors): `plan_layout` is what `serve` calls
before loading anything, `python -m engine plan` prints the same `Plan`. The layout rules
are the engine's own (Megatron-LM's column/row split for attention and MLPs, vocabulary
split for embedding and head, SGLang's data-parallel attention beside expert-parallel MoE):

- attention heads, dense MLP and shared experts split over the `tp` ranks of a DP group;
- routed experts split over all `tp * dp` ranks: whole experts with expert parallelism,
  otherwise every expert's intermediate dimension;
- vocabulary rows split over `tp`, ceil(V / tp) each; router and norms replicated;
- the MLA latent cache (L x (C + R) per token) replicated on the TP ranks of a DP group,
  each DP group caching its own sequences.

The budget is `memory x utilization`; the rest of the device is left for activations,
CUDA graphs and communication buffers, which this plan does not count.
Multi-token-prediction layers are not loaded and not counted.

Legend: L = layers, K = dense layers (first_k_dense_replace), D = hidden, H = heads,
Q = q_lora_rank, C = kv_lora_rank, R = qk_rope_head_dim, Dn = qk_nope_head_dim,
Dv = v_head_dim, E = routed experts, I = moe_intermediate_size, S = shared experts,
F = intermediate_size, V = vocabulary, b = bytes per value of the serving dtype.
"""

from __future__ import annotations

import argparse
import enum
import json
from dataclasses import dataclass, fields
from pathlib import Path

from engine.model.config import CheckpointError, ModelConfig

GIB = 1 << 30
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
KV_CACHE_DTYPE_BYTES = {"auto": 0, "fp8_e4m3": 1}  # 0: the serving dtype
ROUTER_BYTES = 4  # the router's weight and correction bias are fp32 whatever the serving dtype
ROUTING_BYTES_PER_CHOICE = 4 + 8  # fp32 weight + int64 expert id per token and choice


@dataclass(frozen=True)
class Layout:
    """How the world's `tp * dp` ranks (one per device) share the model."""

    tp: int = 1  # tensor-parallel size: one DP group's ranks
    dp: int = 1  # data-parallel attention groups
    ep: bool = False  # expert parallelism: whole routed experts per rank

    def __post_init__(self) -> None:
        for flag, value in (("--tensor-parallel-size", self.tp), ("--data-parallel-size", self.dp)):
            if not isinstance(value, int) or value < 1:
                raise CheckpointError(f"{flag} must be a positive integer, got {value}")

    @property
    def world(self) -> int:
        return self.tp * self.dp

    def describe(self) -> str:
        ep = ", expert parallel" if self.ep else ""
        return f"TP={self.tp} x DP={self.dp} = {self.world} rank{'s' * (self.world > 1)}{ep}"


@dataclass(frozen=True)
class FP4Format:
    """Bytes of an FP4 weight format as the engine keeps it resident (kernels/fp4.py):
    two values per byte, one scale byte per `block` values (rows padded to a whole block),
    and `global_scale_bytes` per expert and matrix."""

    name: str
    block: int
    global_scale_bytes: int

    def matrix_bytes(self, rows: int, cols: int) -> int:
        padded = -(-cols // self.block) * self.block
        return rows * (padded // 2 + padded // self.block) + self.global_scale_bytes

    def expert_bytes(self, inter: int, hidden: int) -> int:
        """One expert: w13 [2I, D] and w2 [D, I]."""
        return self.matrix_bytes(2 * inter, hidden) + self.matrix_bytes(hidden, inter)


NVFP4 = FP4Format("nvfp4", 16, 4)  # e4m3 scale per 16, fp32 global scale (weight_scale_2)
MXFP4 = FP4Format("mxfp4", 32, 0)  # e8m0 scale per 32 (OCP MX v1.0)


@dataclass(frozen=True)
class FP8Format:
    """DeepSeek's block FP8 as the engine keeps an FP8 checkpoint's routed experts
    (kernels/fp8.py): one byte per value and one fp32 scale per `block` (rows x columns),
    gate and up each on their own block rows."""

    block: tuple[int, int]
    name: str = "fp8"

    def expert_bytes(self, inter: int, hidden: int) -> int:
        """One expert: w13 [2I, D] (gate and up, I rows each) and w2 [D, I]."""
        bn, bk = self.block
        scales = 2 * -(-inter // bn) * -(-hidden // bk) + -(-hidden // bn) * -(-inter // bk)
        return 3 * inter * hidden + 4 * scales


ExpertFormat = FP4Format | FP8Format


@dataclass(frozen=True)
class WeightBytes:
    """Weight bytes resident on one rank, by kind."""

    attention: int  # MLA projections and its norms, plus each layer's two RMSNorms
    mla_absorbed: int  # fp32 copies of kv_b_proj for the absorbed and naive forms (MLA.absorb_weights)
    dense_mlp: int
    shared_experts: int
    routed_experts: int  # packed values, block scales and global scales when FP4 or FP8
    router: int  # fp32 gate weight [E, D] and correction bias [E] per MoE layer
    embedding: int  # embedding, LM head and final norm

    LABELS = {"attention": "attention", "mla_absorbed": "MLA absorbed (fp32)", "dense_mlp": "dense MLP", "shared_experts": "shared experts",
              "routed_experts": "routed experts", "router": "router (fp32)",
              "embedding": "embedding + head + norm"}

    def items(self) -> list[tuple[str, int]]:
        return [(self.LABELS[f.name], getattr(self, f.name)) for f in fields(self)]

    @property
    def total(self) -> int:
        return sum(b for _, b in self.items())


class MoEForm(enum.Enum):
    """How the MoE layers move tokens between ranks; only expert parallelism can use all-to-all."""

    ALL_GATHER = "all-gather"
    ALL_TO_ALL = "all-to-all"


@dataclass(frozen=True)
class Collective:
    """One collective of a decode step: per decoded token (one on every DP rank), the bytes
    one rank sends under the ring algorithm."""

    name: str
    ranks: int
    calls: int  # per decoded token
    bytes_per_call: float
    form: MoEForm | None = None  # None: in every step; otherwise only in that MoE form

    @property
    def bytes(self) -> float:
        return self.calls * self.bytes_per_call


@dataclass(frozen=True)
class Plan:
    """The per-rank figures of one model on one layout, and whether they fit."""

    cfg: ModelConfig
    layout: Layout
    dtype: str
    expert_format: str  # the serving dtype, or the format the routed experts are held in (fp8, nvfp4, mxfp4)
    memory_gib: float
    utilization: float
    weights: WeightBytes
    kv_bytes_per_token: int  # per rank
    kv_budget: int  # bytes per rank the cache may take
    kv_needed: int  # bytes per rank that must fit beside the weights
    kv_explicit: bool  # kv_budget is --kv-cache-memory, not what the weights leave
    max_model_len: int
    collectives: tuple[Collective, ...]

    @property
    def budget(self) -> int:
        """Bytes per rank for weights and KV cache: memory x utilization."""
        return _budget(self.memory_gib, self.utilization)

    @property
    def tokens_per_dp_rank(self) -> int:
        return max(self.kv_budget, 0) // self.kv_bytes_per_token

    @property
    def total_tokens(self) -> int:
        return self.tokens_per_dp_rank * self.layout.dp

    @property
    def fits(self) -> bool:
        """The weights and one full context (or the --kv-cache-memory asked for) fit the budget."""
        return self.weights.total + self.kv_needed <= self.budget and self.tokens_per_dp_rank >= self.max_model_len

    @property
    def reason(self) -> str:
        """One line: the numbers, and when it does not fit, the flag to change."""
        numbers = (f"weights {gib(self.weights.total)} GiB + KV cache {gib(self.kv_needed)} GiB per rank "
                   f"{{}} the budget {gib(self.budget)} GiB")
        if self.weights.total + self.kv_needed > self.budget:
            return f"does not fit: {numbers.format('exceed')}: {self._fix()}"
        if self.tokens_per_dp_rank < self.max_model_len:
            return (f"does not fit: --kv-cache-memory {gib(self.kv_budget)} GiB holds {self.tokens_per_dp_rank:,} "
                    f"tokens, less than one --max-model-len context ({self.max_model_len:,} tokens): "
                    f"raise it or lower --max-model-len")
        return f"fits: {numbers.format('within')}, {self.tokens_per_dp_rank:,} tokens per DP rank"

    def _fix(self) -> str:
        if self.weights.total > self.budget:
            ranks = "add ranks (--tensor-parallel-size / --data-parallel-size)"
            if self.expert_format in (NVFP4.name, MXFP4.name):  # the experts are FP4 already
                return ranks
            return f"{ranks} or quantize the routed experts (--quantization nvfp4)"
        if self.kv_explicit:
            return "lower --kv-cache-memory"
        return (f"lower --max-model-len ({self.max_model_len:,} tokens need {gib(self.kv_needed)} GiB) "
                f"or add ranks")

    def forms(self) -> list[MoEForm]:
        return [MoEForm.ALL_GATHER] + ([MoEForm.ALL_TO_ALL] if self.layout.ep else [])

    def collective_bytes(self, form: MoEForm = MoEForm.ALL_GATHER) -> float:
        return sum(c.bytes for c in self.collectives if c.form in (None, form))

    def format(self) -> str:
        """The human table: model, layout, weights by kind, KV cache, collectives, verdict."""
        return "\n".join(_header(self) + _weight_rows(self) + _kv_rows(self) + _collective_rows(self)
                         + [f"verdict: {self.reason}"])


def plan_layout(cfg: ModelConfig, layout: Layout, memory_gib: float, *, utilization: float = 0.9,
                dtype: str = "bfloat16", quantization: str | None = None, max_model_len: int | None = None,
                kv_cache_gib: float | None = None, kv_cache_dtype: str = "auto", device: str = "cuda") -> Plan:
    """The plan of `cfg` served on `layout`, with `memory_gib` GiB per device.

    dtype: the serving dtype (an FP8 checkpoint's linears other than the routed experts are
    dequantized to it); quantization: the `--quantization` value (None, "nvfp4" or "mxfp4";
    an NVFP4 checkpoint's experts are NVFP4 regardless, an FP8 checkpoint's stay FP8 unless
    it asks for FP4); max_model_len: None for the model's own; kv_cache_gib: the cache per rank,
    default whatever the budget leaves after the weights; kv_cache_dtype: "auto" (the serving
    dtype) or "fp8_e4m3" (one byte per value); device: "cuda" or "cpu" (on the CPU, MLA keeps
    fp32 copies of kv_b_proj for its two forms; on GPUs it reads kv_b_proj itself).
    Raises CheckpointError naming the flag when an argument or the layout is invalid."""
    b = _check_args(cfg, memory_gib, utilization, dtype, max_model_len, kv_cache_gib)
    _check_layout(cfg, layout)
    experts = _expert_format(cfg, quantization)
    _check_expert_split(cfg, layout, experts)
    weights = weight_bytes(cfg, layout, b, experts, absorbed_fp32=device == "cpu")
    if kv_cache_dtype not in KV_CACHE_DTYPE_BYTES:
        raise CheckpointError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPE_BYTES)}, "
                              f"got {kv_cache_dtype!r}")
    per_token = cfg.num_hidden_layers * cfg.kv_cache_dim * (KV_CACHE_DTYPE_BYTES[kv_cache_dtype] or b)
    max_model_len = max_model_len or cfg.max_position_embeddings
    kv_budget = int(kv_cache_gib * GIB) if kv_cache_gib is not None else _budget(memory_gib, utilization) - weights.total
    kv_needed = int(kv_cache_gib * GIB) if kv_cache_gib is not None else max_model_len * per_token
    return Plan(cfg, layout, dtype, experts.name if experts else dtype, memory_gib, utilization, weights, per_token,
                kv_budget, kv_needed, kv_cache_gib is not None, max_model_len, collectives(cfg, layout, b))


def _budget(memory_gib: float, utilization: float) -> int:
    return int(memory_gib * utilization * GIB)


def _check_args(cfg: ModelConfig, memory_gib: float, utilization: float, dtype: str,
                max_model_len: int | None, kv_cache_gib: float | None) -> int:
    """The bytes per value of `dtype`, once every argument is valid."""
    if dtype not in DTYPE_BYTES:
        raise CheckpointError(f"--dtype {dtype!r} is not supported (choose {', '.join(DTYPE_BYTES)})")
    if not memory_gib > 0:
        raise CheckpointError(f"--gpu-memory-gib must be positive, got {memory_gib}")
    if not 0 < utilization <= 1:
        raise CheckpointError(f"--gpu-memory-utilization must be in (0, 1], got {utilization}")
    if max_model_len is not None and not 1 <= max_model_len <= cfg.max_position_embeddings:
        raise CheckpointError(f"--max-model-len must be between 1 and the model's max_position_embeddings "
                              f"({cfg.max_position_embeddings}), got {max_model_len}")
    if kv_cache_gib is not None and not kv_cache_gib > 0:
        raise CheckpointError(f"--kv-cache-memory must be positive, got {kv_cache_gib}")
    return DTYPE_BYTES[dtype]


def _check_layout(cfg: ModelConfig, layout: Layout) -> None:
    tp, world = layout.tp, layout.world
    if cfg.num_attention_heads % tp:
        raise CheckpointError(f"--tensor-parallel-size {tp} does not divide the model's "
                              f"{cfg.num_attention_heads} attention heads")
    has_moe = cfg.num_hidden_layers > cfg.first_k_dense_replace
    if has_moe and layout.ep and cfg.n_routed_experts % world:
        raise CheckpointError(f"--enable-expert-parallel: {cfg.n_routed_experts} routed experts do not split "
                              f"evenly over {world} ranks (tensor x data parallel size)")
    if has_moe and not layout.ep and cfg.moe_intermediate_size % world:
        raise CheckpointError(f"--tensor-parallel-size x --data-parallel-size = {world} ranks do not divide the "
                              f"experts' moe_intermediate_size {cfg.moe_intermediate_size} "
                              f"(--enable-expert-parallel splits whole experts instead)")
    if cfg.first_k_dense_replace and cfg.intermediate_size % tp:
        raise CheckpointError(f"--tensor-parallel-size {tp} does not divide the dense MLP's "
                              f"intermediate_size {cfg.intermediate_size}")
    shared = cfg.moe_intermediate_size * cfg.n_shared_experts
    if has_moe and shared % tp:
        raise CheckpointError(f"--tensor-parallel-size {tp} does not divide the shared experts' "
                              f"intermediate size {shared}")


def _expert_format(cfg: ModelConfig, quantization: str | None) -> ExpertFormat | None:
    """The routed experts' format as loaded; None: the serving dtype."""
    if cfg.nvfp4_checkpoint:
        return NVFP4
    from engine.model.fp4_experts import ExpertQuantization  # imports torch: only when asked

    q = ExpertQuantization.parse(quantization)
    if q is None and cfg.fp8_checkpoint:
        return FP8Format(cfg.weight_block_size)
    return {None: None, ExpertQuantization.NVFP4: NVFP4, ExpertQuantization.MXFP4: MXFP4}[q]


def _check_expert_split(cfg: ModelConfig, layout: Layout, experts: ExpertFormat | None) -> None:
    """FP8 experts split along their intermediate size must keep whole scale blocks per rank
    (as RoutedExperts requires)."""
    inter = cfg.moe_intermediate_size // layout.world
    if isinstance(experts, FP8Format) and not layout.ep and layout.world > 1 and (
            inter % experts.block[0] or inter % experts.block[1]):
        raise CheckpointError(f"FP8 experts split over {layout.world} ranks leave {inter} of their intermediate "
                              f"size per rank, not a whole number of the checkpoint's {experts.block[0]} x "
                              f"{experts.block[1]} scale blocks: use --enable-expert-parallel (or --quantization "
                              f"nvfp4)")


def weight_bytes(cfg: ModelConfig, layout: Layout, b: int, experts: ExpertFormat | None,
                 absorbed_fp32: bool = False) -> WeightBytes:
    """Weight bytes on one rank of `layout`, values of `b` bytes, routed experts in `experts`
    (None: the serving dtype); absorbed_fp32: MLA keeps fp32 copies of kv_b_proj (the CPU)."""
    tp, d, k = layout.tp, cfg.hidden_size, cfg.first_k_dense_replace
    moe_layers = cfg.num_hidden_layers - k
    rows = -(-cfg.vocab_size // tp)
    return WeightBytes(
        attention=cfg.num_hidden_layers * _attention_values(cfg, tp) * b,
        # W_kv_b [H, Dn + Dv, C], and W_UK [H, Dn, C] beside W_UV^T [H, C, Dv]: twice kv_b_proj, in fp32
        mla_absorbed=absorbed_fp32 * cfg.num_hidden_layers * 2 * (cfg.num_attention_heads // tp)
        * (cfg.qk_nope_head_dim + cfg.v_head_dim) * cfg.kv_lora_rank * 4,
        dense_mlp=k * 3 * d * (cfg.intermediate_size // tp) * b,
        shared_experts=moe_layers * 3 * d * (cfg.moe_intermediate_size * cfg.n_shared_experts // tp) * b,
        routed_experts=moe_layers * _routed_expert_bytes(cfg, layout, b, experts),
        router=moe_layers * (cfg.n_routed_experts * d + cfg.n_routed_experts) * ROUTER_BYTES,
        embedding=(2 * rows * d + d) * b)


def _attention_values(cfg: ModelConfig, tp: int) -> int:
    """Values of one layer's attention on one rank, with the layer's two RMSNorms."""
    d, q, c, r = cfg.hidden_size, cfg.q_lora_rank or 0, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    h = cfg.num_attention_heads // tp
    replicated = (q + c + r) * d + q + c + 2 * d  # fused q_a/kv_a projection; q_a, kv_a, input, post norms
    q_up = h * cfg.qk_head_dim * (q or d)  # q_b_proj from the LoRA rank, or q_proj from the hidden state
    return replicated + q_up + h * (cfg.qk_nope_head_dim + cfg.v_head_dim) * c + d * h * cfg.v_head_dim


def _routed_expert_bytes(cfg: ModelConfig, layout: Layout, b: int, fmt: ExpertFormat | None) -> int:
    """One MoE layer's routed experts on one rank: w13 [E_r, 2 I_r, D] and w2 [E_r, D, I_r]."""
    experts, inter = cfg.n_routed_experts, cfg.moe_intermediate_size
    if layout.ep:
        experts //= layout.world
    else:
        inter //= layout.world
    d = cfg.hidden_size
    if fmt is None:
        return experts * 3 * d * inter * b
    return experts * fmt.expert_bytes(inter, d)


def collectives(cfg: ModelConfig, layout: Layout, b: int) -> tuple[Collective, ...]:
    """The collectives of one decode step (ring algorithms): an all-reduce of S bytes over n
    ranks sends 2(n-1)/n S per rank, an all-gather or reduce-scatter of S per rank (n-1) S."""
    tp, dp, world = layout.tp, layout.dp, layout.world
    row, moe = cfg.hidden_size * b, cfg.num_hidden_layers - cfg.first_k_dense_replace
    top_k = cfg.num_experts_per_tok
    all_reduce = 2 * (tp - 1) / tp * row
    out = []
    if tp > 1:
        out.append(Collective("attention o_proj all-reduce (TP)", tp, cfg.num_hidden_layers, all_reduce))
        if cfg.first_k_dense_replace:
            out.append(Collective("dense MLP all-reduce (TP)", tp, cfg.first_k_dense_replace, all_reduce))
    if dp > 1 and moe:
        dispatch = (dp - 1) * (row + top_k * ROUTING_BYTES_PER_CHOICE)
        out.append(Collective("MoE dispatch all-gather (DP)", dp, moe, dispatch, MoEForm.ALL_GATHER))
        out.append(Collective("MoE combine reduce-scatter (DP)", dp, moe, (dp - 1) * row, MoEForm.ALL_GATHER))
    if layout.ep and world > 1 and moe:
        a2a = 2 * min(top_k, world - 1) * row
        out.append(Collective("MoE dispatch + combine all-to-all", world, moe, a2a, MoEForm.ALL_TO_ALL))
    if tp > 1 and moe:
        out.append(Collective("MoE all-reduce (TP)", tp, moe, all_reduce))
    if tp > 1:
        out.append(Collective("logits all-gather (TP, fp32)", tp, 1, (tp - 1) * -(-cfg.vocab_size // tp) * 4))
    return tuple(out)


def _header(plan: Plan) -> list[str]:
    c = plan.cfg
    k, experts = c.first_k_dense_replace, plan.expert_format
    dequantized = " (FP8 checkpoint: the other linears dequantized at load)" if c.fp8_checkpoint else ""
    return [f"model: {c.num_hidden_layers} layers ({k} dense, {c.num_hidden_layers - k} MoE), "
            f"{c.n_routed_experts} routed experts (top {c.num_experts_per_tok}), hidden {c.hidden_size}, "
            f"vocab {c.vocab_size}",
            f"layout: {plan.layout.describe()}; {plan.dtype}{dequantized}, routed experts {experts}",
            f"budget per rank: {plan.memory_gib:g} GiB x {plan.utilization:g} = {gib(plan.budget)} GiB"]


def _weight_rows(plan: Plan) -> list[str]:
    rows = [f"  {label:<26}{gib(n):>10}" for label, n in plan.weights.items()]
    return ["weights per rank                 GiB", *rows, f"  {'total':<26}{gib(plan.weights.total):>10}"]


def _kv_rows(plan: Plan) -> list[str]:
    p = plan
    head = f"KV cache: {p.kv_bytes_per_token:,} bytes per token per rank; "
    if p.kv_budget <= 0:
        head += "no memory left for it"
    else:
        head += (f"{gib(p.kv_budget)} GiB per rank holds {p.tokens_per_dp_rank:,} tokens per DP rank, "
                 f"{p.total_tokens:,} in all")
    context = p.max_model_len * p.kv_bytes_per_token
    return [head, f"  one context (--max-model-len {p.max_model_len:,} tokens): {gib(context)} GiB"]


def _collective_rows(plan: Plan) -> list[str]:
    rows = ["collectives per decoded token, bytes sent per rank (ring)"]
    for c in plan.collectives:
        form = f" [{c.form.value} form]" if c.form else ""
        rows.append(f"  {c.name + form:<52} {c.ranks:>3} ranks {c.calls:>3} x {c.bytes_per_call:>10,.0f} "
                    f"= {c.bytes:>12,.0f}")
    if not plan.collectives:
        rows.append("  none (one rank)")
    for form in plan.forms():
        label = f"total, MoE {form.value} form" if plan.layout.ep else "total"
        rows.append(f"  {label:<52} {'':>28} {plan.collective_bytes(form):>12,.0f}")
    return rows


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `python -m engine plan`."""
    p.add_argument("--model", type=Path, required=True, metavar="DIR_OR_CONFIG",
                   help="a checkpoint directory, or its config.json")
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N")
    p.add_argument("--data-parallel-size", type=int, default=1, metavar="M", help="data-parallel attention groups")
    p.add_argument("--enable-expert-parallel", action="store_true", help="whole routed experts per rank")
    # No argparse `choices`: an unknown value is bad input like any other (one error line, exit 2).
    p.add_argument("--quantization", default=None, metavar="{nvfp4,mxfp4}",
                   help="routed experts quantized to FP4 at load (an NVFP4 checkpoint's are regardless; "
                        "an FP8 checkpoint's stay FP8 without it)")
    p.add_argument("--dtype", default="bfloat16", metavar="{bfloat16,float16,float32}",
                   help="the serving dtype (an FP8 checkpoint's linears other than the routed experts "
                        "are dequantized to it)")
    p.add_argument("--gpu-memory-gib", type=float, default=141.0, metavar="G", help="memory per device (H200: 141)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, metavar="F",
                   help="the share of G the weights and KV cache may take")
    p.add_argument("--max-model-len", type=int, default=None, metavar="N",
                   help="context length one sequence must fit (default: the model's)")
    p.add_argument("--kv-cache-memory", type=float, default=None, metavar="GIB",
                   help="KV cache per rank (default: what the budget leaves after the weights)")
    p.add_argument("--kv-cache-dtype", default="auto", metavar="{auto,fp8_e4m3}",
                   help="the latent cache's dtype (auto: the serving dtype)")


def run_plan(args: argparse.Namespace) -> int:
    """Prints the plan; 0 when it fits, 1 when it does not. Bad input raises CheckpointError."""
    layout = Layout(args.tensor_parallel_size, args.data_parallel_size, args.enable_expert_parallel)
    plan = plan_layout(read_config(args.model), layout, args.gpu_memory_gib,
                       utilization=args.gpu_memory_utilization, dtype=args.dtype, quantization=args.quantization,
                       max_model_len=args.max_model_len, kv_cache_gib=args.kv_cache_memory,
                       kv_cache_dtype=args.kv_cache_dtype)
    print(plan.format())
    return 0 if plan.fits else 1


def read_config(path: Path) -> ModelConfig:
    """A checkpoint directory (with its hf_quant_config.json) or a bare config.json."""
    path = Path(path)
    if path.is_dir():
        return ModelConfig.from_dir(path)
    if not path.is_file():
        raise CheckpointError(f"--model {path}: no such checkpoint directory or config file")
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"--model {path}: invalid JSON ({exc})") from None
