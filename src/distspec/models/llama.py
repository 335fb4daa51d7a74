"""A Llama-family decoder in plain PyTorch (gpt-fast style).

- Static KV cache with one row ("slot") per sequence, indexed by absolute position: rolling a
  sequence back is just reusing smaller positions; stale entries are never attended to because
  a query at position p only sees keys at positions <= p.
- `forward` takes a batch of sequences, each with its own slot and positions, and any number of
  new tokens (prefill, one decode step, or a verification chunk of k tokens).
- Tensor parallelism: each rank holds a slice of the attention heads and MLP columns; the
  output projections are row-parallel and followed by one all-reduce.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from distspec.models.config import ModelConfig
from distspec.models.cpu_kernels import kernels
from distspec.models.linear import LayerEpoch, QuantLinear, kernel_op
from distspec.models.prefix_cache import SlotPrefixes
from distspec.models.quantized import cat_rows, is_quantized, take_cols, take_rows
from distspec.models.rope import apply_rope, rope_tables
from distspec.models.tensor_parallel import TPContext, split_range


class KVCache(nn.Module):
    def __init__(self, num_slots: int, n_kv_heads: int, max_len: int, head_dim: int, dtype):
        super().__init__()
        shape = (num_slots, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(
        self,
        slots: torch.Tensor | int,
        pos: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_len: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v ([B, H, T, D]) at (slots, pos) and return the first kv_len keys/values.
        slots as a number: one sequence in that slot, written by index with no host reads (a
        step CUDA graphs can record)."""
        if isinstance(slots, int):
            ks, vs = self.k[slots : slots + 1], self.v[slots : slots + 1]
            ks.index_copy_(2, pos[0], k)
            vs.index_copy_(2, pos[0], v)
            return ks[:, :, :kv_len], vs[:, :, :kv_len]
        if slots.numel() == 1:
            # Fast path: one sequence, contiguous positions -> plain slicing, views only.
            s, start, t = int(slots[0]), int(pos[0, 0]), k.shape[2]
            self.k[s, :, start : start + t] = k[0]
            self.v[s, :, start : start + t] = v[0]
            return self.k[s : s + 1, :, :kv_len], self.v[s : s + 1, :, :kv_len]
        idx = slots[:, None]
        self.k[idx, :, pos] = k.transpose(1, 2)
        self.v[idx, :, pos] = v.transpose(1, 2)
        return self.k[slots, :, :kv_len], self.v[slots, :, :kv_len]


def decode_ops(x: torch.Tensor):
    """distspec's fused CPU ops (kernels/decode_ops.cpp) where they apply to x, else None."""
    return kernels() if x.dtype == torch.float32 and x.device.type == "cpu" else None


class Watched(nn.Module):
    """A module whose attributes (sub-layers, KV cache) fused layers are built from: setting
    one tells them (LayerEpoch)."""

    def __setattr__(self, name, value) -> None:
        super().__setattr__(name, value)
        LayerEpoch.bump()


class Attention(Watched):
    def __init__(self, config: ModelConfig, tp: TPContext):
        super().__init__()
        self.config, self.tp = config, tp
        self.kv_start, kv_end = split_range(config.num_key_value_heads, tp.world_size, tp.rank)
        self.n_kv_heads = kv_end - self.kv_start
        self.q_per_kv = config.num_attention_heads // config.num_key_value_heads
        self.n_heads = self.n_kv_heads * self.q_per_kv
        hd = config.head_dim
        qkv_out = (self.n_heads + 2 * self.n_kv_heads) * hd
        self.wqkv = nn.Linear(config.hidden_size, qkv_out, bias=config.attention_bias)
        self.wo = nn.Linear(self.n_heads * hd, config.hidden_size, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, slots, pos, kv_len, mask, tree=None):
        bsz, t, _ = x.shape
        hd = self.config.head_dim
        nq, nqk = self.n_heads, self.n_heads + self.n_kv_heads
        qkv = self.wqkv(x).view(bsz, t, nqk + self.n_kv_heads, hd)
        ops = decode_ops(x) if kv_len is not None else None
        if ops is not None:  # one call: rope, the KV cache write and attention
            kc, window = self.kv_cache, self.config.sliding_window or 0
            y = ops.attend(qkv, cos, sin, kc.k, kc.v, slots, pos, nq, window, tree)
            return self.tp.all_reduce(self.wo(y.view(bsz, t, nq * hd)))
        qk = apply_rope(qkv[:, :, :nqk], cos, sin)  # q and k rotated together: fewer ops
        q, k = qk[:, :, :nq].transpose(1, 2), qk[:, :, nq:].transpose(1, 2)
        v = qkv[:, :, nqk:].transpose(1, 2)
        gqa = self.q_per_kv > 1
        if kv_len is None:  # no cache: causal attention within the chunk (training, scoring)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            k, v = self.kv_cache.update(slots, pos, k, v, kv_len)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(bsz, t, self.n_heads * hd)
        return self.tp.all_reduce(self.wo(y))


