"""WSI-LLaVA: slide encoder → visual-token selection → ``gamma · MLP`` projector → any Hugging Face causal LM.

Hub-shipped: ``save_pretrained`` copies this file with the files it imports (configuration, token selection, slide
encoder: see :mod:`.remote_code`), so it imports only stdlib, torch, transformers and ``.sibling`` modules. The slide
encoder modules (``.modeling_slide_encoder``, ``.masked_pooling``, ``.slide_towers``) are ``wsi_clip``'s: inside the
package ``wsi_llava/__init__`` aliases them (one class per process), in a checkpoint they are the copies beside it.

Layout follows HF Llava (``model.vision_tower`` / ``model.multi_modal_projector`` / ``model.language_model`` +
``lm_head``), but instead of expanding the placeholder into a fixed number of tokens in the processor, the model
**splices** each slide's visual tokens at its single placeholder token (LLaVA / SlideChat style). So the number of
visual tokens may differ per slide (adaptive PruMerge) in training and in batched generation.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import ModelOutput

from .configuration_wsillava import WSILlavaConfig
from .masked_pooling import masked_mean
from .modeling_slide_encoder import SlideEncoderModel
from .token_selection import TokenSelectionInputs, TokenSelectionOutput, get_token_selector, run_token_selector

SLIDE_INPUT_NAMES = (
    "tile_features",
    "tile_coords",
    "tile_mask",
    "token_selection",
    "token_selection_kwargs",
    "question_embedding",
    "question_mask",
)
GAMMA_PROBE_SIZE = 1024
GAMMA_PROBE_SEED = 0


# ------------------------------------------------------------------------------------------------ outputs
@dataclass
class WSILlavaSlideFeatures(ModelOutput):
    """Projected visual tokens of a batch of slides (B slides, K = most tokens kept by one slide, E = LM width).

    Args:
        visual_embeds: ``[B, K, E]`` projected visual tokens, each slide's first ``K_b`` rows real.
        visual_mask: ``[B, K]`` bool, True on real visual tokens.
        selection_indices: ``[B, K]`` int64 source tile of each visual token (-1: padding or a merged summary token).
        visual_token_counts: ``[B]`` int64 visual tokens kept per slide (``K_b``).
        tile_counts: ``[B]`` int64 real tiles per slide (``N_b``).
    """

    visual_embeds: torch.FloatTensor | None = None
    visual_mask: torch.BoolTensor | None = None
    selection_indices: torch.LongTensor | None = None
    visual_token_counts: torch.LongTensor | None = None
    tile_counts: torch.LongTensor | None = None


@dataclass
class WSILlavaModelOutputWithPast(BaseModelOutputWithPast):
    """Outputs of :class:`WSILlavaModel` (L = spliced length = T − 1 + K).

    Args:
        last_hidden_state: ``[B, L, E]`` LM hidden states of the spliced sequence.
        cache: the LM's KV cache (when ``use_cache``).
        hidden_states / attentions: the LM's, when requested.
        attention_mask: ``[B, L]`` mask of the spliced sequence (None when no slide was given).
        position_ids: ``[B, L]`` positions used for the spliced sequence.
        labels: ``[B, L]`` labels aligned with the spliced sequence (-100 on visual tokens), when labels were given.
        visual_token_counts / tile_counts / selection_indices: selection statistics (see
            :class:`WSILlavaSlideFeatures`).
    """

    attention_mask: torch.LongTensor | None = None
    position_ids: torch.LongTensor | None = None
    labels: torch.LongTensor | None = None
    visual_token_counts: torch.LongTensor | None = None
    tile_counts: torch.LongTensor | None = None
    selection_indices: torch.LongTensor | None = None


@dataclass
class WSILlavaCausalLMOutputWithPast(CausalLMOutputWithPast):
    """Outputs of :class:`WSILlavaForConditionalGeneration`.

    Args:
        loss: shifted next-token cross-entropy over the answer tokens (labels != -100), when labels were given.
        logits: ``[B, L, V]`` (or the last ``logits_to_keep`` positions).
        cache / hidden_states / attentions: the LM's.
        attention_mask / position_ids / labels: of the spliced sequence (see :class:`WSILlavaModelOutputWithPast`).
        visual_token_counts: ``[B]`` visual tokens kept per slide; tile_counts: ``[B]`` real tiles per slide;
            selection_indices: ``[B, K]`` kept tile indices (-1: padding / summary token).
    """

    attention_mask: torch.LongTensor | None = None
    position_ids: torch.LongTensor | None = None
    labels: torch.LongTensor | None = None
    visual_token_counts: torch.LongTensor | None = None
    tile_counts: torch.LongTensor | None = None
    selection_indices: torch.LongTensor | None = None


# ------------------------------------------------------------------------------------------------ projector
class WSILlavaProjector(nn.Module):
    """``gamma · Linear(H → H)(act(Linear(D → H)(x)))``; ``gamma`` is a learnable scalar kept inside this module so
    that stage 2 ("projector only") and stage 3 (``modules_to_save``) train it with the MLP.

    Its parameters are float32 whatever the LM dtype (fp32 master weights for a pure-bf16 run without DeepSpeed:
    in bf16, ``0.03 + 2e-5 == 0.03`` and small updates of ``gamma`` are lost). They are created in float32 (also
    under a bf16 default dtype), ``from_parts`` keeps them so, and ``from_pretrained(dtype=bf16 / fp16)`` loads them
    in float32 (``_keep_in_fp32_modules_strict``). The output is cast to the LM embedding dtype where it is spliced.
    An explicit ``model.to(torch.bfloat16)`` / ``.half()`` casts them like every other parameter (PyTorch semantics,
    kept on purpose: DeepSpeed's bf16 mode casts the module this way and keeps its own fp32 master weights, and FSDP
    flattens parameters of one dtype): call ``model.multi_modal_projector.float()`` afterwards to train the
    projector in fp32 again."""

    def __init__(self, config: WSILlavaConfig):
        super().__init__()
        in_dim, out_dim = config.vision_config.hidden_size, config.text_config.hidden_size
        fp32 = {"dtype": torch.float32}  # fp32 master weights, whatever torch's default dtype is at build time
        self.linear_1 = nn.Linear(in_dim, out_dim, bias=config.projector_bias, **fp32)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(out_dim, out_dim, bias=config.projector_bias, **fp32)
        self.gamma = nn.Parameter(torch.ones((), **fp32))

    def mlp(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x)))

    def forward(self, x: Tensor) -> Tensor:
        """``[..., D]`` tower tokens → ``[..., H]`` LM-space visual tokens."""
        x = x.to(self.linear_1.weight.dtype)
        return self.mlp(x) * self.gamma.to(x.dtype)


# ------------------------------------------------------------------------------------------------ base classes
class WSILlavaPreTrainedModel(PreTrainedModel):
    config: WSILlavaConfig
    config_class = WSILlavaConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["SlideEncoderLayer"]
    # fp32 projector (MLP + gamma) on from_pretrained(dtype=bf16 or fp16): the `_strict` variant upcasts for both;
    # plain `_keep_in_fp32_modules` would only do so for fp16 (transformers 5 `_get_dtype_plan`).
    _keep_in_fp32_modules_strict = ["multi_modal_projector"]
    _skip_keys_device_placement = ["cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        """Projector: xavier-uniform linears, zero bias, then ``gamma`` by the RMS rule (applied at the
        ``WSILlavaModel`` level, after the LM embeddings exist). Sub-models initialise themselves."""
        if isinstance(module, WSILlavaProjector):
            for linear in (module.linear_1, module.linear_2):
                init.xavier_uniform_(linear.weight)
                if linear.bias is not None:
                    init.zeros_(linear.bias)
            owner = self if isinstance(self, WSILlavaModel) else getattr(self, "model", None)
            gamma = module.gamma
            if getattr(gamma, "_is_hf_initialized", False):
                return
            if isinstance(owner, WSILlavaModel) and gamma.device.type != "meta":
                owner.reset_projector_gamma()  # the LM (registered before the projector) is initialised by now
            else:
                init.ones_(gamma)
        elif isinstance(module, nn.Linear):  # lm_head
            std = getattr(self.config.text_config, "initializer_range", 0.02)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):  # rows added by resize_token_embeddings (e.g. the slide token)
            # nn.Embedding's own N(0, 1) init is ~7x the scale of a pretrained LM's rows: with tied weights the new
            # token's logit would dominate every prediction.
            std = getattr(self.config.text_config, "initializer_range", 0.02)
            init.normal_(module.weight, mean=0.0, std=std)


class WSILlavaModel(WSILlavaPreTrainedModel):
    """Slide tower + token selection + projector + LM backbone (no LM head)."""

    def __init__(self, config: WSILlavaConfig):
        super().__init__(config)
        self.vision_tower = SlideEncoderModel(config.vision_config)
        # The LM is registered before the projector on purpose: weight init runs children in order, and the
        # projector's gamma rule reads the (already initialised) LM input embeddings.
        self.language_model = AutoModel.from_config(config.text_config)
        self.multi_modal_projector = WSILlavaProjector(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    # ------------------------------------------------------------------------------------------ gamma rule
    @torch.no_grad()
    def reset_projector_gamma(self, tower_tokens: Tensor | None = None) -> float:
        """Set ``gamma`` so projected visual tokens start at the RMS scale of the LM input embeddings.

        Rule: ``gamma₀ = rms(E) / rms(MLP(u))``, ``rms(E) = sqrt(mean(E²))`` over the LM input-embedding matrix,
        ``u``: ``tower_tokens`` when given (real tower outputs, the best calibration), else a fixed probe of 1,024
        standard-normal vectors (the statistics of the tower's LayerNorm-ed outputs). With
        ``config.projector_gamma_init`` set (and no ``tower_tokens``), that value is used instead. Returns gamma.
        """
        projector = self.multi_modal_projector
        if projector.gamma.device.type == "meta":
            return float("nan")
        if self.config.projector_gamma_init is not None and tower_tokens is None:
            value = float(self.config.projector_gamma_init)
        else:
            weight = self.get_input_embeddings().weight
            # float64 sums over row blocks: a float32 norm of a 28M-entry matrix is already 0.2 % off
            squares = sum(float(block.double().pow(2).sum()) for block in weight.detach().split(4096))
            target = math.sqrt(squares / weight.numel())
            if tower_tokens is None:
                gen = torch.Generator(device="cpu").manual_seed(GAMMA_PROBE_SEED)
                tower_tokens = torch.randn(GAMMA_PROBE_SIZE, projector.linear_1.in_features, generator=gen)
            probe = tower_tokens.reshape(-1, tower_tokens.shape[-1]).to(projector.linear_1.weight)
            out = projector.mlp(probe).float()
            current = float(out.pow(2).mean().sqrt())
            value = target / current if current > 0 and math.isfinite(target / current) else 1.0
        projector.gamma.fill_(value)
        return value

    # ------------------------------------------------------------------------------------------ slide side
    def _tower_tokens(
        self, tile_features: Tensor, tile_coords: Tensor, tile_mask: Tensor | None, need_attention: bool
    ) -> tuple[Tensor, Any]:
        """Run the slide tower. A frozen tower (no parameter requiring grad) runs without autograd and in eval mode
        (no dropout / drop-path), whatever ``model.train()`` said."""
        tower = self.vision_tower
        trainable = any(p.requires_grad for p in tower.parameters())
        was_training = tower.training
        if not trainable:
            tower.eval()
        layer = self.config.vision_feature_layer
        try:
            with torch.no_grad() if not trainable else nullcontext():
                out = tower(
                    tile_features,
                    tile_coords,
                    tile_mask,
                    output_hidden_states=layer != -1,
                    output_cls_attention=need_attention,
                    return_dict=True,
                )
        finally:
            tower.train(was_training)
        states = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
        return states[:, 1:], out  # [B, N, D] tile tokens (CLS dropped)

    def question_embedding(self, input_ids: Tensor, question_mask: Tensor | None) -> Tensor:
        """Mean LM input embedding of each prompt's question tokens, ``input_ids``/``question_mask [B, T]`` →
        ``[B, E]`` (used by ``topk_prompt``). The mask comes from the processor (``InstructionCollator``,
        ``build_generation_inputs``): the current user question only, the same tokens in training and at inference,
        never later turns, earlier answers or template text."""
        if question_mask is None:
            raise ValueError(
                "prompt-guided token selection needs question_mask [B, T] (the question's tokens): "
                "InstructionCollator and wsi_llava.build_generation_inputs return it; or pass "
                "question_embedding [B, E] yourself."
            )
        if question_mask.shape != input_ids.shape:
            raise ValueError(
                f"question_mask has shape {tuple(question_mask.shape)} but input_ids "
                f"{tuple(input_ids.shape)}; they must be aligned."
            )
        use = question_mask.to(input_ids.device).bool() & (input_ids != self.config.slide_token_id)  # [B, T]
        if not bool(use.any(dim=1).all()):
            empty = (~use.any(dim=1)).nonzero().flatten().tolist()[:5]
            raise ValueError(
                f"question_mask marks no question token in row(s) {empty}; prompt-guided selection "
                "needs the question text (rows built by WSIProcessor mark it)."
            )
        embeds = self.get_input_embeddings()(input_ids).float()  # [B, T, E]
        return masked_mean(embeds, use)  # [B, E] (every row has a question token, checked above)

    def select_slide_tokens(
        self,
        tile_features: Tensor,
        tile_coords: Tensor,
        tile_mask: Tensor | None = None,
        token_selection: str | None = None,
        token_selection_kwargs: dict | None = None,
        question_embedding: Tensor | None = None,
    ) -> tuple[TokenSelectionOutput, Tensor]:
        """Tower → token selection, in tower space: ``(selection, tile_mask [B, N])``. The tokens the projector
        sees (merged PruMerge tokens included; with ``config.prepend_slide_embedding`` the tower's pooled slide
        embedding first, index -1), so gamma can be calibrated on exactly them.

        ``token_selection`` / ``token_selection_kwargs`` override the config for this call (the kwargs replace,
        not update, the config's when the selector is overridden).
        """
        name = token_selection or self.config.token_selection
        if token_selection_kwargs is None:
            token_selection_kwargs = (
                self.config.token_selection_kwargs
                if token_selection is None or token_selection == self.config.token_selection
                else {}
            )
        entry = get_token_selector(name)
        need_attention = "cls_attention" in entry.requires or "keys" in entry.requires
        if "question_embedding" in entry.requires and question_embedding is None:
            raise ValueError(
                f"token selector {name!r} needs the question: call the model with input_ids and "
                "question_mask (or pass question_embedding=[B, E])."
            )
        tokens, tower_out = self._tower_tokens(tile_features, tile_coords, tile_mask, need_attention)
        batch, num = tokens.shape[:2]
        mask = (
            torch.ones(batch, num, dtype=torch.bool, device=tokens.device)
            if tile_mask is None
            else tile_mask.to(device=tokens.device, dtype=torch.bool)
        )
        grid = (
            torch.div(
                tile_coords.to(tokens.device).long(), int(self.config.vision_config.tile_size), rounding_mode="floor"
            )
            .clamp_min(0)
            .masked_fill(~mask.unsqueeze(-1), 0)
        )
        projector = self.multi_modal_projector

        def project_for_scoring(x: Tensor) -> Tensor:
            with torch.no_grad():
                return projector(x)

        selection = run_token_selector(
            name,
            TokenSelectionInputs(
                tokens=tokens,
                token_mask=mask,
                grid=grid,
                cls_attention=tower_out.cls_attention,
                keys=tower_out.tile_keys,
                question_embedding=question_embedding,
                project=project_for_scoring,
            ),
            **token_selection_kwargs,
        )
        if self.config.prepend_slide_embedding:  # the tower's slide embedding first, then the selected tiles
            slide = tower_out.pooler_output.to(selection.tokens.dtype).unsqueeze(1)  # [B, 1, D]
            selection = TokenSelectionOutput(
                tokens=torch.cat([slide, selection.tokens], dim=1),  # [B, 1 + K, D]
                token_mask=torch.cat([selection.token_mask.new_ones(batch, 1), selection.token_mask], dim=1),
                indices=torch.cat([selection.indices.new_full((batch, 1), -1), selection.indices], dim=1),
            )
        return selection, mask

    def get_slide_features(
        self,
        tile_features: Tensor,
        tile_coords: Tensor,
        tile_mask: Tensor | None = None,
        token_selection: str | None = None,
        token_selection_kwargs: dict | None = None,
        question_embedding: Tensor | None = None,
    ) -> WSILlavaSlideFeatures:
        """Tower → selection → projector for a batch of slides (see :class:`WSILlavaSlideFeatures`)."""
        selection, mask = self.select_slide_tokens(
            tile_features, tile_coords, tile_mask, token_selection, token_selection_kwargs, question_embedding
        )
        visual = self.multi_modal_projector(selection.tokens)  # [B, K, E]
        return WSILlavaSlideFeatures(
            visual_embeds=visual,
            visual_mask=selection.token_mask,
            selection_indices=selection.indices,
            visual_token_counts=selection.token_mask.sum(dim=1),
            tile_counts=mask.sum(dim=1),
        )

    # ------------------------------------------------------------------------------------------ splice
    def splice(
        self,
        input_ids: Tensor,
        inputs_embeds: Tensor,
        visual_embeds: Tensor,
        visual_mask: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        padding_side: str = "right",
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """Replace each row's single slide placeholder by that slide's ``K_b`` visual tokens.

        input_ids / attention_mask / labels ``[B, T]``, inputs_embeds ``[B, T, E]``, visual ``[B, K, E]`` + mask
        ``[B, K]`` → embeds ``[B, L, E]``, attention ``[B, L]``, labels ``[B, L]`` (-100 on visual tokens) and
        positions ``[B, L]``, ``L = T − 1 + max_b K_b``. Rows shorter than ``L`` are padded on ``padding_side``
        ("left" for generation), so real tokens stay contiguous. Fully vectorised (one scatter, no row loop).
        """
        batch, length = input_ids.shape
        slide_id = self.config.slide_token_id
        if slide_id is None:
            raise ValueError(
                "config.slide_token_id is None: set it to the processor's slide_token_id "
                "(WSIProcessor.slide_token_id) when building the model (from_parts(slide_token_id=...))."
            )
        is_slide = input_ids == slide_id  # [B, T]
        per_row = is_slide.sum(dim=1)
        if not bool((per_row == 1).all()):
            bad = [(i, int(c)) for i, c in enumerate(per_row.tolist()) if c != 1][:5]
            raise ValueError(
                f"every prompt must contain the slide placeholder (token id {slide_id}) exactly once "
                f"when slides are given; (row, count) = {bad}. Build prompts with "
                "WSIProcessor.build_instruction_example / build_generation_prompt, and do not truncate "
                "them before the placeholder."
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        k_rows = visual_mask.sum(dim=1)  # [B]
        new_len = length - 1 + int(k_rows.max())
        offset = (new_len - (length - 1 + k_rows)) if padding_side == "left" else torch.zeros_like(k_rows)  # [B]
        place = is_slide.long().argmax(dim=1)  # [B] placeholder position

        pos = torch.arange(length, device=input_ids.device).unsqueeze(0)  # [1, T]
        text_target = pos + (pos > place[:, None]) * (k_rows[:, None] - 1) + offset[:, None]  # [B, T]
        vis_rank = visual_mask.long().cumsum(dim=1) - 1  # [B, K]
        vis_target = place[:, None] + vis_rank + offset[:, None]  # [B, K]
        row_base = torch.arange(batch, device=input_ids.device)[:, None] * new_len
        text_keep, vis_keep = ~is_slide, visual_mask.bool()
        text_index = (text_target + row_base)[text_keep]  # flat indices into [B * L]
        vis_index = (vis_target + row_base)[vis_keep]
        index = torch.cat([text_index, vis_index])

        hidden = inputs_embeds.shape[-1]
        source = torch.cat([inputs_embeds[text_keep], visual_embeds.to(inputs_embeds.dtype)[vis_keep]])
        embeds = inputs_embeds.new_zeros(batch * new_len, hidden).index_copy(0, index, source)
        mask_src = torch.cat([attention_mask[text_keep], attention_mask.new_ones(vis_index.shape)])
        new_mask = attention_mask.new_zeros(batch * new_len).index_copy(0, index, mask_src).view(batch, new_len)
        new_labels = None
        if labels is not None:
            lab_src = torch.cat([labels[text_keep], labels.new_full(vis_index.shape, -100)])
            new_labels = labels.new_full((batch * new_len,), -100).index_copy(0, index, lab_src).view(batch, new_len)
        positions = (new_mask.long().cumsum(dim=1) - 1).clamp_min(0)
        return embeds.view(batch, new_len, hidden), new_mask, new_labels, positions

    @staticmethod
    def _padding_side(attention_mask: Tensor | None) -> str:
        """'left' when rows are left padded (first column has padding, last column none), else 'right'."""
        if attention_mask is None:
            return "right"
        left = bool((attention_mask[:, 0] == 0).any()) and bool((attention_mask[:, -1] == 1).all())
        return "left" if left else "right"

    def prepare_multimodal_inputs(
        self,
        input_ids: Tensor,
        tile_features: Tensor,
        tile_coords: Tensor,
        tile_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        token_selection: str | None = None,
        token_selection_kwargs: dict | None = None,
        question_embedding: Tensor | None = None,
        question_mask: Tensor | None = None,
        padding_side: str | None = None,
    ) -> tuple[dict[str, Tensor | None], WSILlavaSlideFeatures]:
        """Prompt ids + slides → the spliced LM inputs (``inputs_embeds``, ``attention_mask``, ``position_ids``,
        ``labels``) and the slide features / selection statistics."""
        name = token_selection or self.config.token_selection
        if question_embedding is None and "question_embedding" in get_token_selector(name).requires:
            question_embedding = self.question_embedding(input_ids, question_mask)
        slides = self.get_slide_features(
            tile_features, tile_coords, tile_mask, token_selection, token_selection_kwargs, question_embedding
        )
        text_embeds = self.get_input_embeddings()(input_ids)  # [B, T, E]
        side = padding_side or self._padding_side(attention_mask)
        embeds, mask, new_labels, positions = self.splice(
            input_ids, text_embeds, slides.visual_embeds, slides.visual_mask, attention_mask, labels, side
        )
        return {
            "inputs_embeds": embeds,
            "attention_mask": mask,
            "position_ids": positions,
            "labels": new_labels,
        }, slides

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: Tensor | None = None,
        tile_features: Tensor | None = None,
        tile_coords: Tensor | None = None,
        tile_mask: Tensor | None = None,
        labels: Tensor | None = None,
        token_selection: str | None = None,
        token_selection_kwargs: dict | None = None,
        question_embedding: Tensor | None = None,
        question_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> WSILlavaModelOutputWithPast:
        """With slides: ``input_ids [B, T]`` (one placeholder per row) + ``tile_features [B, N, D_in]``,
        ``tile_coords [B, N, 2]``, ``tile_mask [B, N]`` → LM states of the spliced sequence (``question_mask [B, T]``:
        the question's tokens, for prompt-guided selection). Without slides (decode steps of ``generate``, text-only
        prompts): a plain LM pass."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds.")
        slides = None
        if tile_features is not None:
            if input_ids is None:
                raise ValueError(
                    "slides need input_ids (to find the slide placeholder); inputs_embeds cannot carry "
                    "it. Use WSILlavaModel.prepare_multimodal_inputs to build spliced embeddings."
                )
            if tile_coords is None:
                raise ValueError(
                    "tile_features were given without tile_coords [B, N, 2] (x, y level-0 pixels); "
                    "the slide encoder's positions need them (WSIProcessor returns both)."
                )
            spliced, slides = self.prepare_multimodal_inputs(
                input_ids,
                tile_features,
                tile_coords,
                tile_mask,
                attention_mask,
                labels,
                token_selection,
                token_selection_kwargs,
                question_embedding,
                question_mask,
            )
            inputs_embeds, attention_mask = spliced["inputs_embeds"], spliced["attention_mask"]
            position_ids, labels = spliced["position_ids"], spliced["labels"]
            input_ids = None
        outputs = self.language_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        return WSILlavaModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=getattr(outputs, "cache", None),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            attention_mask=attention_mask if slides is not None else None,
            position_ids=position_ids if slides is not None else None,
            labels=labels,
            visual_token_counts=slides.visual_token_counts if slides is not None else None,
            tile_counts=slides.tile_counts if slides is not None else None,
            selection_indices=slides.selection_indices if slides is not None else None,
        )


