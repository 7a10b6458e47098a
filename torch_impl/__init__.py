"""seqtwin's PyTorch backend: the same models, names and signatures as
``reference``, with hand-written fused backward passes behind autograd.
Never imports ``reference``.

The functional ``*_forward`` / ``*_backward`` pairs are the explicit-cache twins
of the reference ones (no autograd inside); the modules ``RNN``, ``LSTM``,
``GRU`` are ``torch.nn.Module``s whose autograd runs through custom
``torch.autograd.Function``s with those hand-written backwards.

Switch backends by changing one import: ``reference`` (NumPy oracle) or
``torch_impl`` (PyTorch), each imported ``as sq``.
"""

from .activations import (
    gelu_backward,
    gelu_forward,
    log_softmax,
    log_softmax_backward,
    log_softmax_forward,
    relu_backward,
    relu_forward,
    sigmoid,
    sigmoid_backward,
    sigmoid_forward,
    softmax,
    softmax_backward,
    softmax_forward,
    tanh_backward,
    tanh_forward,
)
from .attention import (
    MultiheadAttention,
    multi_head_attention_backward,
    multi_head_attention_forward,
    scaled_dot_product_attention,
    scaled_dot_product_attention_backward,
    scaled_dot_product_attention_forward,
)
from .decoding import (
    BeamResult,
    DecodeResult,
    beam_search,
    greedy_decode,
    sample_decode,
    sample_tokens,
    select_rows,
)
from .dropout import dropout_backward, dropout_forward, dropout_mask
from .embedding import embedding_backward, embedding_forward
from .encoder_decoder import (
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
    transformer_backward,
    transformer_decoder_backward,
    transformer_decoder_forward,
    transformer_decoder_layer_backward,
    transformer_decoder_layer_forward,
    transformer_dropout_mask_shapes,
    transformer_encoder_backward,
    transformer_encoder_forward,
    transformer_encoder_layer_backward,
    transformer_encoder_layer_forward,
    transformer_forward,
    transformer_param_shapes,
)
from .generation import GenerateOutput, GenerationConfig
from .gpt2 import load_gpt2, save_gpt2
from .gradcheck import gradcheck, numerical_gradients
from .gru import GRU, gru_backward, gru_cell_backward, gru_cell_forward, gru_forward
from .language_model import RNNLM, rnn_lm_backward, rnn_lm_forward
from .linear import linear_backward, linear_forward
from .loss import cross_entropy_backward, cross_entropy_forward
from .lstm import LSTM, lstm_backward, lstm_cell_backward, lstm_cell_forward, lstm_forward
from .normalization import LayerNorm, layer_norm_backward, layer_norm_forward
from .optim import SGD, Adam, AdamW, clip_grad_norm, cosine_schedule
from .rnn import RNN, rnn_backward, rnn_cell_backward, rnn_cell_forward, rnn_forward
from .rnn_attention import (
    AdditiveAttention,
    LuongAttention,
    additive_attention_backward,
    additive_attention_forward,
    luong_attention_backward,
    luong_attention_forward,
)
from .seq2seq import (
    Seq2Seq,
    Seq2SeqConfig,
    Seq2SeqState,
    seq2seq_backward,
    seq2seq_dropout_mask_shapes,
    seq2seq_forward,
)
from .transformer import (
    GPT,
    GPTConfig,
    gpt_backward,
    gpt_dropout_masks,
    gpt_forward,
    gpt_param_shapes,
)
from .transformer_seq2seq import (
    TransformerSeq2Seq,
    TransformerSeq2SeqConfig,
    transformer_seq2seq_backward,
    transformer_seq2seq_dropout_mask_shapes,
    transformer_seq2seq_forward,
    transformer_seq2seq_param_shapes,
)

# Torch-only extras (documented; no NumPy twin): the autograd entry point of the hand-written
# attention, for use outside the modules.
TORCH_ONLY = [scaled_dot_product_attention.__name__]

__all__ = [
    # activations
    "sigmoid",
    "softmax",
    "log_softmax",
    "sigmoid_forward",
    "sigmoid_backward",
    "tanh_forward",
    "tanh_backward",
    "relu_forward",
    "relu_backward",
    "softmax_forward",
    "softmax_backward",
    "log_softmax_forward",
    "log_softmax_backward",
    "gelu_forward",
    "gelu_backward",
    # building blocks
    "linear_forward",
    "linear_backward",
    "embedding_forward",
    "embedding_backward",
    "cross_entropy_forward",
    "cross_entropy_backward",
    "dropout_mask",
    "dropout_forward",
    "dropout_backward",
    "numerical_gradients",
    "gradcheck",
    # recurrent layers
    "rnn_cell_forward",
    "rnn_cell_backward",
    "rnn_forward",
    "rnn_backward",
    "RNN",
    "lstm_cell_forward",
    "lstm_cell_backward",
    "lstm_forward",
    "lstm_backward",
    "LSTM",
    "gru_cell_forward",
    "gru_cell_backward",
    "gru_forward",
    "gru_backward",
    "GRU",
    # attention and normalization
    "layer_norm_forward",
    "layer_norm_backward",
    "LayerNorm",
    "scaled_dot_product_attention_forward",
    "scaled_dot_product_attention_backward",
    "multi_head_attention_forward",
    "multi_head_attention_backward",
    "MultiheadAttention",
    "additive_attention_forward",
    "additive_attention_backward",
    "AdditiveAttention",
    "luong_attention_forward",
    "luong_attention_backward",
    "LuongAttention",
    # encoder-decoder Transformer
    "transformer_encoder_layer_forward",
    "transformer_encoder_layer_backward",
    "transformer_decoder_layer_forward",
    "transformer_decoder_layer_backward",
    "transformer_encoder_forward",
    "transformer_encoder_backward",
    "transformer_decoder_forward",
    "transformer_decoder_backward",
    "transformer_forward",
    "transformer_backward",
    "transformer_param_shapes",
    "transformer_dropout_mask_shapes",
    "TransformerEncoderLayer",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerDecoder",
    "Transformer",
    # GPT and GPT-2 checkpoints
    "GPTConfig",
    "GPT",
    "gpt_forward",
    "gpt_backward",
    "gpt_param_shapes",
    "gpt_dropout_masks",
    "load_gpt2",
    "save_gpt2",
    # optimizers
    "SGD",
    "Adam",
    "AdamW",
    "clip_grad_norm",
    "cosine_schedule",
    # decoding
    "DecodeResult",
    "BeamResult",
    "select_rows",
    "greedy_decode",
    "sample_decode",
    "sample_tokens",
    "beam_search",
    "GenerationConfig",
    "GenerateOutput",
    # language models
    "rnn_lm_forward",
    "rnn_lm_backward",
    "RNNLM",
    # seq2seq
    "Seq2SeqConfig",
    "Seq2Seq",
    "Seq2SeqState",
    "seq2seq_forward",
    "seq2seq_backward",
    "seq2seq_dropout_mask_shapes",
    "TransformerSeq2SeqConfig",
    "TransformerSeq2Seq",
    "transformer_seq2seq_forward",
    "transformer_seq2seq_backward",
    "transformer_seq2seq_param_shapes",
    "transformer_seq2seq_dropout_mask_shapes",
]