class MLP(Watched):
    def __init__(self, config: ModelConfig, tp: TPContext):
        super().__init__()
        start, end = split_range(config.intermediate_size, tp.world_size, tp.rank)
        self.inter = end - start
        self.tp = tp
        self.w_gate_up = nn.Linear(config.hidden_size, 2 * self.inter, bias=config.mlp_bias)
        self.w_down = nn.Linear(self.inter, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x):
        gu = self.w_gate_up(x)
        ops = decode_ops(gu)
        if ops is not None:
            return self.tp.all_reduce(self.w_down(ops.silu_mul(gu)))
        gate, up = gu.split(self.inter, dim=-1)
        return self.tp.all_reduce(self.w_down(F.silu(gate) * up))


class Block(Watched):
    def __init__(self, config: ModelConfig, tp: TPContext):
        super().__init__()
        self.eps = config.rms_norm_eps
        self.window = config.sliding_window or 0  # 0: none
        self.attn_norm = nn.Parameter(torch.ones(config.hidden_size))
        self.mlp_norm = nn.Parameter(torch.ones(config.hidden_size))
        self.attn = Attention(config, tp)
        self.mlp = MLP(config, tp)
        self._cache_fused(None, None)

    def forward(self, x, cos, sin, slots, pos, kv_len, mask, tree=None):
        fused = self.fused_layer() if kv_len is not None and decode_ops(x) is not None else None
        if fused is not None:
            return fused.forward(x, cos, sin, slots, pos, tree)
        return self.finish(x + self.attend(x, cos, sin, slots, pos, kv_len, mask, tree))

    def fused_layer(self):
        """This layer as one kernel call (kernels/decoder_layer.cpp), rebuilt whenever a linear
        layer or the KV cache changes (checked only after a LayerEpoch bump); None where it
        does not apply (tensor parallel, layers the kernels do not run)."""
        if self._fused_epoch == LayerEpoch.value:
            return self._fused
        attn, mlp = self.attn, self.mlp
        linears = (attn.wqkv, attn.wo, mlp.w_gate_up, mlp.w_down)
        key = (*linears, attn.kv_cache, *(getattr(m, "int8_activations", 0) for m in linears))
        if key != self._fused_key:
            self._cache_fused(self._build_fused(linears), key)
        vars(self)["_fused_epoch"] = LayerEpoch.value
        return self._fused

    def _build_fused(self, linears):
        ops, attn = kernels(), self.attn
        if ops is None or attn.tp.enabled or attn.kv_cache is None:
            return None
        lin = [kernel_op(m, ops) for m in linears]
        if any(op is None for op in lin):
            return None
        kc = attn.kv_cache
        norms = self.attn_norm.detach(), self.mlp_norm.detach()
        return ops.DecoderLayer(*norms, self.eps, *lin, kc.k, kc.v, attn.n_heads, self.window)

    def _cache_fused(self, fused, key) -> None:
        # plain attributes, past Watched.__setattr__: caching changes nothing in the layer
        vars(self).update(_fused=fused, _fused_key=key, _fused_epoch=None)

    def attend(self, x, cos, sin, slots, pos, kv_len, mask, tree=None):
        """The attention sublayer's output (to be added to the residual stream)."""
        x = rms_norm(x, self.attn_norm, self.eps)
        return self.attn(x, cos, sin, slots, pos, kv_len, mask, tree)

    def finish(self, h):
        """The MLP sublayer on the residual stream h (attention already added)."""
        return h + self.mlp(rms_norm(h, self.mlp_norm, self.eps))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    ops = decode_ops(x) if not torch.is_grad_enabled() else None  # training: autograd's
    if ops is not None:
        return ops.rms_norm(x, weight, eps)
    return F.rms_norm(x, weight.shape, weight, eps)


