"""Resident-memory savers for a training step on the CPU, each with the same numbers.

On a CPU the step's peak resident memory is what a user's machine must hold. Two things set it
beyond the live tensors: autograd's out-of-place sum of a tied embedding's two [V, H]
gradients at the end of the backward, and the holes glibc's heap keeps after each step. The
training loop (models/trainer.py) applies both savers below; docs/benchmarks.md gives what
each saved on the 30m benchmark model.
"""

from __future__ import annotations

import torch


class _EmbeddingIntoGrad(torch.autograd.Function):
    """An embedding lookup whose weight gradient is added into ``weight.grad`` row by row.

    Autograd's embedding backward builds a dense [V, H] gradient (zeros except the looked-up
    rows). With tied input and output embeddings the weight also gets the lm head's dense [V, H]
    gradient, and autograd sums the two out of place: three [V, H] tensors at once at the end of
    the backward (190 MB for a 32000 x 512 float32 vocabulary: the step's memory peak). Here the
    backward sums the gradient of each distinct token with the same kernel
    (``embedding_dense_backward``, over the distinct tokens only) and adds those rows into
    ``weight.grad``, which holds the head's gradient by then (untied: zeros). The same gradient
    bit for bit: each row is head + (the same sum over lookups).

    ``weight`` comes in detached: with an autograd edge to the parameter, the head's gradient
    would wait in autograd's buffer until this backward has run. ``anchor`` (an empty tensor
    that requires grad) is the edge that puts this node in the graph.
    """

    @staticmethod
    def forward(ctx, input_ids, weight, anchor, embedding):
        ctx.save_for_backward(input_ids)
        ctx.embedding = embedding
        return torch.nn.functional.embedding(input_ids, weight, embedding.padding_idx)

    @staticmethod
    def backward(ctx, grad_output):
        (input_ids,) = ctx.saved_tensors
        param, padding_idx = ctx.embedding.weight, ctx.embedding.padding_idx
        tokens, rows = torch.unique(input_ids.reshape(-1), return_inverse=True)  # [U], [n]
        pad_row = -1
        if padding_idx is not None and padding_idx >= 0:
            match = (tokens == padding_idx).nonzero()
            pad_row = int(match[0, 0]) if len(match) else -1
        token_grads = torch.ops.aten.embedding_dense_backward(
            grad_output, rows.view_as(input_ids), len(tokens), pad_row, False
        )  # [U, H]
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        param.grad.index_add_(0, tokens, token_grads.to(param.grad.dtype))
        return None, None, None, None


def add_embedding_grads_in_place(model) -> None:
    """Route the input embedding's weight gradient through _EmbeddingIntoGrad.

    Only for a plain fp32 single-process ZeRO-0 run (the caller checks): the gradient lands in
    .grad outside autograd's AccumulateGrad, so gradient hooks (ZeRO-1/2/3, DeepSpeed's bf16 and
    fp16 optimizers) would not see it. A micro-batch that starts with a gradient already there
    (gradient accumulation) takes the ordinary path, so the sums keep autograd's order.
    """
    embedding = model.get_input_embeddings()
    if type(embedding) is not torch.nn.Embedding or embedding.max_norm is not None:
        return
    if embedding.scale_grad_by_freq or embedding.sparse:
        return
    plain_forward = embedding.forward
    anchor = torch.empty(0, requires_grad=True)

    def forward(input_ids):
        weight = embedding.weight
        if not (torch.is_grad_enabled() and weight.requires_grad and weight.grad is None):
            return plain_forward(input_ids)
        return _EmbeddingIntoGrad.apply(input_ids, weight.detach(), anchor, embedding)

    embedding.forward = forward


def heap_trimmer():
    """A function that hands glibc's free heap pages back to the OS (None where unavailable).

    CPU training allocates its activations and gradients (each under glibc's 32 MB mmap limit)
    from one heap; freed in a different order each step, they leave holes that stay resident
    (about 100 MB for a 33 M-parameter model, on top of the live memory). Called once a step,
    between the forward and the backward, malloc_trim releases those holes just before the
    step's memory peak (the backward's first [V, H] gradient); it takes a few milliseconds.
    """
    import ctypes
    import ctypes.util

    if torch.cuda.is_available():
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)
