"""One decoding step of GLA's token mixer in PyTorch: the composition the model runs token by token.

From the QKVU projection of one token, qkvu [B, 4 * hidden] = [q | k | v | u] (hidden = H * E):

    q, k = act(q), act(k)                                       per head, [B, H, E]
    q, k = [q cos(theta p), q sin(theta p)], same for k         LRPE-d (optional): Dk = 2E, p = the row's position
    S <- exp(-slope) S + k^T v,   o = q S                       S [B, H, Dk, E] fp32
    y = srms_norm(o) * u                                        over the whole hidden dim (optional)

Each intermediate is rounded to qkvu's dtype where the model's composition rounds it (activation, LRPE, o), the
state and the products are fp32 (float64 inputs: float64 throughout, the reference the tests use).
"""
import torch
import torch.nn.functional as F

from ..lightning_attention.recurrent import lightning_attention_step
from ..srmsnorm.reference import srms_norm_reference

ACTIVATIONS = ("silu", "1+elu", "none")


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return F.silu(x)
    if name == "1+elu":
        return 1 + F.elu(x)
    if name == "none":
        return x
    raise ValueError(f"unknown q/k activation {name!r}; expected one of {ACTIVATIONS}")


def lrpe(x: torch.Tensor, theta: torch.Tensor, positions) -> torch.Tensor:
    """x [B, H, E] at positions (an int, or a tensor [B]) -> [B, H, 2E]; angles in at least fp32."""
    acc = torch.promote_types(x.dtype, torch.float32)
    theta = theta.to(acc).reshape(x.shape[1], x.shape[2])
    if torch.is_tensor(positions):
        pos = positions.to(device=x.device, dtype=acc)
    else:
        pos = torch.full((x.shape[0],), positions, device=x.device, dtype=acc)
    angle = pos[:, None, None] * theta
    xf = x.to(acc)
    return torch.cat([xf * torch.cos(angle), xf * torch.sin(angle)], dim=-1).to(x.dtype)


def check_with_sumsq(with_sumsq: bool, norm_eps, where: str):
    """The step hands on o's sums of squares only where it returns o itself (without the output norm)."""
    if with_sumsq and norm_eps is not None:
        raise ValueError(f"{where}: with_sumsq returns o's sums of squares; with norm_eps the step returns the "
                         f"normalised o instead")


def gla_decode_step_reference(qkvu, state, slope, positions=0, theta=None, act: str = "silu", norm_eps=None,
                              in_place: bool = False):
    """Returns (y [B, hidden] in qkvu's dtype, new state fp32). ``state`` [B, H, Dk, E]; ``theta`` (LRPE's
    frequencies, H * E values) or None; ``norm_eps``: None gives o itself, else srms_norm(o, norm_eps) * u.
    ``in_place`` writes the new state into ``state`` (and returns it)."""
    b, h, e = state.shape[0], state.shape[1], state.shape[-1]
    q, k, v, u = qkvu.chunk(4, dim=-1)
    q, k, v = (t.reshape(b, h, e) for t in (q, k, v))
    q, k = activation(act, q), activation(act, k)
    if theta is not None:
        q, k = lrpe(q, theta, positions), lrpe(k, theta, positions)
    o, new_state = lightning_attention_step(q, k, v, slope, state)
    o = o.reshape(b, h * e)
    y = o if norm_eps is None else srms_norm_reference(o, norm_eps) * u
    if in_place:
        state.copy_(new_state)
        new_state = state
    return y, new_state