class Transformer(Watched):
    def __init__(self, config: ModelConfig, tp: TPContext | None = None):
        super().__init__()
        self.config = config
        self.tp = tp or TPContext()
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, self.tp) for _ in range(config.num_hidden_layers))
        self.norm = nn.Parameter(torch.ones(config.hidden_size))
        head_size = config.draft_vocab_size or config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, head_size, bias=False)
        if config.draft_vocab_size:
            # Reduced output vocabulary (drafters): head row i scores token head_token_ids[i].
            self.register_buffer("head_token_ids", torch.zeros(head_size, dtype=torch.long))
        else:
            self.head_token_ids = None
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.max_len = 0
        self.num_slots = 0
        self.prefixes = SlotPrefixes(0)  # what each KV slot holds, for prompts to reuse
        # EasySpec: the ranks that share a fuzzy group's attentions (each holds every layer)
        self.layer_parallel = TPContext()
        # _graphs: models/cuda_graphs.py's CapturedSteps once capture_steps() enables them
        vars(self).update(_stack=None, _stack_epoch=None, _graphs=None)

    @classmethod
    def empty(cls, config: ModelConfig, tp: TPContext | None = None, device="cpu", dtype=None):
        """Build without initialising weights (they are loaded right after)."""
        with torch.device("meta"):
            model = cls(config, tp)
        model = model.to_empty(device=device)
        if dtype is not None:
            model = model.to(dtype)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.embed.weight
        return model.eval()

    def share_embedding(self, embedding: nn.Embedding) -> None:
        """Use another model's input embedding (a drafter reusing its target's), without a copy."""
        if embedding.weight.shape != self.embed.weight.shape:
            raise ValueError(
                f"embedding shape {tuple(embedding.weight.shape)} does not fit this model's "
                f"{tuple(self.embed.weight.shape)}"
            )
        self.embed = embedding

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def setup_cache(self, num_slots: int, max_len: int) -> None:
        """Allocate the static KV cache: num_slots sequences of up to max_len positions."""
        max_len = min(max_len, self.config.max_position_embeddings)
        for layer in self.layers:
            layer.attn.kv_cache = KVCache(
                num_slots, layer.attn.n_kv_heads, max_len, self.config.head_dim, self.dtype
            ).to(self.device)
        cos, sin = rope_tables(self.config, max_len)
        self.register_buffer("rope_cos", cos.to(self.device, self.dtype), persistent=False)
        self.register_buffer("rope_sin", sin.to(self.device, self.dtype), persistent=False)
        self.max_len, self.num_slots = max_len, num_slots
        self.prefixes = SlotPrefixes(num_slots, self.prefixes.enabled)

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        pos: torch.Tensor,
        slots: torch.Tensor | None = None,
        last: int = 0,
        fuzzy_groups: tuple[tuple[int, int], ...] = (),
        tree: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens, pos: [B, T] int64; slots: [B] cache rows (default 0..B-1), or one slot's
        number: B = 1 and a step with no host reads (attention over the whole cache under a
        position mask; PyTorch's ops), the form CUDA graphs record (models/cuda_graphs.py).

        Returns logits [B, T, V], or [B, last, V]: of the last `last` positions only. Rows of a
        ragged batch are right-padded; padding must use positions past the row's real ones
        (see `pad_positions`).

        fuzzy_groups: layer ranges [start, end) run the EasySpec way: every attention of a
        group reads the group's input (so they could run at once), their outputs are added
        back in order with the MLPs in between. Approximate, K/V included (see easyspec_groups).

        tree: [B, T, T] bool, a token tree per row (spec_decode/tree.py): query t sees chunk
        token u where tree[b, t, u] (its ancestors and itself) instead of every earlier one, and
        RoPE places it at the chunk's start + its depth. pos are then the cache rows its K/V
        are written to (consecutive); the accepted path's are moved into place afterwards
        (move_kv).
        """
        if self.max_len == 0:
            raise RuntimeError("call setup_cache() before forward()")
        bsz, t = tokens.shape
        if slots is None:
            slots = torch.arange(bsz, device=tokens.device)
        recordable = isinstance(slots, int)
        if recordable:
            self.prefixes.written(slots, 0)  # no host reads here: the whole record goes
            if decode_ops(self.rope_cos) is not None:
                raise ValueError("a slot number runs PyTorch's ops: a CUDA or non-fp32 model")
            kv_len = self.max_len
        else:
            kv_len = int(pos.max()) + 1
            if kv_len > self.max_len:
                raise ValueError(
                    f"position {kv_len - 1} is past the KV cache length {self.max_len}"
                )
            for slot, start in zip(slots.tolist(), pos[:, 0].tolist(), strict=True):
                self.prefixes.written(slot, start)
            if self._graphs is not None and self._graphs.fits(tokens, fuzzy_groups, tree):
                return self._graphs(tokens, pos, int(slots[0]), last)
        rope_pos = pos if tree is None else pos[:, :1] + tree.sum(-1) - 1
        cos = self.rope_cos[rope_pos].unsqueeze(2)
        sin = self.rope_sin[rope_pos].unsqueeze(2)
        window = self.config.sliding_window
        need_mask = recordable or t > 1 or bsz > 1 or (window is not None and kv_len > window)
        if decode_ops(self.rope_cos) is not None:  # its attention masks by position itself
            need_mask = False
        mask = self._mask(pos, kv_len, tree, rope_pos) if need_mask else None
        x = self.embed(tokens)
        stack = self.fused_stack() if not fuzzy_groups and decode_ops(x) is not None else None
        if stack is not None:
            logits = stack.forward(x, cos, sin, slots, pos, last, tree)
        else:
            args = (x, cos, sin, slots, pos, kv_len, mask, fuzzy_groups, tree)
            logits = self._forward_layers(*args)
            if last:
                logits = logits[:, -last:]
            logits = self.head_logits(logits)
        if self.head_token_ids is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.config.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.head_token_ids, logits)

    def prefill_rows(self) -> int | None:
        """The most tokens one forward of a prompt takes (None: any). Where distspec's CPU
        kernels run, their row limit (ops.MAX_ROWS; past it a linear goes to BLAS): within
        it a row's result does not depend on the rows beside it, so a prompt's K/V come out
        the same bits however the prompt is split (prefix reuse) or batched."""
        ops = decode_ops(self.rope_cos)
        return None if ops is None else int(ops.MAX_ROWS)

    def fused_stack(self):
        """The cached forward after the embedding as one kernel call (kernels/decoder_layer.h's
        DecoderStack: every layer, the final norm, the head), rebuilt after a LayerEpoch bump;
        None where a layer or the head does not fuse (see Block.fused_layer)."""
        if self._stack_epoch == LayerEpoch.value:
            return self._stack
        layers = [layer.fused_layer() for layer in self.layers]
        ops, stack = kernels(), None
        head = kernel_op(self.lm_head, ops) if ops is not None and all(layers) else None
        if head is not None:
            norm = self.norm.detach()
            stack = ops.DecoderStack(layers, norm, self.config.rms_norm_eps, head)
        vars(self).update(_stack=stack, _stack_epoch=LayerEpoch.value)
        return stack

    def _forward_layers(self, x, cos, sin, slots, pos, kv_len, mask, fuzzy_groups, tree=None):
        starts = dict(fuzzy_groups)
        i = 0
        while i < len(self.layers):
            end = starts.get(i)
            if end is None:
                x = self.layers[i](x, cos, sin, slots, pos, kv_len, mask, tree)
                i += 1
                continue
            group = self.layers[i:end]
            outs = self._attend_group(group, x, cos, sin, slots, pos, kv_len, mask)
            for layer, out in zip(group, outs, strict=True):
                x = layer.finish(x + out)
            i = end
        return x

    def _attend_group(self, group, x: torch.Tensor, *args) -> list[torch.Tensor]:
        """The attention outputs of a fuzzy group's layers, all from the group's input x.

        Over a layer-parallel drafter group (`self.layer_parallel`) rank r runs attentions
        r, r + R, ... and one all-reduce gathers them: every output has exactly one non-zero
        contributor, so the sum is the output itself. Each attention's K/V is then written
        only on its rank, which is the only one that reads it until the next exact forward
        (run on every rank) overwrites those positions."""
        lp = self.layer_parallel
        if not lp.enabled:
            return [layer.attend(x, *args) for layer in group]
        outs = x.new_zeros((len(group), *x.shape))
        for j in range(lp.rank, len(group), lp.world_size):
            outs[j] = group[j].attend(x, *args)
        return list(lp.all_reduce(outs, spin=True).unbind(0))

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm + output head: [..., len(head)] logits (the reduced vocabulary if any)."""
        return self.lm_head(rms_norm(x, self.norm, self.config.rms_norm_eps))

    def forward_uncached(self, tokens: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, T, H] of whole sequences from position 0, without the KV cache
        (training and scoring); differentiable."""
        t = tokens.shape[1]
        cos, sin = rope_tables(self.config, t)
        cos = cos.to(self.device, self.dtype)[None, :, None]
        sin = sin.to(self.device, self.dtype)[None, :, None]
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, None, None, None, None)
        return x

    def _mask(self, pos, kv_len, tree=None, rope_pos=None) -> torch.Tensor:
        """[B, 1, T, kv_len]: which cached keys each query sees (see forward's tree)."""
        key_pos = torch.arange(kv_len, device=pos.device)
        q = pos[:, None, :, None]
        if tree is None:
            mask = key_pos <= q
        else:  # keys before the chunk, then the tree's own
            mask = (key_pos < pos[:, None, :1, None]).repeat(1, 1, pos.shape[1], 1)
            cols = pos[:, None, None, :].expand(-1, 1, pos.shape[1], -1)
            mask.scatter_(-1, cols, tree[:, None])
        if window := self.config.sliding_window:  # in RoPE positions (a tree node's depth)
            key_rope = key_pos.expand(pos.shape[0], -1).clone()
            if tree is not None:
                key_rope.scatter_(-1, pos, rope_pos)
            mask &= key_rope[:, None, None, :] > rope_pos[:, None, :, None] - window
        return mask

    def move_kv(self, slot: int, src: list[int], dst: list[int]) -> None:
        """Copy the K/V at cache positions src to dst in slot (a tree's accepted path into
        place: dst[i] <= src[i], increasing)."""
        if src == dst:
            return
        self.prefixes.written(slot, min(dst))
        s, d = torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device)
        for layer in self.layers:
            kc = layer.attn.kv_cache
            kc.k[slot, :, d] = kc.k[slot, :, s]
            kc.v[slot, :, d] = kc.v[slot, :, s]

    def load_hf_state_dict(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Load weights named as in Hugging Face checkpoints, fusing and sharding them."""
        load_hf_weights(self, weights)


def pad_positions(starts: list[int], width: int) -> torch.Tensor:
    """Positions [B, width] for a right-padded batch whose row i starts at starts[i]: padding
    continues past the real positions, so real queries never attend to padded keys."""
    base = torch.tensor(starts)[:, None]
    return base + torch.arange(width)[None, :]


def load_hf_weights(model: Transformer, weights: Mapping[str, torch.Tensor]) -> None:
    """Linear weights may come quantized (models/quantized.py): their layers become
    QuantLinear, the rest is loaded alike."""
    cfg, tp = model.config, model.tp
    hd = cfg.head_dim

    def get(name: str):
        if name not in weights:
            raise KeyError(f"checkpoint is missing tensor {name!r}")
        return weights[name]

    def copy(dst: torch.Tensor, src: torch.Tensor) -> None:
        if dst.shape != src.shape:
            raise ValueError(f"shape mismatch: expected {tuple(dst.shape)}, got {tuple(src.shape)}")
        with torch.no_grad():
            dst.copy_(src.to(dst.dtype))

    def set_linear(owner: nn.Module, attr: str, weight, bias=None) -> None:
        linear = getattr(owner, attr)
        if not is_quantized(weight):
            copy(linear.weight, weight)
            if bias is not None:
                copy(linear.bias, bias)
            return
        if tuple(weight.shape) != tuple(linear.weight.shape):
            raise ValueError(
                f"shape mismatch: expected {tuple(linear.weight.shape)}, got {weight.shape}"
            )
        setattr(owner, attr, QuantLinear(weight, bias).to(linear.weight.device))

    if not cfg.embedding_from_target:
        copy(model.embed.weight, get("model.embed_tokens.weight"))
    if model.head_token_ids is not None:
        model.head_token_ids.copy_(get("lm_head.token_ids"))
    copy(model.norm, get("model.norm.weight"))
    if not cfg.tie_word_embeddings:
        set_linear(model, "lm_head", get("lm_head.weight"))
    elif is_quantized(head := weights.get("lm_head.weight")):  # a quantized copy of the table
        set_linear(model, "lm_head", head)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        attn = layer.attn
        kv0, kv1 = attn.kv_start, attn.kv_start + attn.n_kv_heads
        q0, q1 = kv0 * attn.q_per_kv, kv1 * attn.q_per_kv
        qkv = {"q": (q0 * hd, q1 * hd), "k": (kv0 * hd, kv1 * hd), "v": (kv0 * hd, kv1 * hd)}
        sa = f"{p}self_attn."
        bias = _fused(get, sa, qkv, "bias") if cfg.attention_bias else None
        set_linear(attn, "wqkv", _fused(get, sa, qkv, "weight"), bias)
        set_linear(attn, "wo", take_cols(get(f"{sa}o_proj.weight"), q0 * hd, q1 * hd))
        mlp = layer.mlp
        m0, m1 = split_range(cfg.intermediate_size, tp.world_size, tp.rank)
        gate_up = {"gate": (m0, m1), "up": (m0, m1)}
        down_b = None
        if cfg.mlp_bias:
            # Row-parallel bias is added once, on rank 0, before the all-reduce.
            down_b = get(f"{p}mlp.down_proj.bias")
            down_b = down_b if tp.rank == 0 else torch.zeros_like(down_b)
        bias = _fused(get, f"{p}mlp.", gate_up, "bias") if cfg.mlp_bias else None
        set_linear(mlp, "w_gate_up", _fused(get, f"{p}mlp.", gate_up, "weight"), bias)
        set_linear(mlp, "w_down", take_cols(get(f"{p}mlp.down_proj.weight"), m0, m1), down_b)
        copy(layer.attn_norm, get(f"{p}input_layernorm.weight"))
        copy(layer.mlp_norm, get(f"{p}post_attention_layernorm.weight"))


def _fused(get, prefix: str, spans: dict[str, tuple[int, int]], kind: str):
    """Rows [start, end) of each of prefix + <name>_proj.<kind>, stacked (q, k, v; gate, up)."""
    parts = [take_rows(get(f"{prefix}{n}_proj.{kind}"), a, b) for n, (a, b) in spans.items()]
    return cat_rows(parts)


def check_easyspec(group: int, exact: tuple[int, int] = (1, 1)) -> None:
    """ValueError unless group is 0 (off) or >= 2 and exact holds two counts >= 0."""
    if group < 0 or group == 1:
        raise ValueError(f"the EasySpec group size must be 0 (off) or >= 2, got {group}")
    if len(exact) != 2 or min(exact) < 0:
        raise ValueError(f"EasySpec's exact layers are two counts (first, last) >= 0, got {exact}")


def easyspec_groups(num_layers: int, group: int, exact_first: int = 1, exact_last: int = 1):
    """EasySpec's layer groups: the middle layers in runs of `group` (the first `exact_first`
    and last `exact_last` layers stay exact; a shorter tail run stays exact too)."""
    if group < 2:
        return ()
    groups, start = [], exact_first
    while start + group <= num_layers - exact_last:
        groups.append((start, start + group))
        start += group
    return tuple(groups)
