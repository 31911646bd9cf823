"""A lean Llama decoder for serving on CPU: weights packed once, one KV-cache row per request.

``transformers``' ``generate`` spends most of a CPU decoding step in Python and small ops around the matmuls
(47 ms a token for the embedded 135M model). This decoder runs the same Llama arithmetic with four fused
matmuls per layer (q/k/v as one, gate/up as one) in one of two weight formats:

* ``int4`` (the Space's default on CPU): 4-bit weights with a scale and a zero per 32 inputs, the layout of
  GGUF's Q4_1 (the embedded model's own format, so its layers are repacked, not requantized, up to bf16
  scales), decoded by PyTorch's own ``_weight_int4pack_mm_for_cpu``; the output layer in Q8_0's layout
  (int8 per 32 inputs), scored by ``_weight_int8pack_mm`` with each row's best candidates rescored exactly.
  From ``PackedLinear.DENSE_ROWS`` rows on (a prompt, a large batch) the same weights run as bf16 matrices on the
  CPU's matrix units: the low-bit kernels' cost grows with every row, theirs hardly does. RoPE is one complex
  multiply (query and key heads are stored pairwise interleaved) and the KV cache is bf16. Close to fp32, not
  equal: ``tests/test_decoder.py`` bounds it.
* ``fp32``: the fp32 weights, transposed once; the same greedy tokens as ``generate``.

Rows decode together at their own positions: a request that arrives is prefilled into a new cache row and
joins at the next step; a finished row's place is taken by the last row. ``LlamaDecoder.compile`` turns a whole
step into one compiled graph (``decode_step``): one for a single row, one for several.
"""

from __future__ import annotations

WEIGHT_FORMATS = ("int4", "fp32")  # of a decoder; its int4 keeps the output layer in q8
FORMATS = ("int4", "q8", "fp32")  # of one matrix
GROUP = 32  # int4 weights share a scale and a zero per 32 inputs: the layout of GGUF's Q4_1
MIN_CACHE = 256  # positions a cache starts with
RESCORED = 64  # candidates per row whose logits the q8 output layer computes exactly


def is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # the Space needs peft only for adapters
        return False
    return isinstance(model, PeftModel)


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def supports(model) -> str | None:
    """Why this decoder cannot run ``model`` (a Llama, or a plain LoRA adapter on one), or None if it can."""
    if is_peft(model):
        adapter = model.peft_config[model.active_adapter]
        if adapter.peft_type != "LORA" or adapter.use_dora or adapter.lora_bias or adapter.modules_to_save:
            return "the adapter is not a plain LoRA (DoRA, LoRA biases or saved modules)"
        model = model.get_base_model()
        if any(hasattr(m, "lora_A") and not n.endswith(PROJECTIONS) for n, m in model.named_modules()):
            return "the adapter has LoRA layers outside the attention and MLP projections"
    config = model.config
    if config.model_type != "llama":
        return f"model_type is {config.model_type!r}, not 'llama'"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "the model has linear biases"
    if config.hidden_act != "silu":
        return f"hidden_act is {config.hidden_act!r}, not 'silu'"
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type in ("dynamic", "longrope"):  # their frequencies depend on the sequence length
        return f"its RoPE ({rope_type!r}) changes with the sequence length"
    if next(model.parameters()).device.type != "cpu":
        return "the model is not on the CPU"
    return None


