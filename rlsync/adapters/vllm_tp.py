"""Which slice of a full checkpoint tensor a tensor-parallel rank's vLLM layer holds.

Why here: under tensor parallelism every rank of a TP group is handed the same
full checkpoint tensors and its vLLM layers keep only their part. vLLM's weight
loaders cut that part out while they copy; rlsync needs the same cut in two
places where no vLLM loader runs:
- the `rlsync_fp8` arrival loaders quantize the rank's part of an arriving
  shard straight into kernel storage (`local_shard`, `local_expert_shard`);
- verify recomputes what each rank's kernel tensors must hold from the full
  tensors (`local_param`, `local_experts`).
The rules follow vLLM 0.32's loaders (`linear.py`, `vocab_parallel_embedding.py`,
`fused_moe/routed_experts.py`), keyed by layer type, read from each layer's own
attributes (`tp_rank`, `tp_size`, head counts, vocabulary shard indices):
- column parallel (and merged / QKV): the output rows, per fused shard; K / V
  heads replicated when the group has more ranks than KV heads;
- row parallel: the input columns of the weight; the bias whole;
- vocabulary parallel (embedding, LM head): the rank's vocabulary rows,
  zero-padded to the partition size;
- fused MoE experts: gate / up rows and down columns of the intermediate size;
- anything else (replicated linears, norms): the whole tensor.
At tensor parallel size 1 every rule is the identity (or the concatenation of
fused shards), so the same code serves every engine. The bf16 TP tests check
these rules against vLLM's own loaders bit for bit (verify after a sync).
"""

from __future__ import annotations

import torch

from rlsync.adapters.vllm_engine import import_vllm


def _classes():
    import_vllm()
    from vllm.model_executor.layers import linear
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    return linear, VocabParallelEmbedding


def tp_size(module: torch.nn.Module) -> int:
    """Ranks the layer's weights are split across (1 for a replicated layer)."""
    moe = getattr(module, "moe_config", None)
    if moe is not None:
        return int(moe.moe_parallel_config.tp_size)
    return int(getattr(module, "tp_size", 1))


def _rank(module: torch.nn.Module) -> int:
    moe = getattr(module, "moe_config", None)
    if moe is not None:
        return int(moe.tp_rank)
    return int(getattr(module, "tp_rank", 0))


def engine_tp(model: torch.nn.Module) -> tuple[int, int]:
    """(rank in its TP group, TP group size) of the engine holding `model`; (0, 1) without a TP group."""
    import_vllm()
    from vllm.distributed import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 0, 1
    group = ps.get_tp_group()
    return int(group.rank_in_group), int(group.world_size)


def _fused_sizes(module: torch.nn.Module, linear) -> list[int] | None:
    """Full (all-rank) sizes of a fused column-parallel layer's shards, in order; None when not fused."""
    if isinstance(module, linear.QKVParallelLinear):
        q = module.total_num_heads * module.head_size
        return [q, module.total_num_kv_heads * module.head_size, module.total_num_kv_heads * module.v_head_size]
    if isinstance(module, linear.MergedColumnParallelLinear):
        return [int(s) for s in module.output_sizes]
    return None


