"""PerlModel: a frozen open_clip CLIP refined by tiny thought projectors (arXiv 2605.18464).

Per modality m (vision: CLS, text: EOS), with S = the frozen output of the lower blocks:

    h(0) = Pool(R(S))                                   zero-shot state (a constant)
    z(k) = phi(h(k-1))                                   one new thought token per step
    h(k) = Pool(R([z(1) .. z(k) | S]))                   all earlier thoughts re-included
    embedding = readout(h(K))                            ln_post/ln_final + frozen projection

R = blocks[J:] is re-run K+1 times, with gradient flowing through the frozen blocks to phi; the
lower blocks run once, without gradient (`image_prefix` / `text_prefix`, the seam the feature
cache uses; `text_prefix` cuts the prompts after the batch's last EOS, as the causal text tower
never carries the later positions to an EOS readout, so the text side costs O(prompt length),
not O(context length); `image_zero_shot_state` / `text_zero_shot_state` give h(0), which the
`*_from_prefix` methods accept back as `h0=` so a cached h(0) skips the zero-shot pass). Pool
always reads the original CLS/EOS row, never a thought token. The mechanics of each tower
(embedding, mask, insertion index, readout) live in `backbone.py`.

Variants (Table 4) are parameters of this one model, resolved once in the constructor into a
`LoopSpec(depths, layer_specific, step_specific)`; the forward pass indexes projectors by
(depth slot, step slot):

    shared     depths [J]          one projector per modality (PERL)
    step       depths [J]          one projector per step (K of them)
    early      depths [0]          one projector
    deep       depths [3, 7, 11]   one projector, used at every depth
    layer      depths [7, 9, 11]   one projector per depth
    layerstep  depths [7, 9, 11]   one projector per (depth, step)

`variant_projectors` (step / layer / layerstep only): "shared_plus_specific" (default) keeps
PERL's shared projector and adds the specific ones, the thought token at (depth d, step k) being
their sum, phi_shared(h) + phi_d,k(h): one token per (depth, step) as in PERL, so the sequence,
the compute and the multi-depth mechanics below are unchanged, and with every phi_d,k = 0 the
variant is exactly PERL-Shared (PERL-Deep for the multi-depth ones). It gives the paper's printed
sizes, (1 + specific) x 6,402 = 32,010 / 25,608 / 83,226 on ViT-B/16. "specific_only" (the reading
before issue 14) has the specific projectors alone: 25,608 / 19,206 / 76,824. The shared pair's
keys are '<modality>.shared.*'; the specific ones keep '<modality>.<depth>.<step>.*', so
checkpoints of either reading load as before.

Multi-depth reading (the paper is silent; our documented choice): the k thought tokens are
inserted into the sequence at the lowest depth d0, exactly as in single-depth PERL; before each
further depth d the thought-token positions of the running sequence are overwritten with the
projections for that depth (deep-prompt style, as VPT-deep / MaPLe re-set their prompt tokens
per layer). The projections at every depth are computed from the same pooled states
h(0) .. h(k-1), so at step k depth d holds [phi_d,1(h(0)) .. phi_d,k(h(k-1))]; a thought token
computed at an earlier step is reused, never recomputed. Blocks below d0 run once. With one
depth this is exactly PERL. The default depths are the paper's for 12-block towers; for towers
with L != 12 blocks each depth d is mapped to round(d * (L-1) / 11) (so 0 -> 0 and 11 -> L-1)
and duplicates are dropped; `inject_layers` overrides them.

`modality` = "vision" / "text" adapts one side only: the other side has no projector and runs
zero-shot (Table 3; 3,841 / 2,561 trainable parameters for ViT-B/16).

No `.cuda()` / `.half()`: device and dtype follow the inputs and the caller's autocast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from perl_core.backbone import (TextPlacement, TextTower, VisionTower, block_rows, check_clip,
                                check_depth, run_blocks)
from perl_core.config import SPECIFIC_VARIANTS
from perl_core.projector import PROJECTOR_INITS, ThoughtProjector

Variant = Literal["shared", "step", "early", "deep", "layer", "layerstep"]
Modality = Literal["both", "vision", "text"]
VariantProjectors = Literal["shared_plus_specific", "specific_only"]
VARIANTS = ("shared", "step", "early", "deep", "layer", "layerstep")
MODALITIES = ("both", "vision", "text")
VARIANT_PROJECTORS = ("shared_plus_specific", "specific_only")
SHARED_KEY = "shared"  # projector_state_dict: '<modality>.shared.*' is the shared pair

# Table 4's depths, stated for the 12-block ViT-B/16 towers.
PAPER_NUM_LAYERS = 12
PAPER_DEPTHS = {"deep": (3, 7, 11), "layer": (7, 9, 11), "layerstep": (7, 9, 11)}
MULTI_DEPTH = tuple(PAPER_DEPTHS)


@dataclass(frozen=True)
class LoopSpec:
    """How one modality recurs: injection depths and which projector axes are specific."""

    depths: tuple[int, ...]  # strictly increasing; thought tokens are inserted at depths[0]
    layer_specific: bool  # one projector per depth (else one shared across depths)
    step_specific: bool  # one projector per step (else one shared across steps)


def scale_depths(depths: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """Map 12-block depths onto a tower with `num_layers` blocks (0 -> 0, 11 -> L-1), deduped."""
    if num_layers == PAPER_NUM_LAYERS:
        return tuple(depths)
    scaled = (int(d * (num_layers - 1) / (PAPER_NUM_LAYERS - 1) + 0.5) for d in depths)
    return tuple(sorted(set(scaled)))


def resolve_variant(variant: str, inject_layer: int, inject_layers: Sequence[int] | None,
                    num_layers: int, what: str = "inject_layer") -> LoopSpec:
    """Resolve a Table-4 variant into a LoopSpec for a tower with `num_layers` blocks."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not one of {list(VARIANTS)}")
    if inject_layers and variant not in MULTI_DEPTH:
        raise ValueError(f"inject_layers={list(inject_layers)} only applies to the multi-depth "
                         f"variants {list(MULTI_DEPTH)}; variant={variant!r} uses {what}")
    if variant in MULTI_DEPTH:
        depths = tuple(inject_layers) if inject_layers else scale_depths(PAPER_DEPTHS[variant],
                                                                        num_layers)
        if list(depths) != sorted(set(depths)):
            raise ValueError(f"inject_layers={list(depths)} must be strictly increasing")
        for d in depths:
            check_depth(d, num_layers, "inject_layers entry")
    else:
        depth = 0 if variant == "early" else inject_layer
        depths = (check_depth(depth, num_layers, what),)
    return LoopSpec(depths=depths, layer_specific=variant in ("layer", "layerstep"),
                    step_specific=variant in ("step", "layerstep"))


