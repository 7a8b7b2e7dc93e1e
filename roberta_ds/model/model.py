"""Single-device PyTorch RoBERTa encoder with its masked-LM head (Liu et al. 2019).

The architecture is RoBERTa's exactly (fairseq `roberta_base`, Hugging Face `RobertaForMaskedLM`):
word + learned position + one token-type embedding, LayerNorm (eps 1e-5), post-LN layers with exact
GELU, dropout on hidden states and attention probabilities, and an LM head (dense, GELU, LayerNorm,
decoder tied to the word embedding, bias). No DeepSpeed or torch.distributed here: parallelism,
precision and sharding belong to the engine (engine/).

Speed choices, none of which changes the maths:
- attention (roberta_ds/model/attention.py, `model.attention_kernel`): "sdpa" runs
  `F.scaled_dot_product_attention` with a key-padding mask (cuDNN's fused kernels on Hopper GPUs;
  bench/model_check.py shows which kernel runs); "varlen" runs FlashAttention-2's variable-length kernel,
  with dropout, over each row's real tokens and its padding as separate segments, with no mask. Q, K
  and V come from one fused projection; `has_padding=False` drops the mask for a batch without padding;
- `model.unpad` (with "varlen") runs the layers on the real tokens only, packed into one
  sequence by the loader's `unpad_index` (`encode_unpadded`): no GEMM, LayerNorm or GELU work on padding;
- both default to "auto", which the trainer decides once for the run (engine/resolved.py): varlen and
  padding-free layers where the varlen kernel runs (CUDA in bf16, fp16 or a 16-bit autocast), sdpa and
  padded layers elsewhere (`config.resolve_auto`); a model built from an undecided config takes sdpa;
- the training call gathers the hidden states of the K labelled positions once, after the layer
  stack, and runs the LM head on those (B, K, H) rows only: 15% of the vocabulary projection work;
- no data-dependent Python control flow, `.item()` or `nonzero()` in `forward`, so
  `torch.compile(model, fullgraph=True)` captures it whole and no step waits on the host.

    import torch
    from roberta_ds.config import model_config
    from roberta_ds.model.model import RobertaMLM
    torch.manual_seed(0)
    model = RobertaMLM(model_config("tiny", vocab_size=1000))
    ids = torch.randint(4, 1000, (2, 16))                      # (B, T), padding = cfg.pad_id
    loss = model(ids, torch.tensor([[3, 5], [1, 0]]), torch.tensor([[7, 9], [11, -100]]))
    loss, correct = model(ids, torch.tensor([[3, 5], [1, 0]]), torch.tensor([[7, 9], [11, -100]]),
                          count_correct=True)             # + top-1 hits among the 3 labels
    logits = model.logits(ids)                                 # (B, T, V)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from roberta_ds.config import ModelConfig, resolve_auto
from roberta_ds.errors import ConfigError
from roberta_ds.model.attention import (
    AttentionInputs,
    attend,
    attention_inputs,
    packed_inputs,
    real_tokens,
)
from roberta_ds.model.hash_dropout import HashDropout

IGNORE_INDEX = -100
"""Label of an entry that takes no part in the loss (HF's and torch's convention)."""


def position_ids(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """RoBERTa positions: real tokens count from pad_id + 1, padding keeps pad_id (HF's
    `create_position_ids_from_input_ids`). (B, T) int64 -> (B, T) int64."""
    not_pad = input_ids.ne(pad_id)
    return torch.cumsum(not_pad, dim=1) * not_pad + pad_id


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over entries whose label is not -100, computed in fp32.

    logits (..., V), labels (...) -> scalar. When every label is -100 the loss is exactly 0 with
    zero gradients (not NaN): the sum is divided by max(count, 1), which needs no host sync.
    """
    flat = logits.reshape(-1, logits.shape[-1]).float()
    target = labels.reshape(-1)
    total = F.cross_entropy(flat, target, ignore_index=IGNORE_INDEX, reduction="sum")
    count = target.ne(IGNORE_INDEX).sum().clamp(min=1)
    return total / count