class PackedLinear:
    """``y = x @ W.T`` for a fixed ``W`` [out, in], in one of ``FORMATS``; plus ``(x @ A.T) @ B.T`` in fp32 when
    given a LoRA adapter's ``lora = (A, B)`` and called with ``adapter=True``.

    The int4 and q8 formats also keep their weights as a bf16 matrix (``dense``): from ``DENSE_ROWS`` rows on (a
    prompt, a large batch) it beats their 4- and 8-bit kernels, whose cost grows with every row; below that, the
    bf16 matrix is slower, as it is read from memory at 2 bytes a weight (measured with 30 layers' weights, as
    in a decoding step: a weight matrix that stays in the CPU's cache makes bf16 look faster than it is)."""

    DENSE_ROWS = {"int4": 10, "q8": 10}  # 8 rows: int8 1.76 ms, bf16 2.19 (AMD EPYC, avx512-bf16, no AMX)

    def __init__(self, weight, weight_format: str, lora: tuple | None = None):
        import torch

        self.lora = None if lora is None else tuple(t.detach().float().t().contiguous() for t in lora)
        if weight_format not in FORMATS:
            raise ValueError(f"weight format must be one of {list(FORMATS)}; got {weight_format!r}")
        weight = weight.detach().float()
        rows, cols = weight.shape
        self.format = weight_format
        if weight_format == "fp32":
            self.weight_t = weight.t().contiguous()  # x @ w.T decoded 1.1-3x faster than F.linear here
            return
        if cols % GROUP:
            raise ValueError(f"{weight_format} needs input sizes divisible by {GROUP}; got {cols}")
        groups = weight.view(rows, cols // GROUP, GROUP)
        if weight_format == "int4":  # w = low + scale * level, level in 0..15: GGUF's Q4_1
            low = groups.amin(-1, keepdim=True)
            scale = (groups.amax(-1, keepdim=True) - low).clamp(min=1e-12) / 15
            levels = ((groups - low) / scale).round().clamp(0, 15)
            self.plane = _int4_plane(levels, scale, low + 8 * scale)
            self.dense = (low + scale * levels).view(rows, cols).to(torch.bfloat16)
        else:  # q8: w = scale * level, level in -127..127 (GGUF's Q8_0), scored through a per-row int8 copy
            scale = groups.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
            self.dense = (scale * (groups / scale).round().clamp(-127, 127)).view(rows, cols).to(torch.bfloat16)
            dense = self.dense.float()
            row_scale = dense.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 127
            self.int8 = (dense / row_scale).round().to(torch.int8)
            self.int8_scale = row_scale[:, 0].to(torch.bfloat16)

    def parts(self, adapter: bool, dense: bool = False) -> tuple:
        """What ``matmul`` takes: (the weight's tensors, the adapter's (A.T, B.T) or ()); ``dense``: the bf16
        matrix of an int4 format."""
        if self.format == "fp32":
            weight = (self.weight_t,)
        else:
            weight = (self.dense.t(),) if dense else self.plane
        return weight, self.lora if adapter and self.lora else ()

    def __call__(self, x, adapter: bool = False):
        """``x``: [rows, in] -> [rows, out]: fp32, or bf16 for the int4 formats without an adapter (adding it to
        fp32 gives fp32)."""
        if self.format == "q8":
            return self._q8(x)
        return matmul(x, *self.parts(adapter, dense=self.dense_for(x.shape[0])))

    def dense_for(self, rows: int) -> bool:
        return self.format in self.DENSE_ROWS and rows >= self.DENSE_ROWS[self.format]

    def _q8(self, x):
        """Logits [rows, out] in fp32. All are scored roughly: few rows by the int8 kernel (one int8 scale per row:
        ~1% off), more by the bf16 matrix (its bf16 output is 0.125 apart near 20, enough to tie the best two);
        then the ``RESCORED`` best of each row are computed again from the Q8_0 weights, so the tokens that can
        be picked get their exact logits, however many rows decode together."""
        import torch

        if self.dense_for(x.shape[0]):
            logits = torch.nn.functional.linear(x.to(torch.bfloat16), self.dense).float()
        else:
            logits = torch._weight_int8pack_mm(x.to(torch.bfloat16), self.int8, self.int8_scale).float()
        best = logits.topk(RESCORED, dim=-1).indices  # [rows, RESCORED]
        exact = (self.dense[best].float() @ x.float()[:, :, None])[..., 0]
        return logits.scatter_(1, best, exact)


def matmul(x, weight: tuple, lora: tuple):
    """``x @ W.T`` (+ the adapter's ``(x @ A.T) @ B.T``) from ``PackedLinear.parts``: plain tensors, so that
    ``torch.compile`` sees the same graph for every layer."""
    import torch

    if len(weight) == 1:  # W.T in fp32, or in bf16 (a dense int4 matrix)
        y = x.to(weight[0].dtype) @ weight[0]
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), weight[0], GROUP, weight[1])
    return add_lora(x, y, lora)


def add_lora(x, y, lora: tuple):
    """``y + (x @ A.T) @ B.T`` in fp32 for ``lora = (A.T, B.T)``; ``y`` itself for ``()``."""
    import torch

    return torch.addmm(y.float(), x.float() @ lora[0], lora[1]) if lora else y


