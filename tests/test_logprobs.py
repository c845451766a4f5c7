"""Tokenization, batching and answer log-probs on a tiny random Llama."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from dpoflow.models.logprobs import (
    collate,
    pair_batch,
    sequence_logps,
    split_pair_logps,
    tokenize_example,
)

VOCAB = 97
PAD, BOS, EOS = 0, 1, 2


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    # "<pad>"=0, "<s>"=1, "</s>"=2, "<unk>"=3, then w0..w92: word "wK" has id K + 4.
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": 3}
    vocab.update({f"w{k}": k + 4 for k in range(VOCAB - 4)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    return LlamaForCausalLM(config).eval()


def _words(*ks: int) -> str:
    return " ".join(f"w{k}" for k in ks)


def _ids(*ks: int) -> list[int]:
    return [k + 4 for k in ks]


def _reference_logps(model: LlamaForCausalLM, batch: dict[str, torch.Tensor]) -> list[float]:
    """Plain float64: full logits, log_softmax, then a loop over the answer tokens."""
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        logits = model64(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits  # [N, T, V] float64
    log_probs = torch.log_softmax(logits, dim=-1)  # [N, T, V]
    totals = []
    for row in range(batch["input_ids"].shape[0]):
        total = 0.0
        for t in range(1, batch["input_ids"].shape[1]):
            if batch["loss_mask"][row, t]:
                total += log_probs[row, t - 1, batch["input_ids"][row, t]].item()
        totals.append(total)
    return totals


def _examples(tokenizer) -> list[tuple[list[int], list[int]]]:
    texts = [
        (_words(5, 6, 7), _words(8, 9)),
        (_words(10), _words(11, 12, 13, 14, 15)),
        (_words(*range(20, 30)), _words(40)),
    ]
    return [
        tokenize_example(tokenizer, p, a, max_length=32, max_prompt_length=16) for p, a in texts
    ]


# ---------------------------------------------------------------- tokenization


def test_tokenize_example_adds_bos_and_eos(tokenizer):
    prompt_ids, answer_ids = tokenize_example(
        tokenizer, _words(5, 6), _words(7), max_length=16, max_prompt_length=8
    )
    assert prompt_ids == [BOS, *_ids(5, 6)]
    assert answer_ids == [*_ids(7), EOS]


def test_prompt_truncation_keeps_the_end_and_bos(tokenizer):
    prompt_ids, _ = tokenize_example(
        tokenizer, _words(*range(10)), _words(50), max_length=16, max_prompt_length=4
    )
    assert prompt_ids == [BOS, *_ids(7, 8, 9)]


def test_answer_truncation_respects_max_length(tokenizer):
    prompt_ids, answer_ids = tokenize_example(
        tokenizer, _words(1, 2), _words(*range(30, 40)), max_length=6, max_prompt_length=4
    )
    assert prompt_ids == [BOS, *_ids(1, 2)]
    assert answer_ids == _ids(30, 31, 32)  # the start of the answer survives; eos is cut


def test_tokenize_example_rejects_impossible_lengths(tokenizer):
    with pytest.raises(ValueError, match="max_prompt_length"):
        tokenize_example(tokenizer, "w1", "w2", max_length=4, max_prompt_length=4)


# ---------------------------------------------------------------- batching


def test_collate_masks(tokenizer):
    examples = _examples(tokenizer)
    batch = collate(examples, PAD)
    width = max(len(p) + len(a) for p, a in examples)
    assert batch["input_ids"].shape == (3, width) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].dtype == torch.long and batch["loss_mask"].dtype == torch.bool
    for row, (prompt_ids, answer_ids) in enumerate(examples):
        n = len(prompt_ids) + len(answer_ids)
        assert batch["input_ids"][row, :n].tolist() == prompt_ids + answer_ids
        assert batch["input_ids"][row, n:].eq(PAD).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        # The loss mask covers exactly the answer tokens, eos included.
        assert batch["input_ids"][row][batch["loss_mask"][row]].tolist() == answer_ids
        assert answer_ids[-1] == EOS


def test_pair_batch_puts_chosen_first(tokenizer):
    pairs = [
        ([BOS, *_ids(1)], _ids(2) + [EOS], _ids(3, 4) + [EOS]),
        ([BOS, *_ids(5, 6)], _ids(7) + [EOS], _ids(8) + [EOS]),
    ]
    batch = pair_batch(pairs, PAD)
    answers = [batch["input_ids"][i][batch["loss_mask"][i]].tolist() for i in range(4)]
    assert answers == [pairs[0][1], pairs[1][1], pairs[0][2], pairs[1][2]]
    chosen, rejected = split_pair_logps(torch.arange(4))
    assert chosen.tolist() == [0, 1] and rejected.tolist() == [2, 3]
    with pytest.raises(ValueError, match="even"):
        split_pair_logps(torch.arange(3))


# ---------------------------------------------------------------- log-probs


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_sequence_logps_matches_float64_reference(model, tokenizer, chunk_size):
    batch = collate(_examples(tokenizer), PAD)
    with torch.no_grad():
        out = sequence_logps(model, batch, chunk_size=chunk_size)
    expected = torch.tensor(_reference_logps(model, batch), dtype=torch.float64)
    torch.testing.assert_close(out["logps"].double(), expected, rtol=0, atol=1e-5)
    assert out["n_tokens"].tolist() == [len(a) for _, a in _examples(tokenizer)]


def test_without_gradients_the_logits_are_made_a_bounded_block_at_a_time(
    model, tokenizer, monkeypatch
):
    """The reference stage and evaluations take no gradient: nothing keeps the logits, so the
    head runs on a few answer tokens at a time (a 152k vocabulary made ~25 GB at once on a
    GPU), with the log-probs of one block; with gradients the head runs once."""
    from dpoflow.models import logprobs

    batch = collate(_examples(tokenizer), PAD)
    head_rows: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: head_rows.append(args[0].shape[:-1].numel())
    )
    try:
        whole = sequence_logps(model, batch)["logps"].detach()
        assert len(head_rows) == 1
        n_tokens = head_rows.pop()
        monkeypatch.setattr(logprobs, "NO_GRAD_LOGITS_BYTES", 3 * 4 * VOCAB)  # 3 tokens' logits
        with torch.no_grad():
            blocks = sequence_logps(model, batch)["logps"]
    finally:
        hook.remove()
    assert max(head_rows) == 3 and sum(head_rows) == n_tokens
    torch.testing.assert_close(blocks, whole, rtol=0, atol=1e-5)


def test_sequence_logps_float64_model_is_exact(model, tokenizer):
    batch = collate(_examples(tokenizer), PAD)
    with torch.no_grad():
        out = sequence_logps(copy.deepcopy(model).double(), batch)
    assert out["logps"].dtype == torch.float64
    expected = torch.tensor(_reference_logps(model, batch), dtype=torch.float64)
    torch.testing.assert_close(out["logps"], expected, rtol=0, atol=1e-10)


def test_logits_mean_is_the_mean_answer_logit(model, tokenizer):
    batch = collate(_examples(tokenizer), PAD)
    with torch.no_grad():
        out = sequence_logps(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for row in range(3):
        positions = batch["loss_mask"][row, 1:].nonzero()[:, 0]  # predict tokens 1..T-1
        expected = logits[row, positions].mean().item()
        assert math.isclose(out["logits_mean"][row].item(), expected, abs_tol=1e-5)


def test_padding_does_not_change_logps(model, tokenizer):
    examples = _examples(tokenizer)
    with torch.no_grad():
        together = sequence_logps(model, collate(examples, PAD))["logps"]
        alone = torch.cat([sequence_logps(model, collate([ex], PAD))["logps"] for ex in examples])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)


def test_full_logits_fallback_agrees(model, tokenizer):
    """A model without a separable body/head goes through the full-logits path."""
    batch = collate(_examples(tokenizer), PAD)
    with torch.no_grad():
        direct = sequence_logps(model, batch)["logps"]
        fallback = sequence_logps(Wrapped(model), batch)["logps"]
    torch.testing.assert_close(direct, fallback, rtol=0, atol=1e-5)


def test_gradients_flow_through_logps(model, tokenizer):
    trainable = copy.deepcopy(model)
    out = sequence_logps(trainable, collate(_examples(tokenizer), PAD))
    out["logps"].sum().backward()
    assert trainable.lm_head.weight.grad is not None
    assert trainable.model.embed_tokens.weight.grad.abs().sum() > 0


class Wrapped(torch.nn.Module):
    """A model without a separable body/head: sequence_logps takes its full-logits path."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **kwargs):
        return self.inner(**kwargs)