def masked_lm_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many entries whose label is not -100 have that label as their top-1 prediction.

    logits (..., V), labels (...) -> int64 scalar (a tensor: no host sync). A tie goes to the lowest
    id, as `argmax` breaks it.
    """
    hit = logits.argmax(dim=-1).eq(labels) & labels.ne(IGNORE_INDEX)
    return hit.sum()


def make_dropout(cfg: ModelConfig) -> nn.Module:
    """The hidden-state dropout `cfg.dropout_rng` asks for (no parameters either way)."""
    return HashDropout(cfg.dropout) if cfg.dropout_rng == "hash" else nn.Dropout(cfg.dropout)


class Embeddings(nn.Module):
    """Word + token-type (type 0) + learned position embedding, then LayerNorm and dropout."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.pad_id = cfg.pad_id
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_id)
        self.position = nn.Embedding(cfg.max_positions, cfg.hidden_size, padding_idx=cfg.pad_id)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = make_dropout(cfg)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids and their RoBERTa positions (default: `position_ids(input_ids)`) -> (B, T, H)."""
        # Summed in HF's order (word + type, then + position) so fp32 results match to the last bit.
        x = self.word(input_ids) + self.token_type.weight[0]  # (B, T, H)
        x = x + self.position(position_ids(input_ids, self.pad_id) if positions is None else positions)
        return self.drop(self.norm(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention: fused QKV projection, the configured kernel, output projection."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.attention_dropout = cfg.attention_dropout
        # Rows [0, H) are the query projection, [H, 2H) key, [2H, 3H) value (see hf_names.py).
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        """x (B, T, H), attn from `attention.attention_inputs` / `packed_inputs` -> (B, T, H)."""
        B, T, H = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, H // self.num_heads)
        return self.proj(attend(qkv, attn, self.attention_dropout if self.training else 0.0))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.hidden_size, cfg.ffn_size)
        self.proj = nn.Linear(cfg.ffn_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))  # exact (erf) GELU, as RoBERTa


class Layer(nn.Module):
    """Post-LN transformer layer: x = LN(x + drop(attn(x))); x = LN(x + drop(ffn(x)))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = make_dropout(cfg)

    def forward(self, x: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        x = self.attn_norm(x + self.drop(self.attn(x, attn)))
        return self.ffn_norm(x + self.drop(self.ffn(x)))


class LMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder (the word embedding, passed in: one shared Parameter) + bias."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x: torch.Tensor, decoder_weight: torch.Tensor) -> torch.Tensor:
        x = self.norm(F.gelu(self.dense(x)))  # (..., H)
        return F.linear(x, decoder_weight, self.bias)  # (..., V)


class RobertaMLM(nn.Module):
    """RoBERTa encoder + masked-LM head.

    Parameter names (the map to Hugging Face's is the table in hf_names.py):
    `embeddings.{word,position,token_type}.weight`, `embeddings.norm.*`,
    `layers.<i>.attn.{qkv,proj}.*`, `layers.<i>.attn_norm.*`, `layers.<i>.ffn.{fc,proj}.*`,
    `layers.<i>.ffn_norm.*`, `head.dense.*`, `head.norm.*`, `head.bias`. There is no separate decoder
    weight: the head multiplies by `embeddings.word.weight` itself, so the tie cannot come undone.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # The trainer passes the kernel and layout decided for where it runs (engine/resolved.py; the
        # loader must know `unpad` too). A config left "auto" gets the choice that runs anywhere:
        # sdpa over padded rows. Nothing is decided per call.
        self.cfg = cfg = resolve_auto(cfg, flash=False)
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))
        self.head = LMHead(cfg)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """RoBERTa's init (fairseq `init_bert_params`, HF `_init_weights`): every Linear and
        Embedding weight ~ N(0, init_std) with the padding rows zeroed, biases 0, LayerNorm 1 / 0.
        Deterministic given `torch.manual_seed`: modules are visited in registration order."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        self.head.bias.zero_()

    def _check_length(self, input_ids: torch.Tensor) -> None:
        # A static shape check (no data involved), so it costs nothing under torch.compile.
        if input_ids.shape[1] > self.cfg.max_seq_len:
            raise ConfigError(
                f"input length {input_ids.shape[1]} exceeds the {self.cfg.max_seq_len} tokens that "
                f"model.max_positions = {self.cfg.max_positions} serves (positions start at pad_id + 1 = "
                f"{self.cfg.pad_id + 1}); shorten data.max_seq_len or raise model.max_positions"
            )

    def encode(
        self, input_ids: torch.Tensor, keep: torch.Tensor | None, kernel: str | None = None
    ) -> torch.Tensor:
        """Hidden states of the last layer. input_ids (B, T); keep (B, T) bool (True = a real token) or
        None for no attention mask at all; kernel: "sdpa" | "varlen", default the configured
        one (segments need right-padded rows) -> (B, T, H)."""
        self._check_length(input_ids)
        kernel = kernel or self.cfg.attention_kernel
        attn = attention_inputs(keep, kernel)  # built once for every layer
        return self._layers(self.embeddings(input_ids), attn)

    def encode_unpadded(
        self, input_ids: torch.Tensor, unpad_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer stack on the real tokens only. input_ids (B, T) right-padded; unpad_index (N,) int64
        flat indices of `attention.real_tokens(input_ids)` in row-major order (the loader's) ->
        (hidden (N, H), offsets (B + 1,) int32 of each row in it). N is known on the host from the
        index's shape, so nothing syncs; under torch.compile it is a dynamic dimension."""
        self._check_length(input_ids)
        attn = packed_inputs(real_tokens(input_ids, self.cfg.pad_id))  # always per segment
        ids = input_ids.flatten()[unpad_index][None]  # (1, N)
        positions = position_ids(input_ids, self.cfg.pad_id).flatten()[unpad_index][None]
        x = self._layers(self.embeddings(ids, positions), attn)
        return x[0], attn.mask

    def _layers(self, x: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        for layer in self.layers:
            if self.cfg.activation_checkpointing and self.training:
                x = checkpoint(layer, x, attn, use_reentrant=False)
            else:
                x = layer(x, attn)
        return x

    def forward(
        self,
        input_ids: torch.Tensor,
        mlm_positions: torch.Tensor,
        mlm_labels: torch.Tensor,
        *,
        has_padding: bool = True,
        unpad_index: torch.Tensor | None = None,
        count_correct: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Training loss: mean cross-entropy over the labelled entries.

        input_ids (B, T) int64, right-padded with cfg.pad_id; mlm_positions (B, K) int64 positions
        within each row (unused entries point at 0 with label -100); mlm_labels (B, K) int64 original
        token ids or -100. Returns a scalar; exactly 0 (zero gradients) when every label is -100.
        `has_padding=False` promises the batch holds no pad token and drops the attention mask.
        With `model.unpad`, `unpad_index` (the loader's, see `encode_unpadded`) runs the layers on the
        real tokens only; without it the padded layout runs, with the same result.
        `count_correct=True` (validation) returns (loss, correct): correct is the int64 number of
        labelled entries whose top-1 prediction (argmax over the vocabulary) is the label.
        """
        if self.cfg.unpad and unpad_index is not None and has_padding:
            hidden, offsets = self.encode_unpadded(input_ids, unpad_index)  # (N, H)
            picked = hidden[offsets[:-1, None].long() + mlm_positions]  # (B, K, H); slot 0 of a row exists
        else:
            keep = input_ids.ne(self.cfg.pad_id) if has_padding else None
            hidden = self.encode(input_ids, keep)  # (B, T, H)
            index = mlm_positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])  # (B, K, H)
            picked = torch.gather(hidden, 1, index)  # (B, K, H): the only rows the head sees
        logits = self.head(picked, self.embeddings.word.weight)  # (B, K, V)
        loss = masked_lm_loss(logits, mlm_labels)
        if not count_correct:
            return loss
        return loss, masked_lm_correct(logits, mlm_labels)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Full vocabulary logits at every position, (B, T) -> (B, T, V), for inference and export
        checks. Positions always come from `input_ids` (as in HF); the attention mask defaults to
        `input_ids != pad_id`."""
        keep = input_ids.ne(self.cfg.pad_id) if attention_mask is None else attention_mask.bool()
        # SDPA's key mask whatever the training kernel: a caller's mask need not be right-padded.
        return self.head(self.encode(input_ids, keep, "sdpa"), self.embeddings.word.weight)