def _insert(x: torch.Tensor, z: torch.Tensor, at: int) -> torch.Tensor:
    """Insert the (N, k, D) thought tokens z into the sequence x before position `at`."""
    return torch.cat([x[:, :at], z.to(x.dtype), x[:, at:]], dim=1)


def _overwrite(x: torch.Tensor, z: torch.Tensor, at: int) -> torch.Tensor:
    """Replace the k thought positions x[:, at:at+k] with z (no in-place op: autograd-safe)."""
    return torch.cat([x[:, :at], z.to(x.dtype), x[:, at + z.shape[1]:]], dim=1)


class PerlModel(nn.Module):
    def __init__(self, clip: nn.Module, inject_layer: int = 7, num_steps: int = 4, rank: int = 1,
                 modality: Modality = "both", variant: Variant = "shared",
                 inject_layers: Sequence[int] | None = None, text_inject_layer: int | None = None,
                 text_placement: TextPlacement = "after_bos",
                 variant_projectors: VariantProjectors = "shared_plus_specific",
                 projector_init: str = "default"):
        super().__init__()
        check_clip(clip)
        if modality not in MODALITIES:
            raise ValueError(f"modality={modality!r} is not one of {list(MODALITIES)}")
        if variant_projectors not in VARIANT_PROJECTORS:
            raise ValueError(f"variant_projectors={variant_projectors!r} is not one of "
                             f"{list(VARIANT_PROJECTORS)}")
        if projector_init not in PROJECTOR_INITS:
            raise ValueError(f"projector_init={projector_init!r} is not one of "
                             f"{list(PROJECTOR_INITS)}")
        if not isinstance(num_steps, int) or num_steps < 0:
            raise ValueError(f"num_steps={num_steps!r} must be an integer >= 0")
        if text_inject_layer is not None and variant in MULTI_DEPTH:
            raise ValueError(f"text_inject_layer={text_inject_layer} applies to single-depth "
                             f"variants; variant={variant!r} takes its depths from inject_layers")
        if text_inject_layer not in (None, 0) and variant == "early":
            raise ValueError(f"variant='early' injects at layer 0; got text_inject_layer="
                             f"{text_inject_layer}")
        self.clip = clip.requires_grad_(False).eval()
        self.num_steps, self.rank = num_steps, rank
        self.modality, self.variant, self.text_placement = modality, variant, text_placement
        inject_layers = tuple(inject_layers) if inject_layers else None
        # Plain objects holding a reference to the frozen CLIP (no parameters, no state).
        self.towers = {"vision": VisionTower(clip), "text": TextTower(clip, text_placement)}
        text_layer = inject_layer if text_inject_layer is None else text_inject_layer
        self.loops = {
            "vision": resolve_variant(variant, inject_layer, inject_layers,
                                      self.towers["vision"].num_layers, "inject_layer"),
            "text": resolve_variant(variant, text_layer, inject_layers,
                                    self.towers["text"].num_layers,
                                    "inject_layer" if text_inject_layer is None else
                                    "text_inject_layer"),
        }
        self.variant_projectors, self.projector_init = variant_projectors, projector_init
        # only a variant with specific projectors has something to add a shared pair to
        self.has_shared = variant_projectors == "shared_plus_specific" and \
            variant in SPECIFIC_VARIANTS
        # projectors[modality][depth slot][step slot] (the specific ones, or the one projector
        # of shared/early/deep); shared_projectors[modality]: the added shared pair, if any.
        # Only adapted modalities have an entry. Construction order = RNG order: the grid is
        # drawn exactly as before issue 14, so specific_only models are bitwise the old ones.
        self.projectors = nn.ModuleDict()
        self.shared_projectors = nn.ModuleDict()
        for name in (("vision", "text") if modality == "both" else (modality,)):
            loop, width = self.loops[name], self.towers[name].width
            n_depth = len(loop.depths) if loop.layer_specific else 1
            n_step = num_steps if loop.step_specific else 1
            self.projectors[name] = nn.ModuleList(
                nn.ModuleList(ThoughtProjector(width, rank, projector_init)
                              for _ in range(n_step))
                for _ in range(n_depth))
            if self.has_shared:
                self.shared_projectors[name] = ThoughtProjector(width, rank, projector_init)

    # ---- frozen prefix (lower blocks, once, no grad) -----------------------------------------
    @torch.no_grad()
    def _prefix(self, name: str, x: torch.Tensor, length: int | None = None) -> torch.Tensor:
        tower = self.towers[name]
        s = tower.embed(x)
        if length is not None:  # embedding is per position: slicing it = embedding the slice
            s = s[:, :length]
        return run_blocks(tower.blocks[:self.loops[name].depths[0]], s, tower.mask(s.shape[1], s))

    def image_prefix(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> S_v (N, 1+P, D_v): the embeddings through blocks[:J], no grad."""
        return self._prefix("vision", images)

    def text_length(self, tokens: torch.Tensor) -> int:
        """L_eff = 1 + the last EOS index of the (C, ctx) prompts: the positions a readout sees.

        The text tower is causal and every step reads the EOS row, so the positions after the
        last EOS of the batch cannot reach any readout, at any step (thought tokens sit before
        EOS). A prompt cut by the tokenizer has its EOS at ctx - 1: then L_eff = ctx (no cut).
        A Python int: on CUDA tokens reading it is a host sync, so per-step callers take it once
        from the CPU tokens (`text_from_prefix`'s `length`).
        """
        if tokens.ndim != 2 or tokens.shape[0] == 0:
            return tokens.shape[-1]
        return int(self.towers["text"].read_index(tokens).max()) + 1

    def text_prefix(self, tokens: torch.Tensor, truncate: bool = True) -> torch.Tensor:
        """(C, ctx) -> S_t (C, L_eff, D_t): the embeddings through blocks[:J], no grad.

        The sequence is cut after the batch's last EOS (`text_length`), so the lower blocks and
        every recurrent pass over this prefix cost O(L_eff), not O(ctx); the result is the
        untruncated one up to float rounding (exact in arithmetic). `truncate=False` keeps all
        ctx positions (the reference the tests compare against). `text_from_prefix` and
        `text_zero_shot_state` take the prefix with the original (C, ctx) tokens.
        """
        return self._prefix("text", tokens, self.text_length(tokens) if truncate else None)

    # ---- the recurrence ----------------------------------------------------------------------
    def _upper(self, name: str, prefix: torch.Tensor, read_idx: torch.Tensor,
               thoughts: list[torch.Tensor] | None) -> torch.Tensor:
        """One pass of blocks[d0:] with thought tokens; returns the raw read rows h (N, D).

        thoughts: None (zero-shot pass) or one (N, k, D) tensor per injection depth.
        """
        tower, loop = self.towers[name], self.loops[name]
        at = tower.insert_at
        k = 0 if thoughts is None else thoughts[0].shape[1]
        x = prefix if k == 0 else _insert(prefix, thoughts[0], at)
        mask = tower.mask(x.shape[1], x)
        reset = {d: j for j, d in enumerate(loop.depths) if j > 0}  # deeper depths: overwrite
        # The read token (CLS / EOS) moves by k when the thoughts sit before it (always, except
        # a degenerate EOS at index 0 with after-BOS placement).
        idx = read_idx + k * (read_idx >= at).long()
        last = tower.num_layers - 1
        for i in range(loop.depths[0], tower.num_layers):
            if k and i in reset:
                x = _overwrite(x, thoughts[reset[i]], at)
            if i < last:
                x = tower.blocks[i](x, attn_mask=mask)
        # only the read rows leave the pass: the last block computes them only
        return block_rows(tower.blocks[last], x, idx, mask)

    def _projector(self, name: str, depth_slot: int, step: int) -> ThoughtProjector:
        loop = self.loops[name]
        return self.projectors[name][depth_slot if loop.layer_specific else 0][
            step - 1 if loop.step_specific else 0]

    def _thought(self, name: str, depth_slot: int, step: int, h: torch.Tensor) -> torch.Tensor:
        """The thought token (N, D) at (depth slot, step) from the pooled state h(step-1)."""
        z = self._projector(name, depth_slot, step)(h)
        if name in self.shared_projectors:  # shared_plus_specific: summed into one token
            z = z + self.shared_projectors[name](h)
        return z

    def _check_steps(self, name: str, steps: int | None) -> int:
        steps = self.num_steps if steps is None else steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise ValueError(f"steps={steps!r} must be an integer >= 0")
        if name in self.projectors and self.loops[name].step_specific and steps > self.num_steps:
            raise ValueError(f"steps={steps} > num_steps={self.num_steps}: variant "
                             f"{self.variant!r} has one projector per step")
        return steps

    def _from_prefix(self, name: str, prefix: torch.Tensor, read_idx: torch.Tensor,
                     steps: int | None, all_steps: bool, h0: torch.Tensor | None
                     ) -> torch.Tensor:
        steps = self._check_steps(name, steps)
        if h0 is None:
            h = self._zero_shot_state(name, prefix, read_idx)
        elif h0.shape != (prefix.shape[0], prefix.shape[-1]):
            raise ValueError(f"h0 has shape {tuple(h0.shape)}; expected (N, D) = "
                             f"{(prefix.shape[0], prefix.shape[-1])} for this prefix")
        else:
            h = h0
        hs = [h]
        if name in self.projectors:
            n_depths = len(self.loops[name].depths)
            thoughts: list[list[torch.Tensor]] = [[] for _ in range(n_depths)]  # per depth
            for step in range(1, steps + 1):
                for j in range(n_depths):
                    thoughts[j].append(self._thought(name, j, step, h).unsqueeze(1))
                h = self._upper(name, prefix, read_idx, [torch.cat(t, dim=1) for t in thoughts])
                hs.append(h)
        else:  # not adapted: this side runs zero-shot at every step
            hs += [h] * steps
        readout = self.towers[name].readout
        return readout(torch.stack(hs)) if all_steps else readout(hs[-1])

    @torch.no_grad()
    def _zero_shot_state(self, name: str, prefix: torch.Tensor, read_idx: torch.Tensor
                         ) -> torch.Tensor:
        # h(0) does not depend on any projector: a constant, computed without gradient
        return self._upper(name, prefix, read_idx, None)

    @staticmethod
    def _cls_index(prefix: torch.Tensor) -> torch.Tensor:
        return torch.zeros(prefix.shape[0], dtype=torch.long, device=prefix.device)

    def _eos_index(self, prefix: torch.Tensor, tokens: torch.Tensor,
                   length: int | None = None) -> torch.Tensor:
        if tokens.shape[0] != prefix.shape[0]:
            raise ValueError(f"tokens has {tokens.shape[0]} rows but the text prefix has "
                             f"{prefix.shape[0]}")
        # a prefix cut after the last EOS (text_prefix) or any longer one up to ctx is exact;
        # a shorter one would lose an EOS row (a prefix of other prompts)
        n = self.text_length(tokens) if length is None else length
        ctx = self.context_length
        if not n <= prefix.shape[1] <= ctx:
            raise ValueError(f"the text prefix has {prefix.shape[1]} positions; these tokens "
                             f"need {n} to {ctx} (their last EOS is at {n - 1})")
        return self.towers["text"].read_index(tokens).to(prefix.device)

    def image_zero_shot_state(self, prefix: torch.Tensor) -> torch.Tensor:
        """S_v -> h(0) (N, width): the raw CLS row of the upper blocks without thoughts, no grad.

        Pass it back as `image_from_prefix(..., h0=h0)` to skip that pass (the feature cache
        stores it next to S_v); readout(h(0)) is the zero-shot embedding v0.
        """
        return self._zero_shot_state("vision", prefix, self._cls_index(prefix))

    def text_zero_shot_state(self, prefix: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """S_t and its tokens -> h(0) (C, width): the raw EOS row without thoughts, no grad."""
        return self._zero_shot_state("text", prefix, self._eos_index(prefix, tokens))

    def image_from_prefix(self, prefix: torch.Tensor, steps: int | None = None,
                          all_steps: bool = False, h0: torch.Tensor | None = None
                          ) -> torch.Tensor:
        """S_v -> (N, D) image embeddings after `steps` steps, or (steps+1, N, D) if all_steps.

        h0: `image_zero_shot_state(prefix)` when already known (same result, one pass fewer).
        """
        return self._from_prefix("vision", prefix, self._cls_index(prefix), steps, all_steps, h0)

    def text_from_prefix(self, prefix: torch.Tensor, tokens: torch.Tensor,
                         steps: int | None = None, all_steps: bool = False,
                         h0: torch.Tensor | None = None, length: int | None = None
                         ) -> torch.Tensor:
        """S_t and its tokens (for the EOS index) -> (C, D), or (steps+1, C, D) if all_steps.

        prefix: `text_prefix(tokens)` (C, L_eff, D), or rows of a prefix of a superset of the
        prompts (longer than their own L_eff: still exact); tokens: the original (C, ctx).
        h0: `text_zero_shot_state(prefix, tokens)` when already known.
        length: `text_length(tokens)` when already known. It checks the prefix against the
        tokens, and reading it from CUDA tokens is a host sync: a caller that runs this every
        step (training) computes it once, from the CPU tokens, and passes it here.
        """
        return self._from_prefix("text", prefix, self._eos_index(prefix, tokens, length), steps,
                                 all_steps, h0)

    def encode_image(self, images: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """(N, 3, H, W) -> (N, D) projected, not normalised; steps=0 is zero-shot CLIP."""
        return self.image_from_prefix(self.image_prefix(images), steps)

    def encode_text(self, tokens: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """(C, ctx) -> (C, D) projected, not normalised; steps=0 is zero-shot CLIP.

        Runs on the truncated prefix (`text_prefix`): cost O(last EOS index), not O(ctx).
        """
        return self.text_from_prefix(self.text_prefix(tokens), tokens, steps)

    def encode_image_all_steps(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (K+1, N, D): every step 0..K from one pass."""
        return self.image_from_prefix(self.image_prefix(images), all_steps=True)

    def encode_image_all_steps_differentiable(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (K+1, N, D) like `encode_image_all_steps`, but with gradient to
        `images` through every block (the lower blocks and h(0) too, which the other paths run
        without gradient): for input-gradient metrics (`evaluate.jacobian_norms`), not training.
        """
        tower = self.towers["vision"]
        s = tower.embed(images)
        prefix = run_blocks(tower.blocks[:self.vision_depths[0]], s, tower.mask(s.shape[1], s))
        idx = self._cls_index(prefix)
        h0 = self._upper("vision", prefix, idx, None)  # not _zero_shot_state: that has no grad
        return self._from_prefix("vision", prefix, idx, None, True, h0)

    def encode_text_all_steps(self, tokens: torch.Tensor) -> torch.Tensor:
        """(C, ctx) -> (K+1, C, D): every step 0..K from one pass."""
        return self.text_from_prefix(self.text_prefix(tokens), tokens, all_steps=True)

    # ---- logits and helpers ------------------------------------------------------------------
    @property
    def logit_scale(self) -> torch.Tensor:
        """CLIP's frozen temperature, exp() applied (100 for OpenAI weights)."""
        return self.clip.logit_scale.exp()

    def logits(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """(..., N, D), (..., C, D) -> (..., N, C) = logit_scale * cos similarity."""
        img, txt = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
        return self.logit_scale * img @ txt.transpose(-1, -2)

    def tokenize(self, texts: str | list[str]) -> torch.Tensor:
        """CLIP BPE tokens (C, ctx) on the CPU (move them to the model's device yourself)."""
        if self.clip.vocab_size < 49408:
            raise ValueError(f"tokenize uses CLIP's 49,408-token BPE; this model's vocab_size is "
                             f"{self.clip.vocab_size}")
        return open_clip.tokenize(texts, context_length=self.context_length)

    @property
    def image_size(self) -> int | tuple[int, int]:
        h, w = self.clip.visual.image_size
        return h if h == w else (h, w)

    @property
    def context_length(self) -> int:
        return self.clip.context_length

    @property
    def vision_depths(self) -> tuple[int, ...]:
        return self.loops["vision"].depths

    @property
    def text_depths(self) -> tuple[int, ...]:
        return self.loops["text"].depths

    def train(self, mode: bool = True) -> "PerlModel":
        """Projectors follow `mode`; the frozen CLIP always stays in eval mode."""
        super().train(mode)
        self.clip.eval()
        return self

    # ---- trainable state ---------------------------------------------------------------------
    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def trainable_parameter_counts(self) -> dict[str, int]:
        """{"vision": n, "text": n, "total": n}; 3,841 + 2,561 = 6,402 for PERL on ViT-B/16.

        Per modality: its specific (or only) projectors plus its shared pair, if any.
        """
        counts = {name: sum(p.numel() for bank in (self.projectors, self.shared_projectors)
                            if name in bank for p in bank[name].parameters())
                  for name in ("vision", "text")}
        return {**counts, "total": counts["vision"] + counts["text"]}

    def _projector_state(self) -> dict[str, torch.Tensor]:
        # the grid keeps its pre-issue-14 keys; the shared pair is '<modality>.shared.*', which
        # cannot collide with them (the grid's second key level is a depth slot number)
        state = dict(self.projectors.state_dict())
        for name, phi in self.shared_projectors.items():
            state.update({f"{name}.{SHARED_KEY}.{k}": v for k, v in phi.state_dict().items()})
        return state

    def projector_state_dict(self) -> dict[str, torch.Tensor]:
        """Detached copies of the projector weights (keys like 'vision.0.0.fc1.weight', and
        'vision.shared.fc1.weight' for the shared pair of shared_plus_specific)."""
        return {k: v.detach().clone() for k, v in self._projector_state().items()}

    def load_projector_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        expected = set(self._projector_state())
        missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        prefixes = {name: f"{name}.{SHARED_KEY}." for name in self.shared_projectors}
        if missing or unexpected:
            # a state without the shared pair is most likely from before issue 14
            hint = ("; a state without '<modality>.shared.*' keys is the specific_only reading "
                    "(every checkpoint from before issue 14): build the model with "
                    "variant_projectors='specific_only'"
                    if not unexpected and all(k.startswith(tuple(prefixes.values()))
                                              for k in missing) else "")
            raise ValueError(
                f"projector state does not fit this model (variant={self.variant!r}, "
                f"variant_projectors={self.variant_projectors!r}, modality={self.modality!r}, "
                f"num_steps={self.num_steps}): missing {missing}, unexpected {unexpected}{hint}")
        try:
            self.projectors.load_state_dict(
                {k: v for k, v in state_dict.items()
                 if not any(k.startswith(pre) for pre in prefixes.values())}, strict=True)
            for name, pre in prefixes.items():
                self.shared_projectors[name].load_state_dict(
                    {k[len(pre):]: v for k, v in state_dict.items() if k.startswith(pre)},
                    strict=True)
        except RuntimeError as e:
            raise ValueError(f"projector state does not fit this model (rank={self.rank}, widths "
                             f"vision={self.towers['vision'].width}, text="
                             f"{self.towers['text'].width}): {e}") from None

    def extra_repr(self) -> str:
        return (f"variant={self.variant!r}, modality={self.modality!r}, num_steps={self.num_steps},"
                f" rank={self.rank}, vision_depths={self.vision_depths}, text_depths="
                f"{self.text_depths}, text_placement={self.text_placement!r}, "
                f"variant_projectors={self.variant_projectors!r}, projector_init="
                f"{self.projector_init!r}")
