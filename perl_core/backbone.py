"""The frozen open_clip CLIP seen as two towers: embed -> blocks -> read one token -> readout.

PERL splits each encoder at depth J (PERL.md §2.2): the lower part is the embedding stage plus
`blocks[:J]` (run once), the upper part `blocks[J:]` (re-run every step with thought tokens in
the sequence). We iterate the blocks by hand (no hooks, `clip.attn_mask` is never touched), so a
tower only has to say how to embed its input, where its readout token sits, how thought tokens
enter the sequence, and how the read token is projected into the joint space:

- vision: `visual._embeds` (conv, CLS, pos-emb, ln_pre); no mask; read the CLS row (index 0);
  thought tokens are prepended (index 0), so CLS moves to index k; readout `ln_post(h) @ proj`.
- text: token + positional embedding; causal mask grown to ctx + k; read the EOS row
  (`tokens.argmax(-1)`, EOT has the largest id); thought tokens go after BOS (index 1, Fig. 2)
  or before it ("front", index 0, Eq. 3); readout `ln_final(h) @ text_projection`.

Thought tokens carry no positional embedding. In both placements they sit before the read
token, so its index moves by k. Only the open_clip `CLIP` layout of 3.3 (batch-first blocks,
text tower flattened onto the CLIP object) with CLS-token and argmax-EOS pooling is supported.
"""

from __future__ import annotations

from typing import Literal

import torch
from open_clip.model import CLIP
from open_clip.transformer import QuickGELU, ResidualAttentionBlock, VisionTransformer
from torch import nn

TextPlacement = Literal["after_bos", "front"]
TEXT_PLACEMENTS = ("after_bos", "front")


def check_clip(clip: nn.Module) -> None:
    """Raise a clear error unless `clip` is a CLIP whose pooling PERL's readout reproduces."""
    if not isinstance(clip, CLIP):
        raise TypeError(
            f"PERL needs an open_clip CLIP (text tower on the CLIP object); got "
            f"{type(clip).__name__}. CustomTextCLIP / CoCa / HF text towers are not supported.")
    visual = clip.visual
    if not isinstance(visual, VisionTransformer):
        raise TypeError(f"PERL needs a ViT vision tower; got {type(visual).__name__}")
    if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
        raise ValueError(
            "PERL reads the CLS token after ln_post on all tokens; this vision tower has "
            f"pool_type={visual.pool_type!r}, final_ln_after_pool={visual.final_ln_after_pool}, "
            f"attn_pool={visual.attn_pool is not None}")
    if clip.text_pool_type != "argmax":
        raise ValueError(f"PERL reads the text EOS via argmax; "
                         f"text_pool_type={clip.text_pool_type!r}")
    if clip.attn_mask is None:
        raise ValueError("PERL's text path needs a causal text tower; this CLIP has no attn_mask")


def check_depth(depth: int, num_layers: int, what: str) -> int:
    if not isinstance(depth, int) or isinstance(depth, bool) or not 0 <= depth < num_layers:
        raise ValueError(f"{what}={depth!r} is outside [0, {num_layers}) (the tower has "
                         f"{num_layers} blocks; thought tokens enter the input of blocks[{what}])")
    return depth


def causal_mask(length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Additive (L, L) mask built like open_clip's build_causal_mask: -inf above the diagonal."""
    return torch.full((length, length), float("-inf"), device=device, dtype=dtype).triu_(1)


def uses_quick_gelu(clip: CLIP) -> bool:
    """True when the MLP activation is QuickGELU (what OpenAI's weights were trained with)."""
    return isinstance(clip.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)


def run_blocks(blocks, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    for blk in blocks:
        x = blk(x, attn_mask=attn_mask)
    return x


def block_rows(block: nn.Module, x: torch.Tensor, rows: torch.Tensor,
               attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`block(x, attn_mask=attn_mask)[arange(N), rows]` (N, D), computing only those rows.

    In a pre-LN block, output row i sees the other rows only through the keys and values of its
    attention. So the last block of a pass that reads one row per sequence needs ln_1 and the
    K/V projections of every row, but the query, the attention output, ln_2 and the MLP of the
    read row only: at ViT-B/16 size that block costs ~1/6 of a full one, i.e. an upper pass of 5
    blocks ~17 % less. Same numbers up to float rounding. Blocks of another layout (cross
    attention, other attention modules) run whole and are indexed.
    """
    n = torch.arange(x.shape[0], device=x.device)
    attn = getattr(block, "attn", None)
    if (type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv")
            or not isinstance(attn, nn.MultiheadAttention) or not attn.batch_first):
        return block(x, attn_mask=attn_mask)[n, rows]
    y = block.ln_1(x)
    mask = None
    if attn_mask is not None:  # each query's own mask row, per head: (N * heads, 1, L)
        mask = attn_mask[rows].repeat_interleave(attn.num_heads, dim=0).unsqueeze(1)
    h = x[n, rows].unsqueeze(1)
    h = h + block.ls_1(block.attention(q_x=y[n, rows].unsqueeze(1), k_x=y, v_x=y,
                                       attn_mask=mask))
    h = h + block.ls_2(block.mlp(block.ln_2(h)))
    return h[:, 0]


class VisionTower:
    """CLIP's image encoder as seen by PERL. Holds only a reference to the frozen CLIP."""

    name = "vision"
    insert_at = 0  # thought tokens are prepended (placement is irrelevant without a mask)

    def __init__(self, clip: CLIP):
        self.clip = clip
        self.blocks = clip.visual.transformer.resblocks
        self.width = clip.visual.transformer.width
        self.num_layers = len(self.blocks)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"images must be (N, 3, H, W); got shape {tuple(images.shape)}")
        return self.clip.visual._embeds(images)

    def read_index(self, images: torch.Tensor) -> torch.Tensor:
        return torch.zeros(images.shape[0], dtype=torch.long, device=images.device)  # CLS

    def mask(self, length: int, like: torch.Tensor) -> None:
        return None

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        h = self.clip.visual.ln_post(h)
        proj = self.clip.visual.proj
        return h if proj is None else h @ proj


class TextTower:
    """CLIP's text encoder as seen by PERL. Holds only a reference to the frozen CLIP."""

    name = "text"

    def __init__(self, clip: CLIP, placement: TextPlacement = "after_bos"):
        if placement not in TEXT_PLACEMENTS:
            raise ValueError(f"text_placement={placement!r} is not one of {list(TEXT_PLACEMENTS)}")
        self.clip = clip
        self.placement = placement
        self.insert_at = 1 if placement == "after_bos" else 0
        self.blocks = clip.transformer.resblocks
        self.width = clip.transformer.width
        self.num_layers = len(self.blocks)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        ctx = self.clip.context_length
        if tokens.ndim != 2 or tokens.shape[1] != ctx:
            raise ValueError(f"tokens must be (C, {ctx}) (the model's context length); got shape "
                             f"{tuple(tokens.shape)}")
        cast_dtype = self.clip.transformer.get_cast_dtype()
        x = self.clip.token_embedding(tokens).to(cast_dtype)
        return x + self.clip.positional_embedding.to(cast_dtype)

    def read_index(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.argmax(dim=-1)  # EOT has the largest id

    def mask(self, length: int, like: torch.Tensor) -> torch.Tensor:
        return causal_mask(length, like.device, like.dtype)

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        h = self.clip.ln_final(h)
        proj = self.clip.text_projection
        if proj is None:
            return h
        return proj(h) if isinstance(proj, nn.Linear) else h @ proj
