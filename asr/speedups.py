"""Training-speed switches of :class:`asr.model.SpeechRecognizer`, kept apart from the model's logic.

- :func:`time_mask` / :func:`install_device_specaugment`: SpecAugment masks drawn with torch on the model's
  device and applied with ``torch.where``. transformers draws them with numpy on the host
  (``_compute_mask_indices``), copies them to the device and applies them with boolean indexing; each of those
  waits for the GPU.
- :func:`packing_of` / :func:`install_packed_encoder`: run the transformer layers on the valid frames only,
  packed into one sequence, with variable-length (flash) attention; no matrix product or attention is spent on
  padding.
- :func:`compile_regions`: ``torch.compile`` of repeated regions (each transformer layer), not the whole
  model.
- :func:`onednn`: CPU convolutions with PyTorch's own kernels instead of oneDNN's, whose convolution backward
  generates its kernels again for each new batch width (measurements: docs/performance.md).
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PACKED_ATTENTION = "asr_packed"


@contextmanager
def onednn(enabled: bool) -> Iterator[None]:
    """Use oneDNN (mkldnn) for CPU operators, convolutions above all, only if ``enabled``, inside the block."""
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


# ----------------------------------------------------------------------------------------------- SpecAugment


def time_mask(
    lengths: torch.Tensor,
    max_length: int,
    mask_prob: float,
    mask_length: int,
    min_masks: int = 0,
) -> torch.Tensor:
    """SpecAugment span mask (batch, max_length), drawn on ``lengths.device`` without reading anything back.

    The semantics of transformers' ``_compute_mask_indices``: utterance ``b`` of ``lengths[b]`` frames gets
    ``floor(mask_prob * lengths[b] / mask_length + U[0, 1))`` spans (at least ``min_masks``; at most
    ``lengths[b] // mask_length`` and ``lengths[b] - mask_length + 1``) of ``mask_length`` frames, with
    distinct random starts in ``[0, lengths[b] - mask_length]``; spans may overlap, so about ``mask_prob`` of
    the frames are masked. Unlike transformers for HuBERT (which passes no attention mask), padding frames are
    never masked and the span count follows each utterance's own length.
    """
    batch, device = lengths.shape[0], lengths.device
    if mask_prob <= 0 or max_length < mask_length or batch == 0:
        return torch.zeros(batch, max_length, dtype=torch.bool, device=device)
    lengths = lengths.long()
    starts_available = max_length - mask_length + 1
    # A bound on any row's span count that depends on shapes only (U < 1), so no value is read back.
    max_spans = min(max(min_masks, int(mask_prob * max_length / mask_length + 1)), starts_available)
    num = torch.floor(mask_prob * lengths / mask_length + torch.rand(batch, device=device)).long()
    num = num.clamp(min=min_masks)
    num = torch.minimum(num, lengths // mask_length)
    num = torch.minimum(num, (lengths - mask_length + 1).clamp(min=0))
    # Distinct random starts: the `max_spans` smallest of random keys over the valid start positions.
    positions = torch.arange(starts_available, device=device)
    keys = torch.rand(batch, starts_available, device=device)
    keys = keys.masked_fill(positions[None, :] > (lengths - mask_length)[:, None], 2.0)
    starts = keys.topk(max_spans, dim=1, largest=False).indices
    used = (torch.arange(max_spans, device=device)[None, :] < num[:, None]).int()
    covered = (starts[:, :, None] + torch.arange(mask_length, device=device)).reshape(batch, -1)
    hits = torch.zeros(batch, max_length, dtype=torch.int32, device=device)
    hits.scatter_add_(1, covered, used.repeat_interleave(mask_length, dim=1))
    return hits > 0


def _device_mask_hidden_states(
    self: nn.Module,
    hidden_states: torch.Tensor,
    mask_time_indices: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Drop-in for transformers' ``_mask_hidden_states`` of HuBERT / wav2vec 2.0 / WavLM, on the device."""
    config = self.config
    if not getattr(config, "apply_spec_augment", True):
        return hidden_states
    batch, frames, hidden = hidden_states.shape
    if mask_time_indices is None and config.mask_time_prob > 0 and self.training:
        if attention_mask is not None:
            lengths = attention_mask.sum(-1)
        else:
            lengths = torch.full((batch,), frames, device=hidden_states.device)
        mask_time_indices = time_mask(
            lengths, frames, config.mask_time_prob, config.mask_time_length, config.mask_time_min_masks
        )
    if mask_time_indices is not None:
        embed = self.masked_spec_embed.to(hidden_states.dtype)
        hidden_states = torch.where(mask_time_indices.bool()[:, :, None], embed, hidden_states)
    if config.mask_feature_prob > 0 and self.training:
        channels = torch.full((batch,), hidden, device=hidden_states.device)
        features = time_mask(
            channels,
            hidden,
            config.mask_feature_prob,
            config.mask_feature_length,
            config.mask_feature_min_masks,
        )
        hidden_states = hidden_states.masked_fill(features[:, None, :], 0.0)
    return hidden_states


def install_device_specaugment(backbone: nn.Module) -> None:
    """Make the backbone's base model mask on the device (and take ``mask_time_indices`` from the caller)."""
    base = backbone.base_model
    if not hasattr(base, "_mask_hidden_states") or not hasattr(base, "masked_spec_embed"):
        raise ValueError(f"{type(base).__name__} has no SpecAugment to replace")
    base._mask_hidden_states = types.MethodType(_device_mask_hidden_states, base)


# ------------------------------------------------------------------------------------------ packed encoder


@dataclass
class Packing:
    """Where the valid frames of a padded (batch, frames) layout go in one packed sequence."""

    index: torch.Tensor  # (tokens,) long: flat positions b * frames + t of the valid frames, in order
    cu_seqlens: torch.Tensor  # (batch + 1,) int32: cumulative lengths
    lengths: list[int]  # frames of each utterance, on the host
    max_length: int
    frames: int

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Packing:
        move = dict(device=device, non_blocking=non_blocking)
        return Packing(self.index.to(**move), self.cu_seqlens.to(**move), self.lengths, self.max_length, self.frames)


def packing_of(frame_lengths: torch.Tensor, frames: int, pin: bool = False) -> Packing:
    """The packing of a batch from its frame lengths, on the host (call it before the batch moves)."""
    frame_lengths = frame_lengths.cpu().long()
    batch = frame_lengths.shape[0]
    valid = torch.arange(frames)[None, :] < frame_lengths[:, None]
    index = valid.reshape(-1).nonzero().squeeze(1)
    cu = torch.zeros(batch + 1, dtype=torch.int32)
    cu[1:] = frame_lengths.cumsum(0)
    if pin and torch.cuda.is_available():
        index, cu = index.pin_memory(), cu.pin_memory()
    lengths = frame_lengths.tolist()
    return Packing(index, cu, lengths, max(lengths, default=0), frames)


def packed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: variable-length attention over a packed (1, heads, tokens, dim) batch.

    Without the packing kwargs (``asr_cu_seqlens``, ``asr_max_length``, ``asr_lengths``) it is transformers'
    SDPA attention, so the same model also runs padded.
    """
    cu_seqlens = kwargs.pop("asr_cu_seqlens", None)
    max_length = kwargs.pop("asr_max_length", None)
    lengths = kwargs.pop("asr_lengths", None)
    if cu_seqlens is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if dropout > 0:
        raise ValueError("model.packed=true needs attention_dropout=0 (varlen attention has no dropout)")
    if lengths is None:  # the encoder saw that the flash kernel applies (CUDA, half precision)
        from torch.nn.attention.varlen import varlen_attn

        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_length, max_length, scale=scaling)[None], None
    # No flash kernel (CPU, float32): SDPA on each utterance's slice of the packed sequence.
    outs = [
        F.scaled_dot_product_attention(q, k, v, scale=scaling)
        for q, k, v in zip(*(t.split(lengths, dim=2) for t in (query, key, value)), strict=True)
    ]
    return torch.cat(outs, dim=2).transpose(1, 2), None


def register_packed_attention() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)


PACKABLE = ("hubert", "wav2vec2")


def flash_applies(hidden_states: torch.Tensor) -> bool:
    """Whether attention on these hidden states runs in half precision on CUDA (the flash condition)."""
    if not hidden_states.is_cuda:
        return False
    half = (torch.float16, torch.bfloat16)
    return hidden_states.dtype in half or (
        torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") in half
    )


def _packed_encoder_forward(self: nn.Module, hidden_states: torch.Tensor, attention_mask=None, **kwargs):
    """HuBERT / wav2vec 2.0 encoder (pre- or post-LN) whose transformer layers see only the valid frames."""
    from transformers.modeling_outputs import BaseModelOutput

    packing: Packing | None = getattr(self, "asr_packing", None)
    if packing is None:
        return self.asr_padded_forward(hidden_states, attention_mask=attention_mask, **kwargs)
    if attention_mask is not None:
        hidden_states = hidden_states * attention_mask[:, :, None].to(hidden_states.dtype)
    hidden_states = hidden_states + self.pos_conv_embed(hidden_states)
    stable = self.config.do_stable_layer_norm
    if not stable:
        hidden_states = self.layer_norm(hidden_states)
    hidden_states = self.dropout(hidden_states)
    batch, frames, width = hidden_states.shape
    packed = hidden_states.reshape(batch * frames, width).index_select(0, packing.index)[None]
    attention = {"asr_cu_seqlens": packing.cu_seqlens, "asr_max_length": packing.max_length}
    if not flash_applies(hidden_states):
        # Only the fallback needs the host lengths (a compiled layer would recompile for each new list).
        attention["asr_lengths"] = packing.lengths
    for layer in self.layers:
        if self.training and self.config.layerdrop > 0 and torch.rand([]) < self.config.layerdrop:
            continue
        packed = layer(packed, attention_mask=None, **attention)
    hidden_states = packed.new_zeros(batch * frames, width).index_copy(0, packing.index, packed[0])
    hidden_states = hidden_states.view(batch, frames, width)
    if stable:
        hidden_states = self.layer_norm(hidden_states)
    return BaseModelOutput(last_hidden_state=hidden_states)


def install_packed_encoder(backbone: nn.Module) -> nn.Module:
    """Route the encoder through :func:`_packed_encoder_forward` when ``encoder.asr_packing`` is set."""
    if backbone.config.model_type not in PACKABLE:
        supported = ", ".join(PACKABLE)
        raise ValueError(f"model.packed=true supports {supported}, not {backbone.config.model_type}")
    if backbone.config.attention_dropout > 0:
        raise ValueError("model.packed=true needs model.config.attention_dropout=0: varlen attention has no dropout")
    if backbone.config._attn_implementation != PACKED_ATTENTION:
        raise ValueError(f"model.packed=true needs attn_implementation={PACKED_ATTENTION}")
    encoder = backbone.base_model.encoder
    encoder.asr_padded_forward = encoder.forward
    encoder.asr_packing = None
    encoder.forward = types.MethodType(_packed_encoder_forward, encoder)
    return encoder


# ------------------------------------------------------------------------------------------------ compile

REGIONS = ("layers", "feature_encoder")


def compile_regions(backbone: nn.Module, regions: str, options: dict | None = None) -> list[str]:
    """``torch.compile`` each module of the named regions in place (``layers+feature_encoder`` for both).

    In-place ``nn.Module.compile`` keeps parameter names, so checkpoints are the same with and without it.
    """
    names = [r for r in regions.split("+") if r]
    unknown = [r for r in names if r not in REGIONS]
    if unknown or not names:
        raise ValueError(f"model.compile must be null or '+'-joined {REGIONS}, not {regions!r}")
    base = backbone.base_model
    compiled = []
    for name in names:
        modules = list(base.encoder.layers) if name == "layers" else [base.feature_extractor]
        for module in modules:
            module.compile(**(options or {}))
        compiled.append(f"{name} ({len(modules)} modules)")
    return compiled
