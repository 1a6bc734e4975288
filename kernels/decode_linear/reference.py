"""What a decoding layer does around its token and channel mixers, as the model composes it in PyTorch: one
function for the four linear layers of a block (QKVU, W_o, the SGLU pair, W_3) with what comes before and after
each of them, and the scaled embedding lookup before the first block."""
import torch.nn.functional as F

from ..srmsnorm.reference import srms_norm_reference


def decode_linear_reference(x, weight, norm_eps=None, gate=None, weight2=None, residual=None):
    """y = linear(h, weight), h = x, then in this order (each optional):
    h = srms_norm(h, norm_eps); h = h * gate; y = y * linear(h, weight2) (SGLU's product); y = residual + y.
    x [B, K], weight and weight2 [N, K], gate like x, residual [B, N]; every tensor in one dtype, each op rounded
    to it as the model's composition rounds (the norm in fp32, then cast)."""
    h = x
    if norm_eps is not None:
        h = srms_norm_reference(h, norm_eps)
    if gate is not None:
        h = h * gate
    y = F.linear(h, weight)
    if weight2 is not None:
        y = y * F.linear(h, weight2)
    if residual is not None:
        y = residual + y
    return y


def decode_embedding_reference(weight, tokens, scale: float = 1.0):
    """The embedding rows of tokens [B, 1] (weight [vocab, d]) times scale: [B, 1, d] in weight's dtype, the product
    rounded to it (the model's nn.Embedding then ``* embed_scale``)."""
    return F.embedding(tokens, weight) * scale
