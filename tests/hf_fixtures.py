"""Tiny random Hugging Face models saved as safetensors: the oracles' weights (tests only)."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file


def save_tiny_t5(path: str, version: str = 'v1.1', seed: int = 0, vocab_size: int = 96,
                 d_model: int = 32, num_layers: int = 2, num_decoder_layers: int = 3,
                 num_heads: int = 4, d_kv: int = 8, d_ff: int = 48, eos_boost: float = 1.0):
  """Saves a random T5 (v1.1: gated-gelu, untied head; v1.0: relu, tied) and returns it (eval)."""
  from transformers import T5Config, T5ForConditionalGeneration
  torch.manual_seed(seed)
  v11 = version == 'v1.1'
  config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_kv, d_ff=d_ff,
                    num_layers=num_layers, num_decoder_layers=num_decoder_layers,
                    num_heads=num_heads, feed_forward_proj='gated-gelu' if v11 else 'relu',
                    tie_word_embeddings=not v11, dropout_rate=0.0,
                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  model = T5ForConditionalGeneration(config).eval()
  with torch.no_grad():
    for p in model.parameters():  # non-trivial norms and biases, not the ones/zeros init
      p.add_(0.05 * torch.randn_like(p))
  state = {k: v.contiguous() for k, v in model.state_dict().items()
           if k not in ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight')}
  if v11:
    # transformers>=5 always ties the head; FlanT5 checkpoints have their own lm_head.
    head = torch.randn(vocab_size, d_model) * d_model**-0.5
    head[config.eos_token_id] *= eos_boost  # > 1: EOS wins more often, inside short horizons
    model.lm_head.weight = torch.nn.Parameter(head)
    state['lm_head.weight'] = model.lm_head.weight.detach().clone()
  else:
    state.pop('lm_head.weight', None)
  os.makedirs(path, exist_ok=True)
  save_file(state, os.path.join(path, 'model.safetensors'))
  hf = config.to_dict()
  hf['tie_word_embeddings'] = not v11  # as the real FlanT5 / t5 v1.0 configs say
  hf.pop('scale_decoder_outputs', None)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(hf, f)
  return model


def save_tiny_bert(path: str, seed: int = 0, vocab_size: int = 120, hidden: int = 32,
                   layers: int = 2, heads: int = 4, intermediate: int = 64):
  """Saves a random BertModel with safetensors and returns it (eval)."""
  from transformers import BertConfig, BertModel
  torch.manual_seed(seed)
  config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, intermediate_size=intermediate,
                      max_position_embeddings=64, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)
  model = BertModel(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(path)
  return model


LLAMA3_ROPE = {'rope_type': 'llama3', 'rope_theta': 500000.0, 'factor': 8.0,
               'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
               'original_max_position_embeddings': 64}


def save_tiny_decoder(path: str, model_type: str = 'llama', seed: int = 0, vocab_size: int = 320,
                      hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                      intermediate: int = 48, tied: bool = False, rope: dict | None = None,
                      eos_boost: float = 1.0, eos_token_id: int = 2):
  """Saves a random LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM and returns it (eval).

  Every parameter gets noise (non-trivial norms and biases); eos_boost > 1 scales the EOS row of
  the head (the embedding when tied) so that EOS wins inside short generation horizons.
  """
  import transformers
  torch.manual_seed(seed)
  names = {'llama': ('LlamaConfig', 'LlamaForCausalLM'), 'qwen2': ('Qwen2Config',
                                                                   'Qwen2ForCausalLM'),
           'qwen3': ('Qwen3Config', 'Qwen3ForCausalLM')}[model_type]
  kw = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            max_position_embeddings=256, tie_word_embeddings=tied, bos_token_id=1,
            eos_token_id=eos_token_id, rms_norm_eps=1e-6,
            rope_parameters=rope or {'rope_type': 'default', 'rope_theta': 10000.0})
  if model_type == 'qwen3':
    kw['head_dim'] = hidden // heads
  config = getattr(transformers, names[0])(**kw)
  model = getattr(transformers, names[1])(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
    head = model.get_output_embeddings().weight
    head[eos_token_id] *= eos_boost
  model.save_pretrained(path)
  return model


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def save_byte_bpe_tokenizer(path: str, corpus: list[str], vocab_size: int = 300,
                            bos: bool = True, eos: bool = True,
                            chat_template: str | None = None) -> None:
  """A tiny byte-level BPE (with merges) trained on `corpus`, saved beside a model's files.

  transformers picks the tokenizer class from config.json's model_type (Qwen2Tokenizer for
  qwen2), which needs a real byte-level BPE; bos=True adds <s> in front of every text, as
  Llama's tokenizer does.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  specials = ['<unk>', '<s>', '</s>']
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(corpus, trainer)
  if bos:
    tok.post_processor = processors.TemplateProcessing(single='<s> $A', pair='<s> $A $B',
                                                       special_tokens=[('<s>', 1)])
  kw = dict(bos_token='<s>', unk_token='<unk>')
  if eos:
    kw['eos_token'] = '</s>'
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kw)
  if chat_template:
    fast.chat_template = chat_template
  fast.save_pretrained(path)