@pytest.mark.parametrize("path", ["answer positions", "full logits"])
def test_gradients_match_plain_autograd_in_float64(model, tokenizer, path):
    """The hand-written backward of the answer-token log-probs against autograd's own, through
    log_softmax + gather, on the same float64 model: every parameter's gradient agrees."""
    batch = collate(_examples(tokenizer), PAD)
    ours, plain = copy.deepcopy(model).double(), copy.deepcopy(model).double()
    weights = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)  # any upstream gradient
    run = ours if path == "answer positions" else Wrapped(ours)
    (sequence_logps(run, batch, chunk_size=2)["logps"] * weights).sum().backward()

    logits = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])
    per_row = (token_logps[..., 0] * batch["loss_mask"][:, 1:]).sum(dim=1)  # [N]
    (per_row * weights).sum().backward()

    for (name, p_ours), p_plain in zip(ours.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p_ours.grad, p_plain.grad, rtol=1e-9, atol=1e-12, msg=name)
    assert ours.lm_head.weight.grad.abs().sum() > 0


def test_a_lora_model_runs_its_head_at_the_answer_positions_only(model, tokenizer):
    """peft's wrapper hides the body/head split (its `.model` is the whole causal LM); the
    adapted model must still score through its body and run the head on the answer positions
    only, with the log-probs and the adapters' gradients of a plain float64 computation."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    # init_lora_weights=False: B starts random, so the adapters change the log-probs.
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    adapted = get_peft_model(copy.deepcopy(model).double(), config)
    plain = copy.deepcopy(adapted)
    batch = collate(_examples(tokenizer), PAD)
    head_rows = []
    adapted.get_output_embeddings().register_forward_hook(
        lambda module, args, out: head_rows.append(args[0].shape[:-1].numel())  # positions
    )
    weights = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)  # any upstream gradient
    out = sequence_logps(adapted, batch)
    assert head_rows == [int(out["n_tokens"].sum())]  # not every position of the batch
    (out["logps"] * weights).sum().backward()

    # The plain computation: the adapted model's full logits, log_softmax, gather, autograd.
    logits = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])
    expected = (token_logps[..., 0] * batch["loss_mask"][:, 1:]).sum(dim=1)  # [N]
    (expected * weights).sum().backward()
    torch.testing.assert_close(out["logps"], expected.detach(), rtol=0, atol=1e-10)

    adapters = [(n, p) for n, p in adapted.named_parameters() if p.requires_grad]
    assert adapters and all("lora_" in n for n, _ in adapters)
    theirs_all = [p for p in plain.parameters() if p.requires_grad]
    for (name, ours), theirs in zip(adapters, theirs_all, strict=True):
        assert ours.grad.abs().sum() > 0, name
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_reference_logps_are_stored_in_file_order_and_match_float64(model, tokenizer, tmp_path):
    """The reference stage batches pairs by length; what it stores is each pair's own
    log-probs, in the file's order, equal to a plain float64 computation."""
    import json

    from dpoflow.models.reference import compute_reference_logps

    lengths = [7, 1, 12, 3, 9, 2, 5]  # answer lengths, so that sorting reorders the pairs
    pairs = [
        {
            "id": f"pair-{i}",
            "prompt": _words(i, i + 1),
            "chosen": _words(*range(10, 10 + n)),
            "rejected": _words(*range(50, 50 + (n % 4) + 1)),
        }
        for i, n in enumerate(lengths)
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")

    stored = compute_reference_logps(
        str(tmp_path / "model"),
        tmp_path / "pairs.jsonl",
        max_length=32,
        max_prompt_length=8,
        batch_size=3,
    )
    assert stored["ids"] == [p["id"] for p in pairs]
    for i, p in enumerate(pairs):
        prompt_ids, chosen_ids = tokenize_example(
            tokenizer, p["prompt"], p["chosen"], max_length=32, max_prompt_length=8
        )
        _, rejected_ids = tokenize_example(
            tokenizer, p["prompt"], p["rejected"], max_length=32, max_prompt_length=8
        )
        expected = _reference_logps(
            model, collate([(prompt_ids, chosen_ids), (prompt_ids, rejected_ids)], PAD)
        )
        assert stored["chosen"][i].item() == pytest.approx(expected[0], abs=1e-4)
        assert stored["rejected"][i].item() == pytest.approx(expected[1], abs=1e-4)


def test_stored_reference_logps_pair_up_with_a_file_without_ids(tmp_path):
    """The bench's and a user's pairs may carry no `id`: rows are keyed by their number, and
    the trainer reads them back in its own order by the same keys."""
    from dpoflow.models.reference import pair_ids
    from dpoflow.models.trainer import load_reference_logps

    pairs = [{"prompt": "a", "chosen": "b", "rejected": "c"} for _ in range(3)]
    assert pair_ids(pairs) == ["row-0", "row-1", "row-2"]
    assert pair_ids([{"id": "x"}, {"id": 7}]) == ["x", "7"]
    stored = {
        "ids": pair_ids(pairs),
        "chosen": torch.tensor([1.0, 2.0, 3.0]),
        "rejected": torch.tensor([-1.0, -2.0, -3.0]),
    }
    path = tmp_path / "ref.pt"
    torch.save(stored, path)
    back = load_reference_logps(str(path), pairs)
    assert back["chosen"].tolist() == [1.0, 2.0, 3.0]
    assert back["rejected"].tolist() == [-1.0, -2.0, -3.0]