# ------------------------------------------------------------------------------------------------ generation head
class WSILlavaForConditionalGeneration(WSILlavaPreTrainedModel, GenerationMixin):
    """WSI-LLaVA with the LM head: training loss on answer tokens, and ``generate()`` over slides + prompts."""

    def __init__(self, config: WSILlavaConfig):
        super().__init__(config)
        self.model = WSILlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        embedding = self.model.language_model.get_input_embeddings()
        name = next((n for n, m in self.model.language_model.named_modules() if m is embedding), "embed_tokens")
        # Tie to wherever this LM keeps its input embedding (embed_tokens, wte, ...); used only if tied.
        self._tied_weights_keys = {"lm_head.weight": f"model.language_model.{name}.weight"}
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.lm_head = new_embeddings

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.vision_tower

    @property
    def multi_modal_projector(self) -> WSILlavaProjector:
        return self.model.multi_modal_projector

    @property
    def language_model(self) -> nn.Module:
        return self.model.language_model

    def get_slide_features(self, *args: Any, **kwargs: Any) -> WSILlavaSlideFeatures:
        return self.model.get_slide_features(*args, **kwargs)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: Tensor | None = None,
        tile_features: Tensor | None = None,
        tile_coords: Tensor | None = None,
        tile_mask: Tensor | None = None,
        labels: Tensor | None = None,
        token_selection: str | None = None,
        token_selection_kwargs: dict | None = None,
        question_embedding: Tensor | None = None,
        question_mask: Tensor | None = None,
        logits_to_keep: int | Tensor = 0,
        **kwargs: Any,
    ) -> WSILlavaCausalLMOutputWithPast:
        """Training: ``input_ids``/``attention_mask``/``labels [B, T]`` (right padded, one slide placeholder per
        row, labels -100 outside answers) + ``tile_features [B, N, D_in]``, ``tile_coords [B, N, 2]``,
        ``tile_mask [B, N]`` → loss over answer tokens. ``token_selection(_kwargs)`` override the config per call.
        The returned ``labels``/``attention_mask`` are those of the spliced sequence, aligned with ``logits``."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            tile_features=tile_features,
            tile_coords=tile_coords,
            tile_mask=tile_mask,
            labels=labels,
            token_selection=token_selection,
            token_selection_kwargs=token_selection_kwargs,
            question_embedding=question_embedding,
            question_mask=question_mask,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, slice_indices, :])
        labels = outputs.labels if tile_features is not None else labels
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return WSILlavaCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            attention_mask=outputs.attention_mask,
            position_ids=outputs.position_ids,
            labels=labels,
            visual_token_counts=outputs.visual_token_counts,
            tile_counts=outputs.tile_counts,
            selection_indices=outputs.selection_indices,
        )

    # ------------------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        tile_features: Tensor | None = None,
        tile_coords: Tensor | None = None,
        tile_mask: Tensor | None = None,
        token_selection: str | None = None,
        token_selection_kwargs: dict | None = None,
        question_embedding: Tensor | None = None,
        question_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """Batched generation over slides + **left-padded** prompts (``processor.tokenizer.padding_side = "left"``).

        The slides are encoded, selected, projected and spliced **once, before prefill**; ``GenerationMixin.generate``
        then runs on the spliced ``inputs_embeds`` with the KV cache, so no slide tensor reaches a decode step.
        Like the original LLaVA, the returned ids hold **only the new tokens** (decode them with
        ``processor.batch_decode(ids, skip_special_tokens=True)``). Without slides it is the LM's plain generate.
        ``self.last_selection_stats`` keeps the per-slide visual token / tile counts of the last call.
        """
        if tile_features is None:  # text only (e.g. the no-slide baseline)
            return super().generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if input_ids is None:
            raise ValueError("generate() with slides needs input_ids holding the slide placeholder.")
        if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
            raise ValueError(
                "generate() needs left-padded prompts (some rows end with padding): set "
                "processor.tokenizer.padding_side = 'left' or use wsi_llava.build_generation_inputs."
            )
        spliced, slides = self.model.prepare_multimodal_inputs(
            input_ids,
            tile_features,
            tile_coords,
            tile_mask,
            attention_mask,
            None,
            token_selection,
            token_selection_kwargs,
            question_embedding,
            question_mask,
            padding_side="left",
        )
        self.last_selection_stats = {
            "visual_token_counts": slides.visual_token_counts.tolist(),
            "tile_counts": slides.tile_counts.tolist(),
        }
        return super().generate(
            inputs_embeds=spliced["inputs_embeds"], attention_mask=spliced["attention_mask"], **kwargs
        )

    def prepare_inputs_for_generation(
        self,
        input_ids: Tensor,
        next_sequence_length: int | None = None,
        cache: Cache | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Slide inputs are consumed before prefill; never forward them to a decode step (transformers 5.x passes
        unknown kwargs on every step)."""
        for name in SLIDE_INPUT_NAMES:
            kwargs.pop(name, None)
        return super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            cache=cache,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )

    # ------------------------------------------------------------------------------------------ assembly
    @classmethod
    def from_parts(
        cls,
        vision_tower: str | os.PathLike | nn.Module,
        language_model: str | os.PathLike | nn.Module,
        *,
        slide_token_id: int | None = None,
        token_selection: str = "none",
        token_selection_kwargs: dict | None = None,
        projector_gamma_init: float | None = None,
        vision_feature_layer: int = -1,
        prepend_slide_embedding: bool = True,
        language_model_kwargs: dict | None = None,
        vision_tower_kwargs: dict | None = None,
        **config_kwargs: Any,
    ) -> WSILlavaForConditionalGeneration:
        """Assemble WSI-LLaVA from a slide tower and a causal LM, with a fresh projector (gamma by the RMS rule).

        Args:
            vision_tower: a SlideEncoder or WSI-CLIP checkpoint (path or Hub id) or model instance.
            language_model: any causal-LM checkpoint (``AutoModelForCausalLM``: a folder or Hub id) or a model
                instance. A ``.gguf`` file or ``"gguf:smollm2"``: resolve it first with
                ``wsi_llava.language_models.resolve_language_model`` (dequantised once into a cached folder).
            slide_token_id: the placeholder id (``processor.slide_token_id``; after ``ensure_slide_token`` also
                call ``model.resize_token_embeddings(len(tokenizer))``).
            prepend_slide_embedding: put the tower's pooled slide embedding (``pooler_output``) before the selected
                tile tokens (see :class:`WSILlavaConfig`); on by default for new models.
            language_model_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (``dtype``,
                ``attn_implementation``, ...).
        """
        from .slide_towers import SLIDE_ENCODER_MODEL_TYPE, load_slide_tower  # checkpoint reading lives there

        tower = load_slide_tower(vision_tower, (SLIDE_ENCODER_MODEL_TYPE,), **(vision_tower_kwargs or {}))
        if (
            str(language_model).lower().endswith(".gguf")
            or str(language_model).startswith("gguf:")
            or "gguf_file" in (language_model_kwargs or {})
        ):
            raise ValueError(
                f"from_parts: language_model {language_model!r} is a GGUF source; convert it first: "
                "language_model = wsi_llava.language_models.resolve_language_model(source, gguf_file)."
            )
        lm = (
            language_model
            if isinstance(language_model, nn.Module)
            else AutoModelForCausalLM.from_pretrained(language_model, **(language_model_kwargs or {}))
        )
        config = WSILlavaConfig(
            vision_config=tower.config,
            text_config=lm.config,
            slide_token_id=slide_token_id,
            token_selection=token_selection,
            token_selection_kwargs=token_selection_kwargs,
            projector_gamma_init=projector_gamma_init,
            vision_feature_layer=vision_feature_layer,
            prepend_slide_embedding=prepend_slide_embedding,
            **config_kwargs,
        )
        with torch.device("meta"):  # no throw-away random init of a large LM
            model = cls(config)
        model.model.vision_tower = tower
        model.model.language_model = getattr(lm, lm.base_model_prefix)
        model.lm_head = lm.get_output_embeddings()
        lm_weight = model.lm_head.weight
        # fp32 master weights whatever the LM dtype; splice casts the visual tokens to the LM embedding dtype
        projector = WSILlavaProjector(config).to(device=lm_weight.device, dtype=torch.float32)
        for linear in (projector.linear_1, projector.linear_2):
            nn.init.xavier_uniform_(linear.weight)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        model.model.multi_modal_projector = projector
        model.model.reset_projector_gamma()
        if getattr(lm, "generation_config", None) is not None:
            model.generation_config = lm.generation_config
        return model


__all__ = [
    "WSILlavaPreTrainedModel",
    "WSILlavaModel",
    "WSILlavaForConditionalGeneration",
    "WSILlavaProjector",
    "WSILlavaSlideFeatures",
    "WSILlavaModelOutputWithPast",
    "WSILlavaCausalLMOutputWithPast",
    "SLIDE_INPUT_NAMES",
]