def _shard_slice(module: torch.nn.Module, linear, index: int | None, rows: int) -> tuple[int, int]:
    """(start, size) of this rank's rows in shard `index` (None: an unfused layer) of `rows` full rows."""
    rank, size = _rank(module), tp_size(module)
    if isinstance(module, linear.QKVParallelLinear) and index in (1, 2):
        replicas = int(module.num_kv_head_replicas)
        local = rows // (size // replicas)
        return (rank // replicas) * local, local
    local = rows // size
    return rank * local, local


def local_shard(module: torch.nn.Module, loaded: torch.Tensor, index: int | None, *, bias: bool = False) -> torch.Tensor:
    """This rank's part (a view) of checkpoint tensor `loaded`, shard `index` of `module`'s fused weight
    (None: the layer's only shard); `bias` for a bias vector."""
    if tp_size(module) == 1:
        return loaded
    linear, _ = _classes()
    if isinstance(module, linear.RowParallelLinear):
        if bias:
            return loaded
        local = module.input_size_per_partition
        return loaded.narrow(1, _rank(module) * local, local)
    if isinstance(module, linear.ColumnParallelLinear):
        start, size = _shard_slice(module, linear, index, loaded.shape[0])
        return loaded.narrow(0, start, size)
    raise TypeError(f"local_shard: no tensor-parallel rule for {type(module).__name__}")


def split_fused(module: torch.nn.Module, loaded: torch.Tensor) -> list[torch.Tensor]:
    """A whole fused checkpoint tensor (Phi-3's `qkv_proj`, `gate_up_proj`) split into its full shards."""
    linear, _ = _classes()
    sizes = _fused_sizes(module, linear)
    if sizes is None:
        return [loaded]
    return list(loaded.split(sizes, dim=0))


def local_param(module: torch.nn.Module, pname: str, fulls: list[torch.Tensor]) -> torch.Tensor:
    """What this rank's `module.<pname>` loads from full checkpoint tensors `fulls` (the fused shards in
    order, or one whole tensor), in checkpoint orientation (verify's reference)."""
    linear, vocab = _classes()
    if isinstance(module, vocab):
        full = fulls[0]
        ind = module.shard_indices
        rows = full[ind.org_vocab_start_index:ind.org_vocab_end_index]
        pad = module.num_embeddings_per_partition - rows.shape[0]
        return torch.cat([rows, rows.new_zeros(pad, *rows.shape[1:])]) if pad else rows
    if tp_size(module) == 1:
        return torch.cat(fulls, dim=0) if len(fulls) > 1 else fulls[0]
    if len(fulls) == 1 and _fused_sizes(module, linear) is not None:
        fulls = split_fused(module, fulls[0])
    if isinstance(module, linear.ColumnParallelLinear):
        parts = [local_shard(module, t, i if len(fulls) > 1 else None) for i, t in enumerate(fulls)]
        return torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    if isinstance(module, linear.RowParallelLinear):
        return local_shard(module, fulls[0], None, bias=pname == "bias")
    return torch.cat(fulls, dim=0) if len(fulls) > 1 else fulls[0]


def local_expert_shard(module: torch.nn.Module, loaded: torch.Tensor, shard_id: str,
                       stacked: bool = False) -> torch.Tensor:
    """This rank's part of one expert's checkpoint tensor: gate (`w1`) / up (`w3`) rows or down (`w2`)
    columns of the intermediate size (vLLM's `_load_w13` / `_load_w2`, without padding).
    `stacked`: `loaded` is (experts, ...), the same part of each."""
    size = tp_size(module)
    if size == 1:
        return loaded
    dim = (1 if shard_id == "w2" else 0) + int(stacked)
    local = loaded.shape[dim] // size
    return loaded.narrow(dim, _rank(module) * local, local)


_QKV_INDEX = {"q": 0, "k": 1, "v": 2}


def local_numel(module: torch.nn.Module, pname: str, arguments: dict) -> int:
    """Elements of this rank's part of the tensor one loader call receives (`arguments`: the call's bound
    arguments: `loaded_weight`, and `loaded_shard_id` for linears or `shard_id` for experts)."""
    loaded = arguments["loaded_weight"]
    if tp_size(module) == 1:
        return loaded.numel()
    if "expert_id" in arguments:
        return local_expert_shard(module, loaded, arguments["shard_id"]).numel()
    shard = arguments.get("loaded_shard_id")
    index = _QKV_INDEX.get(shard, shard) if isinstance(shard, str) else shard
    bias = pname == "bias"
    if index is None:
        linear, _ = _classes()
        if _fused_sizes(module, linear) is not None:
            return sum(local_shard(module, full, i, bias=bias).numel() for i, full in enumerate(split_fused(module, loaded)))
    return local_shard(module, loaded, index, bias=bias).numel()


def tp_cpu_group():
    """vLLM's process group for this rank's TP group on the CPU channel (gloo), for small agreements."""
    import_vllm()
    from vllm.distributed import parallel_state as ps

    return ps.get_tp_group().cpu_group


def whole_row_amax(module: torch.nn.Module, amax_N1: torch.Tensor) -> torch.Tensor:
    """A layer's per-channel amax as vLLM's online FP8 takes it under tensor parallelism: over the whole row
    (all-reduced over the TP group) where the layer splits its input dim, else as given. Collective: every rank
    of the group calls it for the same layers in the same order (verify does)."""
    if tp_size(module) == 1:
        return amax_N1
    import_vllm()
    from vllm.model_executor.layers.quantization.online.fp8 import _is_tp_sharded
    from vllm.model_executor.layers.quantization.utils.quant_utils import amax_for_tp_weight_quant

    return amax_for_tp_weight_quant(amax_N1.clone(), _is_tp_sharded(module, reduces_output_dim=False))
