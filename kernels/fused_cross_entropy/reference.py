"""The LM head and cross entropy as the unfused training step computes them: the whole [tokens, vocab] logits,
then the loss in fp32. The reference the chunked form is checked against (call it with float64 tensors)."""
import torch
import torch.nn.functional as F


def linear_cross_entropy_reference(hidden, weight, target, ignore_index: int = -100, reduction: str = "sum"):
    logits = hidden @ weight.T
    acc = torch.promote_types(logits.dtype, torch.float32)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).to(acc), target.reshape(-1),
                           ignore_index=ignore_index, reduction=reduction)