def _int4_plane(levels, scale, zero):
    """Levels 0..15 [out, in] packed for ``_weight_int4pack_mm_for_cpu``, which computes (level - 8) * scale + zero
    per group."""
    import torch

    rows = levels.shape[0]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels.reshape(rows, -1).int(), 1)
    return packed, torch.cat([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)


def fused(modules: list, weight_format: str, order=None) -> PackedLinear:
    """One matmul for ``modules`` (plain or PEFT LoRA linears) whose outputs are concatenated (then taken in
    ``order``, if given). Their LoRA adapters stay apart from the packed base weights (4 bits would round a small
    update away): A stacked, B block-diagonal, B scaled."""
    import torch

    weights, a_parts, b_parts = [], [], []
    for module in modules:
        lora = lora_of(module)
        base = module.base_layer if hasattr(module, "base_layer") else module
        weights.append(base.weight)
        rank = 0 if lora is None else lora[0].shape[0]
        a_parts.append(lora[0] if lora else base.weight.new_zeros(0, base.weight.shape[1]))
        b_parts.append(lora[1] if lora else base.weight.new_zeros(base.weight.shape[0], rank))
    weight, lora = torch.cat(weights), None
    if any(a.shape[0] for a in a_parts):
        lora = (torch.cat(a_parts), torch.block_diag(*b_parts))
    if order is not None:
        weight, lora = weight[order], lora and (lora[0], lora[1][order])
    return PackedLinear(weight, weight_format, lora)


def lora_of(module) -> tuple | None:
    """``(A, B * scaling)`` of a PEFT LoRA linear's active adapter, or None for a plain linear."""
    if not hasattr(module, "lora_A"):
        return None
    if getattr(module, "merged", False):
        raise ValueError("unmerge the adapter before building a decoder (its base weights hold the update)")
    name = module.active_adapters[0]
    return module.lora_A[name].weight, module.lora_B[name].weight * module.scaling[name]


class Layer:
    def __init__(self, layer, weight_format: str, head_dim: int):
        import torch

        attention, mlp = layer.self_attn, layer.mlp
        q_size, kv_size = attention.q_proj.weight.shape[0], attention.k_proj.weight.shape[0]
        qk_order = interleaved((q_size + kv_size) // head_dim, head_dim)
        order = torch.cat([qk_order, torch.arange(q_size + kv_size, q_size + 2 * kv_size)])  # v as it is
        self.input_norm = layer.input_layernorm.weight.detach().float().clone()
        self.qkv = fused([attention.q_proj, attention.k_proj, attention.v_proj], weight_format, order)
        self.out = fused([attention.o_proj], weight_format)
        self.post_norm = layer.post_attention_layernorm.weight.detach().float().clone()
        self.gate_up = fused([mlp.gate_proj, mlp.up_proj], weight_format)
        self.down = fused([mlp.down_proj], weight_format)
        matrices = (self.qkv, self.out, self.gate_up, self.down)
        self.parts = {(adapter, dense): (self.input_norm, self.post_norm, *(m.parts(adapter, dense) for m in matrices))
                      for adapter in (False, True) for dense in (False, True)}  # fmt: skip


def interleaved(heads: int, head_dim: int):
    """An output order for ``heads`` query or key heads that puts each rotation pair (i, i + head_dim / 2) side by
    side, so RoPE is one complex multiply (``rotate``). Queries and keys reordered alike keep their dot products."""
    import torch

    pairs = torch.arange(head_dim).view(2, head_dim // 2).t().reshape(-1)
    return (torch.arange(heads)[:, None] * head_dim + pairs).reshape(-1)


def rotate(x, rotations):
    """RoPE on interleaved heads: x [..., head_dim] (fp32) times ``rotations`` (complex, [..., head_dim / 2])."""
    import torch

    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * rotations).flatten(-2)


def attention_inputs(x, rotations, input_norm, qkv: tuple, heads: int, head_dim: int, eps: float):
    """The first half of a layer for x [tokens, hidden] at ``rotations`` [tokens, 1, head_dim / 2]: the rotated
    queries and keys [tokens, heads + kv_heads, head_dim] (fp32) and the values [tokens, kv_heads * head_dim]."""
    import torch

    projected = matmul(torch.nn.functional.rms_norm(x, input_norm.shape, input_norm, eps), *qkv)
    kv_size = (projected.shape[-1] - heads * head_dim) // 2
    qk = projected[:, : heads * head_dim + kv_size].float().view(x.shape[0], -1, head_dim)
    return rotate(qk, rotations), projected[:, heads * head_dim + kv_size :]


def feed_forward(x, post_norm, gate_up: tuple, down: tuple, eps: float):
    """The MLP half of a layer, residual included: x [tokens, hidden]."""
    import torch

    hidden = torch.nn.functional.rms_norm(x, post_norm.shape, post_norm, eps)
    gate, up = matmul(hidden, *gate_up).chunk(2, dim=-1)  # bf16 from the int4 kernel: no round trip through fp32
    return x + matmul(torch.nn.functional.silu(gate) * up, *down)


def decode_layer(x, rotations, row_index, positions, visible, width: int, keys, values, parts: tuple, heads: int,
                 eps: float):  # fmt: skip
    """One layer of ``LlamaDecoder.decode``: x [rows, hidden] at ``positions``; writes this layer's cache rows.
    ``rotations``: [rows, 1, head_dim / 2]; one row at a time gives ``row_index`` and ``positions`` as ints.

    One query per row: the heads that share a key/value head become its queries (exact GQA, no copy)."""

    input_norm, post_norm, qkv, out, gate_up, down = parts
    rows, kv_heads, head_dim = x.shape[0], keys.shape[1], keys.shape[-1]
    qk, v = attention_inputs(x, rotations, input_norm, qkv, heads, head_dim, eps)
    qk = qk.to(keys.dtype)  # the cache's: bf16 for int4
    keys[row_index, :, positions] = qk[:, heads:]
    values[row_index, :, positions] = v.view(rows, kv_heads, head_dim).to(keys.dtype)
    queries = qk[:, :heads].view(rows, kv_heads, heads // kv_heads, head_dim)
    attended = attend(queries, keys[:rows, :, :width], values[:rows, :, :width], visible)
    x = x + matmul(attended.reshape(rows, heads * head_dim), *out)
    return feed_forward(x, post_norm, gate_up, down, eps)


def attend(queries, keys, values, visible):
    """Attention of queries [rows, kv_heads, group, head_dim] over keys and values [rows, kv_heads, length, head_dim]
    at the positions ``visible`` [rows, 1, 1, length] (None: all). Eagerly, SDPA; in a compiled graph, written out,
    so that Inductor fuses scores, softmax and weighted sum into one loop over the cache. The CPU's flash-attention
    kernel is made for blocks of queries: with one per row, 30 layers' attention over 8 rows and 256 positions took
    5.9 ms compiled, this 2.9 (and a whole single-row step 5.4 against 4.7 ms)."""
    import torch

    if not torch.compiler.is_compiling():
        return torch.nn.functional.scaled_dot_product_attention(queries, keys, values, attn_mask=visible)
    scores = (queries.float()[:, :, :, None] * keys.float()[:, :, None]).sum(-1) * queries.shape[-1] ** -0.5
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    return (scores.softmax(-1)[..., None] * values.float()[:, :, None]).sum(-2).to(queries.dtype)


def decode_step(token_ids, positions, embed, rotations, norm, layers: tuple, keys, values, head, heads: int,
                eps: float):  # fmt: skip
    """A whole ``LlamaDecoder.decode`` step: token_ids and positions [rows] through every layer and the output
    layer; returns the logits [rows, vocab]. ``LlamaDecoder.compile`` makes it one graph (one guard check and one
    call into compiled C++ a token instead of ~450 Python calls to small ops). Attention reads the cache's whole
    length, masked, a dimension the graph takes as dynamic: one graph however long the sequence grows.

    ``layers``: every layer's ``Layer.parts`` stacked (``stacked``: fewer arguments, a shorter guard check); keys
    and values: lists of each layer's cache (one tensor for all layers would be copied whole at every step: its
    in-place updates chain)."""
    import torch

    rows = token_ids.shape[0]
    x = embed[token_ids]
    step_rotations = rotations[positions][:, None]
    visible = (torch.arange(keys[0].shape[2]) <= positions[:, None])[:, None, None]
    row_index = torch.arange(rows)
    for i in range(len(keys)):
        x = decode_layer(x, step_rotations, row_index, positions, visible, keys[i].shape[2], keys[i], values[i],
                         picked(layers, i), heads, eps)  # fmt: skip
    return head(torch.nn.functional.rms_norm(x, norm.shape, norm, eps)).float()


def stacked(trees: list, memo: dict):
    """Equally shaped nested tuples of tensors, one per layer, as one nested tuple of [layer, ...] tensors. The
    same tensors stacked again (``memo``) give the same stack: with the adapter and without share the weights."""
    import torch

    if isinstance(trees[0], tuple):
        if any(not isinstance(tree, tuple) or len(tree) != len(trees[0]) for tree in trees):
            raise ValueError("the layers differ")
        return tuple(stacked([tree[j] for tree in trees], memo) for j in range(len(trees[0])))
    if any(tree.shape != trees[0].shape or tree.dtype != trees[0].dtype for tree in trees):
        raise ValueError("the layers' weights differ in shape or type")
    key = tuple(map(id, trees))
    if key not in memo:
        memo[key] = torch.stack(trees)
    return memo[key]


def with_zero_adapters(parts: list) -> list:
    """Each layer's ``Layer.parts`` with an adapter on each matrix that has one in any layer: zeros, which add
    nothing, where a layer has none (``--lora_top_layers``), so that every layer stacks alike."""
    import torch

    adapters = [max((layer[j][1] for layer in parts), key=len) for j in range(2, len(parts[0]))]
    return [(*layer[:2], *((weight, lora or tuple(map(torch.zeros_like, adapter)))
                           for (weight, lora), adapter in zip(layer[2:], adapters, strict=True)))
            for layer in parts]  # fmt: skip


def picked(tree, i: int):
    """Layer ``i``'s tensors from ``stacked``."""
    return tuple(picked(t, i) for t in tree) if isinstance(tree, tuple) else tree[i]


class LlamaDecoder:
    """Decode up to ``max_rows`` sequences of one Llama model together (see the module docstring).

    ``model``: a Llama, or a PEFT LoRA model on one; it is read once (later changes do not reach the decoder).
    ``adapter``: whether this decoder applies the LoRA adapter; ``without_adapter()`` gives the other view, which
    shares the weights and the compiled step but has a cache of its own (its rows decode beside the policy's, one
    step each in turn; not from two threads at once)."""

    def __init__(self, model, weight_format: str = "int4", max_rows: int = 8):
        import torch

        self.adapter = is_peft(model)
        model = model.get_base_model() if self.adapter else model
        if weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"weight format must be one of {list(WEIGHT_FORMATS)}; got {weight_format!r}")
        reason = supports(model)
        if reason:
            raise ValueError(f"LlamaDecoder cannot run this model: {reason}")
        config = model.config
        self.format = weight_format
        # int4 attends in bf16 (its KV cache too: half the bytes to read per step at long contexts)
        self.attention_dtype = torch.bfloat16 if weight_format == "int4" else torch.float32
        self.max_rows = max_rows
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.max_positions = config.max_position_embeddings
        with torch.no_grad():
            self.embed = model.get_input_embeddings().weight.detach().float()  # shared with the model if fp32
            self.layers = [Layer(layer, weight_format, self.head_dim) for layer in model.model.layers]
            self.norm = model.model.norm.weight.detach().float().clone()
            head_format = "q8" if weight_format == "int4" else weight_format  # logits need more than 4 bits
            self.lm_head = PackedLinear(model.get_output_embeddings().weight, head_format)
        cos, sin = model.model.rotary_emb(self.embed[:1], torch.arange(self.max_positions)[None])
        half = self.head_dim // 2
        self.rotations = torch.complex(cos[0, :, :half].float(), sin[0, :, :half].float())  # [position, half]
        self.keys: list = []  # per layer: [row, kv_head, position, head_dim]
        self.values: list = []
        self._first_rows_made: tuple | None = None  # (the cache it views, keys, values): see _first_rows
        self.lengths: list[int] = []  # tokens cached per row; a row's next position
        self.has_adapter = self.adapter  # a view without it still has one
        self._compiled = {"step": None}  # shared with the views: compiling one compiles all

    def compile(self) -> float:
        """Compile ``decode_step`` (with the adapter and without) for one row and for several (a second graph,
        dynamic in their number), then decode with it in every view; return the seconds it took. 8 rows decoded
        in 13.6 ms a step compiled against 17.3 eager here (``attend``). The compiling runs on a scratch cache, so
        another thread can go on decoding (eagerly) meanwhile. Inductor's C++ wrapper calls the fused kernels
        without Python in between; its on-disk cache makes a second start much faster than the first."""
        import copy
        import time

        import torch

        started = time.perf_counter()
        step = torch.compile(decode_step, dynamic=False, fullgraph=True, options={"cpp_wrapper": True},
                             recompile_limit=64)  # fmt: skip
        adapters = {False, self.has_adapter}
        try:
            memo = {}
            parts = {a: stacked(with_zero_adapters([layer.parts[a, False] for layer in self.layers]), memo)
                     for a in adapters}  # fmt: skip
        except ValueError as error:
            raise ValueError(f"compile() needs every layer alike; decode eagerly: {error}") from error
        compiled = {"step": step, "parts": parts}
        scratch = copy.copy(self)
        scratch.keys, scratch.values, scratch.lengths, scratch._compiled = [], [], [], compiled
        scratch._first_rows_made = None
        for adapter in adapters:
            scratch.adapter = adapter
            scratch.reset()
            scratch.prefill([0])
            scratch.decode([0])
            if self.max_rows > 1:
                scratch.prefill([0])
                scratch.decode([0, 0])
        self._compiled.update(step=step, parts=parts)
        return time.perf_counter() - started

    def without_adapter(self) -> LlamaDecoder:
        import copy

        view = copy.copy(self)
        view.adapter = False
        view.keys, view.values, view.lengths, view._first_rows_made = [], [], [], None
        return view

    # --- cache rows ---

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def reset(self) -> None:
        self.lengths = []
        self._fit_length()

    def _ensure_capacity(self, rows: int, length: int) -> None:
        """Grow the cache to hold ``rows`` rows of ``length`` positions: rows double, lengths grow by ``MIN_CACHE``
        (the compiled step attends over the whole length, masked: doubling left up to half of it unused, and at
        1,152 tokens attended 2,048). A quiet server keeps a small cache; copies on growth stay rare."""
        have = tuple(self.keys[0].shape[::2]) if self.keys else (0, 0)  # (rows, length)
        if rows <= have[0] and length <= have[1]:
            return
        # at least 2 rows where several may come: the compiled one-row step then always sees a cache of 2 or more
        # rows (a 1-row cache would be another graph, compiled at a visitor's first request)
        want = [max(min(2, self.max_rows), have[0]), max(MIN_CACHE, have[1])]
        while want[0] < rows:
            want[0] = min(2 * want[0], self.max_rows)
        while want[1] < length:
            want[1] += MIN_CACHE
        self._resize(*want)

    def _fit_length(self) -> None:
        """Shrink the cache's length to what its rows need (in ``MIN_CACHE`` steps) once a long row has left: the
        compiled step attends over all of it, and after one 1,024-token request 8 streams ran 344 tok/s instead
        of 567."""
        import math

        if self.keys:
            need = MIN_CACHE * max(1, math.ceil((max(self.lengths, default=0) + 1) / MIN_CACHE))
            if need < self.keys[0].shape[2]:
                self._resize(self.keys[0].shape[0], need)

    def _resize(self, rows: int, length: int) -> None:
        """Replace each layer's cache with one of ``rows`` rows and ``length`` positions, keeping what fits."""
        import torch

        have = tuple(self.keys[0].shape[::2]) if self.keys else (0, 0)
        kept_rows, kept_length = min(rows, have[0]), min(length, have[1])
        self._first_rows_made = None  # views of the caches replaced below
        for cache in (self.keys, self.values):
            for i in range(len(self.layers)):
                new = torch.zeros(rows, self.kv_heads, length, self.head_dim, dtype=self.attention_dtype)
                torch._dynamo.mark_dynamic(new, 2)  # for the compiled step: one graph for every length,
                if rows > 1:
                    torch._dynamo.mark_dynamic(new, 0)  # and for every number of rows from 2
                if i < len(cache):
                    new[:kept_rows, :, :kept_length] = cache[i][:kept_rows, :, :kept_length]
                    cache[i] = new
                else:
                    cache.append(new)

    def remove_row(self, row: int) -> None:
        """Drop a row; the last row moves into its place (the caller reorders its own list the same way)."""
        last = self.rows - 1
        if row != last:
            n = self.lengths[last]
            for cache in (*self.keys, *self.values):
                cache[row, :, :n] = cache[last, :, :n]
            self.lengths[row] = n
        self.lengths.pop()
        self._fit_length()

    # --- the model ---

    def _rms(self, x, weight):
        import torch

        return torch.nn.functional.rms_norm(x, weight.shape, weight, self.eps)

    def prefill(self, token_ids: list[int]):
        """Add a row holding ``token_ids``; return the logits [vocab] for the token after them."""
        return self.prefill_rows([token_ids])[0]

    def prefill_rows(self, prompts: list[list[int]]):
        """Add a row for each of ``prompts``; return the logits [prompts, vocab] for the token after each.

        The prompts' tokens go through each matmul together (one weight read for all); attention is per prompt."""
        import torch

        if self.rows + len(prompts) > self.max_rows:
            free = self.max_rows - self.rows
            raise ValueError(f"all {self.max_rows} rows are in use" if not free else
                             f"{len(prompts)} prompts do not fit in the {free} free rows")  # fmt: skip
        sizes = [len(ids) for ids in prompts]
        self._ensure_capacity(self.rows + len(prompts), max(sizes))
        with torch.no_grad():
            x = self._hidden_states(prompts, cache_from_row=self.rows)
            logits = self.lm_head(x[torch.tensor(sizes).cumsum(0) - 1]).float()
        self.lengths += sizes
        return logits

    def completion_logps(self, sequences: list[tuple[list[int], list[int]]]) -> list[float]:
        """Sum of log p(completion tokens | prompt) for each ``(prompt_ids, completion_ids)`` (each completion at
        least one token), as ``dpo_space.scoring.completion_logps`` computes it with the model, through this
        decoder's weights. The KV cache is neither read nor written: the rows being decoded stay as they are. The
        output layer runs in fp32 at the completion positions: a log-softmax needs every logit, not only the best
        ones exact."""
        import torch

        if any(not prompt or not completion for prompt, completion in sequences):
            raise ValueError("each sequence needs a prompt and a completion of at least one token")
        with torch.no_grad():
            x = self._hidden_states([prompt + completion for prompt, completion in sequences])
            ends = torch.tensor([len(p) + len(c) for p, c in sequences]).cumsum(0)
            at = torch.cat([torch.arange(end - len(c) - 1, end - 1)
                            for (_, c), end in zip(sequences, ends.tolist(), strict=True)])  # fmt: skip
            targets = torch.tensor([token for _, completion in sequences for token in completion])
            x = x[at].float()
            (head_t,), _ = self.lm_head.parts(adapter=False, dense=True)  # [in, vocab]: fp32, or Q8_0's as bf16
            # a slice of the vocabulary at a time in fp32: no second whole copy of the output layer
            logits = torch.cat([x @ part.float() for part in head_t.split(8192, dim=1)], dim=-1)
            token_logps = logits[torch.arange(len(targets)), targets] - logits.logsumexp(dim=-1)
        return [part.sum().item() for part in token_logps.split([len(c) for _, c in sequences])]

    def _hidden_states(self, sequences: list[list[int]], cache_from_row: int | None = None):
        """The final normed hidden states [total tokens, hidden] of ``sequences``, each attending to itself only
        (causally); with ``cache_from_row``, each sequence's keys and values fill the cache from that row on."""
        import torch

        for ids in sequences:
            if not 0 < len(ids) <= self.max_positions:
                raise ValueError(f"a sequence must have 1 to {self.max_positions} tokens; got {len(ids)}")
        sizes = [len(ids) for ids in sequences]
        total = sum(sizes)
        x = self.embed[torch.tensor([token for ids in sequences for token in ids])]  # [total, hidden]
        rotations = self.rotations[torch.cat([torch.arange(n) for n in sizes])][:, None]  # [total, 1, half]
        dense = self.layers[0].qkv.dense_for(total)
        for i, layer in enumerate(self.layers):
            input_norm, post_norm, qkv, out, gate_up, down = layer.parts[self.adapter, dense]
            qk, v = attention_inputs(x, rotations, input_norm, qkv, self.heads, self.head_dim, self.eps)
            qk = qk.transpose(0, 1).to(self.attention_dtype)  # [heads + kv_heads, total, head_dim]
            v = v.reshape(total, self.kv_heads, self.head_dim).transpose(0, 1).to(self.attention_dtype)
            per_sequence = zip(*(t.split(sizes, dim=1) for t in (qk[: self.heads], qk[self.heads :], v)), strict=True)
            attended = []
            for index, (q, k, v) in enumerate(per_sequence):
                if cache_from_row is not None:
                    self.keys[i][cache_from_row + index, :, : k.shape[1]] = k
                    self.values[i][cache_from_row + index, :, : k.shape[1]] = v
                attended.append(torch.nn.functional.scaled_dot_product_attention(
                    q[None], k[None], v[None], is_causal=True, enable_gqa=True)[0])  # fmt: skip
            attended = torch.cat(attended, dim=1).transpose(0, 1).reshape(total, self.heads * self.head_dim)
            x = feed_forward(x + matmul(attended, *out), post_norm, gate_up, down, self.eps)
        return self._rms(x, self.norm)

    def decode(self, token_ids: list[int]):
        """Feed each row its next token (one per row, in row order); return the logits [rows, vocab]."""
        import torch

        rows = self.rows
        assert len(token_ids) == rows, (len(token_ids), rows)
        positions = torch.tensor(self.lengths)
        width = int(positions.max()) + 1
        if width > self.max_positions:
            raise ValueError(f"a sequence would exceed the model's {self.max_positions} positions")
        self._ensure_capacity(rows, width)
        with torch.no_grad():
            # from DENSE_ROWS rows on, the eager step's bf16 matrices beat the compiled step's int4 kernel
            if self._compiled["step"] is not None and not self.layers[0].qkv.dense_for(rows):
                logits = self._decode_compiled(token_ids, positions)
            else:
                logits = self._decode_eager(token_ids, positions, width)
        self.lengths = [n + 1 for n in self.lengths]
        return logits

    def _decode_eager(self, token_ids: list[int], positions, width: int):
        import torch

        rows = len(token_ids)
        if rows == 1:  # plain indexing writes one row's cache; it sees all of it (SDPA unmasked)
            row_index, where, visible = 0, self.lengths[0], None
        else:
            row_index, where = torch.arange(rows), positions
            visible = (torch.arange(width)[None] <= positions[:, None])[:, None, None]
        x = self.embed[torch.tensor(token_ids)]  # [rows, hidden]
        rotations = self.rotations[positions][:, None]  # [rows, 1, half]
        dense = self.layers[0].qkv.dense_for(rows)
        for i, layer in enumerate(self.layers):
            x = decode_layer(x, rotations, row_index, where, visible, width, self.keys[i], self.values[i],
                             layer.parts[self.adapter, dense], self.heads, self.eps)  # fmt: skip
        return self.lm_head(self._rms(x, self.norm)).float()

    def _decode_compiled(self, token_ids: list[int], positions):
        """The compiled ``decode_step``. One row decodes on views of the cache's first row (one graph whatever the
        cache's number of rows); several on the caches, their number of rows dynamic (one graph for 2 to
        ``max_rows`` rows). Both are dynamic in the cache's length."""
        import torch

        token_ids = torch.tensor(token_ids)
        if len(token_ids) > 1:
            keys, values = self.keys, self.values
            for tensor in (token_ids, positions):
                torch._dynamo.mark_dynamic(tensor, 0)
        else:
            keys, values = self._first_rows()
        return self._compiled["step"](token_ids, positions, self.embed, self.rotations, self.norm,
                                      self._compiled["parts"][self.adapter], keys, values, self.lm_head, self.heads,
                                      self.eps)  # fmt: skip

    def _first_rows(self) -> tuple[list, list]:
        """Each layer's keys and values as a one-row cache, what the compiled graph takes: views of their first
        row, made once per cache (not once per token)."""
        import torch

        made = self._first_rows_made
        if made is None or made[0] is not self.keys[0]:
            # views even of a one-row cache: the graph's guards tell a view from its base, and a graph compiled on
            # one would be compiled again (a minute) for the other at a visitor's first request
            keys, values = [k[:1] for k in self.keys], [v[:1] for v in self.values]
            for cache in (*keys, *values):
                torch._dynamo.mark_dynamic(cache, 2)
            made = self._first_rows_made = (self.keys[0], keys, values)
        return made[1], made[2]
