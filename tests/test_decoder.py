"""The serving decoder: its cache bookkeeping against transformers' own forward, and how close int4 stays."""

import json

import pytest
import torch

from dpo_space.cpu.decoder import MIN_CACHE, RESCORED, LlamaDecoder, PackedLinear, supports
from tests.conftest import FIXTURE_HH


def full_logits(model, ids: list[int]):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module")
def tiny_model(tiny_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_path).eval()


@pytest.fixture(scope="module")
def embedded_model(embedded_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(embedded_path).eval()


def test_fp32_rows_that_join_and_leave_match_the_model_token_by_token(tiny_model):
    """Rows of different lengths, one joining mid-way and one leaving (the last row moves into its place): every
    row's logits equal a plain forward over that row's whole sequence."""
    decoder = LlamaDecoder(tiny_model, "fp32", max_rows=3)
    sequences = {"a": [5, 17, 300, 42], "b": list(range(100, 360)), "c": [9, 8, 7]}  # "b" outgrows MIN_CACHE
    rows = []

    def check(name, logits):
        expected = full_logits(tiny_model, sequences[name])[-1]
        assert torch.allclose(logits, expected, atol=1e-4), (name, (logits - expected).abs().max())

    for name in ("a", "b"):
        rows.append(name)
        check(name, decoder.prefill(sequences[name]))
    for step in range(6):
        if step == 2:  # "c" joins
            rows.append("c")
            check("c", decoder.prefill(sequences["c"]))
        if step == 4:  # "a" leaves: "c" moves into row 0
            decoder.remove_row(rows.index("a"))
            rows[rows.index("a")] = rows[-1]
            rows.pop()
        tokens = [1000 + 7 * step + i for i in range(len(rows))]
        for name, token in zip(rows, tokens, strict=True):
            sequences[name].append(token)
        logits = decoder.decode(tokens)
        for i, name in enumerate(rows):
            check(name, logits[i])
    assert decoder.lengths == [len(sequences[name]) for name in rows]


def test_the_embedded_models_layers_are_repacked_not_requantized(embedded_model):
    """Its weights come from a Q4_1 GGUF (Q8_0 embeddings): int4 and q8 hold them up to bf16 scales."""
    layer = embedded_model.model.layers[0]
    for weight in (layer.mlp.down_proj.weight, layer.self_attn.q_proj.weight):
        packed = PackedLinear(weight, "int4")
        assert (packed.dense.float() - weight).norm() / weight.norm() < 0.005
        x = torch.randn(3, weight.shape[1])
        kernel, dense = packed(x).float(), x @ packed.dense.float().t()
        assert (kernel - dense).norm() / dense.norm() < 0.01  # the int4 kernel computes the same matrix
    weight = embedded_model.lm_head.weight
    x = torch.randn(3, weight.shape[1])
    exact = x @ weight.detach().t()
    head = PackedLinear(weight, "q8")
    assert (head.dense.float() - weight).norm() / weight.norm() < 0.005
    logits = head(x)  # 3 rows: the int8 kernel, then each row's best candidates rescored
    assert (logits - exact).norm() / exact.norm() < 0.03
    best = exact.topk(RESCORED // 2).indices
    assert torch.allclose(logits.gather(1, best), exact.gather(1, best), rtol=0.01, atol=0.01)
    many = torch.randn(PackedLinear.DENSE_ROWS["q8"], weight.shape[1])  # enough rows for the bf16 matrix
    assert (head(many) - many @ weight.detach().t()).norm() / (many @ weight.detach().t()).norm() < 0.005


def test_int4_predicts_the_fp32_models_next_tokens(embedded_model, embedded_tokenizer):
    """Teacher-forced over HH replies, one decode step a token: measured 97-99% top-1 agreement and a mean KL of
    ~0.0007 nats against transformers' fp32 forward."""
    texts = [json.loads(line)["chosen"] for line in FIXTURE_HH.read_text().splitlines()][:6]
    decoder = LlamaDecoder(embedded_model, "int4")
    agree = total = 0
    kl = 0.0
    for text in texts:
        ids = embedded_tokenizer(text, add_special_tokens=False)["input_ids"][:64]
        expected = torch.log_softmax(full_logits(embedded_model, ids)[7:], -1)
        decoder.reset()
        logits = [decoder.prefill(ids[:8])] + [decoder.decode([token])[0] for token in ids[8:]]
        got = torch.log_softmax(torch.stack(logits), -1)
        agree += (got.argmax(-1) == expected.argmax(-1)).sum().item()
        total += len(expected)
        kl += (expected.exp() * (expected - got)).sum().item()
    assert agree / total >= 0.95 and kl / total < 0.005, (agree / total, kl / total)


def test_long_prompts_take_the_bf16_path_and_agree_with_decoding_them(embedded_model):
    """A prompt of DENSE_ROWS["int4"] tokens or more runs as bf16 matmuls; its last logits match feeding it token
    by token through the int4 kernels."""
    ids = list(range(2000, 2040))
    decoder = LlamaDecoder(embedded_model, "int4")
    prefilled = decoder.prefill(ids)
    decoder.reset()
    decoder.prefill(ids[:1])
    stepped = [decoder.decode([token])[0] for token in ids[1:]][-1]
    assert prefilled.argmax() == stepped.argmax()
    assert torch.nn.functional.cosine_similarity(prefilled, stepped, dim=0) > 0.99


def test_models_it_cannot_run_are_named_with_the_reason():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    assert supports(gpt2) == "model_type is 'gpt2', not 'llama'"
    with pytest.raises(ValueError, match="LlamaDecoder cannot run this model: model_type is 'gpt2'"):
        LlamaDecoder(gpt2)
    with pytest.raises(ValueError, match="weight format must be one of"):
        PackedLinear(torch.zeros(4, 32), "int3")
    with pytest.raises(ValueError, match="int4 needs input sizes divisible by 32; got 40"):
        PackedLinear(torch.zeros(4, 40), "int4")


def test_a_full_cache_and_an_overlong_sequence_are_refused(tiny_model):
    decoder = LlamaDecoder(tiny_model, "fp32", max_rows=1)
    decoder.prefill([1, 2, 3])
    with pytest.raises(ValueError, match="all 1 rows are in use"):
        decoder.prefill([4])
    decoder.reset()
    with pytest.raises(ValueError, match="a sequence must have 1 to 2048 tokens; got 0"):
        decoder.prefill([])


def test_fp32_completion_logps_match_the_models_and_leave_the_cache_alone(tiny_adapter):
    """Scoring through the decoder gives what ``scoring.completion_logps`` gives with the model (policy and
    reference), and a row decoding meanwhile goes on as if nothing had been scored."""
    from dpo_space.models import load_model
    from dpo_space.scoring import completion_logps

    model = load_model(tiny_adapter).model
    policy = LlamaDecoder(model, "fp32", max_rows=2)
    sequences = [([5, 17, 300], [42, 7]), (list(range(100, 130)), [9, 8, 7, 6])]
    with torch.no_grad():
        expected = completion_logps(model, sequences)
        with model.disable_adapter():
            expected_reference = completion_logps(model, sequences)
    policy.prefill([1, 2, 3])
    alone = LlamaDecoder(model, "fp32", max_rows=2)
    alone.prefill([1, 2, 3])
    assert policy.completion_logps(sequences) == pytest.approx(expected, rel=1e-5)
    assert policy.without_adapter().completion_logps(sequences) == pytest.approx(expected_reference, rel=1e-5)
    assert expected != pytest.approx(expected_reference, rel=1e-3)  # the adapter moved the model
    assert policy.lengths == [3] and torch.equal(policy.decode([4]), alone.decode([4]))
    with pytest.raises(ValueError, match="a prompt and a completion of at least one token"):
        policy.completion_logps([([1, 2], [])])


@pytest.mark.slow
def test_int4_keeps_the_lora_adapter_apart_so_the_policy_still_differs_from_its_reference():
    """Merged into 4-bit weights, the shipped adapter's update rounded away (policy and reference gave the same
    replies). Kept apart in fp32 it survives: per token, log pi - log pi_ref from the int4 decoder follows PEFT's
    fp32 forward (measured correlation 0.994, fp32 decoder 1.0)."""
    from dpo_space.models import load_model
    from tests.test_shipped_model import SHIPPED

    loaded = load_model(str(SHIPPED))
    model, tokenizer = loaded.model, loaded.tokenizer
    policy = LlamaDecoder(model, "int4")
    reference = policy.without_adapter()
    expected, got = [], []
    for line in FIXTURE_HH.read_text().splitlines()[:6]:
        ids = tokenizer(json.loads(line)["chosen"], add_special_tokens=False)["input_ids"][:48]
        targets = torch.tensor(ids[1:])
        with torch.no_grad():
            with model.disable_adapter():
                base = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
            tuned = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
        expected.append((tuned - base)[torch.arange(len(targets)), targets])
        rows = []
        for decoder in (policy, reference):
            decoder.reset()
            logits = [decoder.prefill(ids[:1])] + [decoder.decode([token])[0] for token in ids[1:-1]]
            rows.append(torch.log_softmax(torch.stack(logits), -1)[torch.arange(len(targets)), targets])
        got.append(rows[0] - rows[1])
    expected, got = torch.cat(expected), torch.cat(got)
    assert expected.abs().mean() > 0.05  # the adapter does move the model
    assert torch.corrcoef(torch.stack([expected, got]))[0, 1] > 0.95


@pytest.mark.slow
def test_int4_implicit_rewards_follow_the_fp32_models():
    """The Space scores replies (Compare, Judge) through its int4 decoders: log pi - log pi_ref of the shipped
    adapter on HH replies follows PEFT's fp32 forward (measured on these 32: correlation 0.993, mean difference
    0.10 nats against a mean |log pi - log pi_ref| of 1.16; on 80 held-out HH replies the rewards correlated 0.999
    and the verdicts of 38 of 40 pairs agreed)."""
    from dpo_space.models import load_model
    from dpo_space.scoring import completion_logps, tokenize_completion
    from tests.test_shipped_model import SHIPPED

    loaded = load_model(str(SHIPPED))
    model, tokenizer = loaded.model, loaded.tokenizer
    sequences = []
    for line in FIXTURE_HH.read_text().splitlines():
        pair = json.loads(line)
        for text in (pair["chosen"], pair["rejected"]):
            cut = text.rindex("\n\nAssistant:") + len("\n\nAssistant:")
            sequences.append(tokenize_completion(tokenizer, text[:cut], text[cut:]))
    with torch.no_grad():
        expected = torch.tensor(completion_logps(model, sequences))
        with model.disable_adapter():
            expected -= torch.tensor(completion_logps(model, sequences))
    policy = LlamaDecoder(model, "int4")
    got = torch.tensor(policy.completion_logps(sequences)) - torch.tensor(
        policy.without_adapter().completion_logps(sequences)
    )
    assert expected.abs().mean() > 1.0  # the adapter does move these replies' log-probabilities
    assert torch.corrcoef(torch.stack([expected, got]))[0, 1] > 0.98
    assert (expected - got).abs().mean() < 0.15 * expected.abs().mean(), (expected - got).abs().mean()


@pytest.mark.slow
def test_a_compiled_decoder_computes_what_the_eager_one_does(tiny_model):
    """compile(): one graph for a single row's whole step and one for several rows, dynamic in the cache's length
    (it grows past MIN_CACHE here) and in the number of rows; once compiled, no step runs eagerly."""
    eager, compiled = LlamaDecoder(tiny_model, "fp32"), LlamaDecoder(tiny_model, "fp32")
    assert compiled.compile() > 0 and compiled.rows == 0

    def no_eager_step(*args):
        raise AssertionError("a compiled decoder decoded eagerly")

    compiled._decode_eager = no_eager_step
    long_prompt = [(7 * i) % 250 + 3 for i in range(MIN_CACHE - 2)]
    for decoder in (eager, compiled):
        decoder.prefill(long_prompt)
    for step in range(4):  # positions MIN_CACHE - 2 .. MIN_CACHE + 1: the cache grows on the way
        assert torch.allclose(compiled.decode([100 + step])[0], eager.decode([100 + step])[0], atol=1e-4)
    for decoder in (eager, compiled):  # two rows, then three (the cache grows to four)
        decoder.prefill(list(range(40, 60)))
    assert torch.allclose(compiled.decode([5, 6]), eager.decode([5, 6]), atol=1e-4)
    for decoder in (eager, compiled):
        decoder.prefill([9, 10, 11])
    for step in range(2):
        assert torch.allclose(compiled.decode([7, 8, step]), eager.decode([7, 8, step]), atol=1e-4)
    for decoder in (eager, compiled):  # one row left in a cache of four: the graph sees its first row
        decoder.remove_row(0)
        decoder.remove_row(0)
    assert compiled.keys[0].shape[0] == 4
    assert compiled.keys[0].shape[2] == MIN_CACHE  # the long row has left: the length shrank, the short row kept
    expected = full_logits(tiny_model, [*range(40, 60), 6, 8, 8, 200])[-1]
    assert torch.allclose(compiled.decode([200])[0], expected, atol=1e-4)
    assert torch.allclose(eager.decode([200])[0], expected, atol=1e-4)
    for step in range(1, 3):
        assert torch.allclose(compiled.decode([200 + step]), eager.decode([200 + step]), atol=1e-4)


def test_a_decoder_of_one_row_compiles_its_single_row_step(tiny_model):
    decoder = LlamaDecoder(tiny_model, "fp32", max_rows=1)
    decoder.compile()
    decoder.prefill([5, 17, 300])
    assert torch.allclose(decoder.decode([42])[0], full_logits(tiny_model, [5, 17, 300, 42])[-1], atol=1e-4)


def test_int4_rows_decoded_together_agree_with_each_row_alone(embedded_model):
    """Several rows take other paths than one (indexed cache writes, a mask): each row's logits still agree with
    decoding that row alone."""
    prompts = [list(range(300 + 7 * i, 310 + 13 * i)) for i in range(5)]
    steps = [[1000 + 10 * step + i for i in range(len(prompts))] for step in range(3)]
    together = LlamaDecoder(embedded_model, "int4", max_rows=len(prompts))
    for prompt in prompts:
        together.prefill(prompt)
    got = [together.decode(tokens) for tokens in steps][-1]
    alone = LlamaDecoder(embedded_model, "int4", max_rows=1)
    for i, prompt in enumerate(prompts):
        alone.reset()
        alone.prefill(prompt)
        expected = [alone.decode([tokens[i]])[0] for tokens in steps][-1]
        assert got[i].argmax() == expected.argmax()
        assert torch.nn.functional.cosine_similarity(got[i], expected, dim=0) > 0.99


def test_prompts_prefilled_together_match_the_model_and_decode_on(tiny_model):
    """prefill_rows: the prompts share each matmul, attention stays within each: every row's logits equal a plain
    forward over its own sequence, before and after a decoding step."""
    decoder = LlamaDecoder(tiny_model, "fp32", max_rows=4)
    decoder.prefill([3, 4])
    sequences = [[5, 17, 300, 42], list(range(100, 130)), [9]]
    for got, ids in zip(decoder.prefill_rows(sequences), sequences, strict=True):
        assert torch.allclose(got, full_logits(tiny_model, ids)[-1], atol=1e-4)
    step = decoder.decode([7, 8, 9, 10])
    for got, ids, token in zip(step[1:], sequences, [8, 9, 10], strict=True):
        assert torch.allclose(got, full_logits(tiny_model, [*ids, token])[-1], atol=1e-4)
    decoder.remove_row(3)
    with pytest.raises(ValueError, match="2 prompts do not fit in the 1 free rows"):
        decoder.prefill_rows([[1], [2]])


def assert_compiled_views_equal_eager(model):
    """Compiled and eager decoders of a PEFT ``model``: equal logits in each view (with the adapter and without),
    and the adapter does move them."""
    eager, compiled = LlamaDecoder(model, "fp32"), LlamaDecoder(model, "fp32")
    compiled.compile()
    logits = {}
    for name, decoder in [("eager", eager), ("compiled", compiled)]:
        for view in (decoder, decoder.without_adapter()):
            view.reset()
            view.prefill([5, 17, 300, 42])
            logits[name, view.adapter] = torch.stack([view.decode([100 + step])[0] for step in range(3)])
    for adapter in (True, False):
        assert torch.allclose(logits["compiled", adapter], logits["eager", adapter], atol=1e-4)
    assert (logits["eager", True] - logits["eager", False]).abs().max() > 1e-3


@pytest.mark.slow
def test_a_compiled_decoder_applies_an_adapter_on_some_layers_only(tiny_model):
    """``--lora_top_layers``: layers without the adapter get zeros in the stacked step (they add nothing), so the
    compiled step equals the eager one, with the adapter and without."""
    import copy

    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        copy.deepcopy(tiny_model), LoraConfig(r=4, target_modules=["q_proj", "down_proj"], layers_to_transform=[1])
    )
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: an adapter that does nothing would prove nothing
                weight.normal_(std=0.5)
    assert_compiled_views_equal_eager(model)


@pytest.mark.slow
def test_a_compiled_decoder_applies_the_adapter_as_the_eager_one_does(tiny_adapter):
    """One compiled graph with the adapter and one without: each view's logits equal the eager decoder's."""
    from dpo_space.models import load_model

    model = load_model(tiny_adapter).model
    assert_compiled_views_equal_eager(model)


def test_the_policy_and_its_reference_view_decode_in_turn_each_as_alone(tiny_adapter):
    """The view without the adapter has a cache of its own: Compare's two replies decode step by step in turn, and
    each row's logits are those it has decoding alone (several rows of each, so rows and caches cannot mix)."""
    from dpo_space.models import load_model

    policy = LlamaDecoder(load_model(tiny_adapter).model, "fp32")
    reference = policy.without_adapter()
    prompts = [[5, 17, 300, 42], [8, 9]]

    def decode(view, step: int):
        return view.decode([100 + step, 200 + step])

    alone = {}
    for view in (policy, reference):
        view.reset()
        view.prefill_rows(prompts)
        alone[view.adapter] = torch.stack([decode(view, step) for step in range(4)])
    for view in (policy, reference):
        view.reset()
        view.prefill_rows(prompts)
    in_turn = {True: [], False: []}
    for step in range(4):
        for view in (policy, reference):
            in_turn[view.adapter].append(decode(view, step))
    for adapter in (True, False):
        assert torch.allclose(torch.stack(in_turn[adapter]), alone[adapter], atol=1e-5)
    assert (alone[True] - alone[False]).abs().max() > 1e-3
