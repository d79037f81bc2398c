"""The personalised system shared by train, evaluate and export: backbone, plug, loss, generation."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh

from pplug_jax import storage
from pplug_jax import partitioning, tokenizers
from pplug_jax.data import pipeline
from pplug_jax.errors import ConfigError
from pplug_jax.models import bert as bert_lib
from pplug_jax.models import backbone, hf_weights, known_configs, plug as plug_lib
from pplug_jax.models import decoder as decoder_lib
from pplug_jax.models.numerics import as_dtype

Batch = dict[str, jax.Array]


@dataclasses.dataclass
class System:
  """The frozen backbone (sharded), the plug module, and the trainable-parameter initialiser."""
  mesh: Mesh
  rules: tuple  # logical axis rules of the mesh
  llm: backbone.Model  # T5 or a decoder-only LM: used only through models/backbone.py
  llm_params: dict
  plug: plug_lib.PersonaPlug
  encoder_dim: int
  query_encoder: bert_lib.Bert | None = None
  query_encoder_params: dict | None = None

  def init_trainable(self, seed: int) -> dict:
    """Fresh trainable params: the plug, plus the input encoder when it is fine-tuned."""
    d = self.encoder_dim
    age = jnp.zeros((1, 1)) if self.plug.uses_dates else None
    plug_params = self.plug.init(jax.random.PRNGKey(seed), jnp.zeros((1, d)),
                                 jnp.zeros((1, 1, d)), jnp.ones((1, 1)), age)['params']
    plug_params = nn.meta.unbox(plug_params)
    out = {'plug': plug_params}
    if self.query_encoder is not None:
      out['query_encoder'] = self.query_encoder_params
    return jax.tree.map(jnp.asarray, out)

  @property
  def uses_dropout(self) -> bool:
    """Whether a training step needs a 'dropout' rng (the LLM or the query encoder has a rate)."""
    rates = [self.llm.config.dropout_rate]
    if self.query_encoder is not None:
      rates.append(self.query_encoder.config.dropout_rate)
    return max(rates) > 0.0

  def soft_tokens(self, trainable: dict, batch: Batch,
                  rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """[I; P_1..P_K] for a batch, and the history attention weights; rng turns on dropout."""
    if self.query_encoder is None:
      query = batch['query_embedding']
    else:
      query = self.query_encoder.apply({'params': trainable['query_encoder']},
                                       batch['query_encoder_ids'], batch['query_encoder_mask'],
                                       method=bert_lib.Bert.embed_text, rngs=_dropout_rngs(rng, 0))
    age = batch['history_age'] if self.plug.uses_dates else None  # time-aware plugs only
    return self.plug.apply({'params': trainable['plug']}, query, batch['history'],
                           batch['history_mask'], age)

  def encoder_inputs(self, trainable: dict | None, llm_params: dict, batch: Batch,
                     persona: bool = True,
                     rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Encoder input embeddings and mask; trainable=None is the plain frozen model."""
    soft = None
    if trainable is not None:
      soft, _ = self.soft_tokens(trainable, batch, rng)
      if not persona:  # ablation: keep the instruction token, zero the persona(s)
        soft = soft.at[:, int(self.plug.instruction):].set(0.0)
    return plug_lib.personalised_inputs(self.llm, llm_params, soft, batch['input_ids'],
                                        batch['input_mask'])

  def loss(self, trainable: dict | None, llm_params: dict, batch: Batch,
           rng: jax.Array | None = None) -> jax.Array:
    """Mean target-token NLL; rows with valid == 0 (eval padding) do not count.

    With `rng` the models' dropout is on (training); without it the loss is deterministic.
    """
    embedded, mask = self.encoder_inputs(trainable, llm_params, batch, rng=rng)
    return self.loss_from_inputs(llm_params, embedded, mask, batch, rng)

  def loss_from_inputs(self, llm_params: dict, embedded: jax.Array, mask: jax.Array,
                       batch: Batch, rng: jax.Array | None = None) -> jax.Array:
    tmask = batch['target_mask']
    if 'valid' in batch:
      tmask = tmask * batch['valid'][..., None]
    return plug_lib.sequence_nll(self.llm, llm_params, embedded, mask, batch['target_ids'], tmask,
                                 rngs=_dropout_rngs(rng, 1))


def _dropout_rngs(rng: jax.Array | None, which: int) -> dict | None:
  """{'dropout': key} for one of the models (0: query encoder, 1: LLM), or None."""
  return None if rng is None else {'dropout': jax.random.fold_in(rng, which)}


def vocab_limit(config) -> int:
  """config.llm.vocab_limit resolved: 0 = every row of the checkpoint; -1 = len(tokenizer) + 2,
  the official code's `resize_token_embeddings` after adding its 2 placeholder tokens (32102 for
  FlanT5, whose checkpoint has 32128 rows)."""
  if config.llm.vocab_limit != -1:
    return int(config.llm.vocab_limit)
  return len(tokenizers.llm_tokenizer(config)) + 2


def llm_family(path: str, hf: dict | None = None) -> str:
  """The backbone family of a Hugging Face directory (or of `hf`), from `model_type`."""
  hf = hf if hf is not None else hf_weights.read_hf_config(path)
  model_type = hf.get('model_type') or 't5'
  if model_type not in backbone.FAMILIES:
    raise decoder_lib.UnsupportedModelError(
        f'{path or "the published config"}/config.json: model_type={model_type!r} is not '
        f'supported; supported: {", ".join(backbone.FAMILIES)}.')
  return model_type


def _published_config(path: str, name: str, known: dict | None, key: str) -> dict:
  """For planning without weights: path's config.json if it has one, else the published one."""
  if path and storage.exists(os.path.join(path, 'config.json')):
    return hf_weights.read_hf_config(path)
  if known is None:
    raise ConfigError(f'config.{key}.name={name!r}: the planner does not know its shape; set '
                      f'config.{key}.path to a directory with its config.json (no weights '
                      'needed).')
  return known


def load_llm(config, mesh: Mesh, abstract: bool = False) -> tuple[backbone.Model, dict]:
  """The frozen LLM of config.llm (family from its config.json), straight into its sharding.

  abstract: no weights are read; the params are ShapeDtypeStructs placed as they would be, and
  the shape comes from config.llm.path's config.json or, without one, the published config of
  config.llm.name (`known_configs`). This is how the planner builds the system.
  """
  rules = tuple(config.logical_axis_rules)
  shardings = lambda boxed: partitioning.logical_shardings(boxed, mesh, rules)
  overrides = dict(remat_policy=config.llm.remat_policy, scan_layers=config.llm.scan_layers,
                   dropout_rate=config.llm.dropout_rate)
  dtype = as_dtype(config.llm.param_dtype)
  path = config.llm.path
  hf = (_published_config(path, config.llm.name, known_configs.llm(config.llm.name), 'llm')
        if abstract else hf_weights.read_hf_config(path))
  if llm_family(path, hf) == 't5':
    # Resizing masks logits and changes no shape: without a tokenizer at hand the plan skips it.
    limit = vocab_limit(config) if not abstract or storage.isdir(path or '') else 0
    llm_config, llm_params = hf_weights.load_t5(path, dtype=dtype, shardings=shardings,
                                                abstract=abstract, hf=hf, vocab_limit=limit,
                                                **overrides)
  else:
    if config.llm.vocab_limit:
      raise ConfigError(f'config.llm.vocab_limit={config.llm.vocab_limit} is for FlanT5 (the '
                        'official resize); set it to 0 for a decoder-only backbone.')
    kv_heads = hf.get('num_key_value_heads') or hf['num_attention_heads']
    model_axis = mesh.shape.get('model', 1)
    llm_config, llm_params = hf_weights.load_decoder(
        path, dtype=dtype, shardings=shardings, abstract=abstract, hf=hf,
        shard_kv_heads=decoder_lib.kv_heads_shardable(kv_heads, model_axis), **overrides)
  llm_config = dataclasses.replace(llm_config, dtype=as_dtype(config.llm.dtype))
  return backbone.make_model(llm_config), llm_params


def encoder_config(config) -> bert_lib.BertConfig:
  """The input encoder's BertConfig, from config.encoder.path or its published config."""
  hf = _published_config(config.encoder.path, config.encoder.name,
                         known_configs.encoder(config.encoder.name), 'encoder')
  bconf, _ = hf_weights.load_bert(config.encoder.path, abstract=True, hf=hf,
                                  pooling=config.encoder.pooling,
                                  normalize=config.encoder.normalize,
                                  dropout_rate=config.encoder.dropout_rate)
  return bconf


def load_system(config, encoder_dim: int, mesh: Mesh, abstract: bool = False) -> System:
  """Loads the frozen LLM straight into its sharding and builds the plug for it.

  abstract: the planner's system, every frozen parameter a placed ShapeDtypeStruct (see
  `load_llm`); the persona scale, which changes no shape, is then config.plug.persona_scale
  or 1.
  """
  rules = tuple(config.logical_axis_rules)
  llm, llm_params = load_llm(config, mesh, abstract)
  llm_config = llm.config
  plug = plug_lib.make_plug(config, encoder_dim, llm_config,
                           backbone.embedding_table(llm_params))
  query_encoder = query_params = None
  if config.encoder.mode == 'finetune':
    hf = (_published_config(config.encoder.path, config.encoder.name,
                            known_configs.encoder(config.encoder.name), 'encoder')
          if abstract else None)
    bconf, query_params = hf_weights.load_bert(config.encoder.path, abstract=abstract, hf=hf,
                                               pooling=config.encoder.pooling,
                                               normalize=config.encoder.normalize,
                                               dropout_rate=config.encoder.dropout_rate)
    if bconf.hidden_size != encoder_dim:
      raise ConfigError(f'config.encoder.path={config.encoder.path!r} has dim {bconf.hidden_size}, '
                      f'the records {encoder_dim}: use the encoder the records were made with.')
    query_encoder = bert_lib.Bert(bconf)
  return System(mesh, rules, llm, llm_params, plug, encoder_dim, query_encoder, query_params)


def warmup_steps(warmup_frac: float, total_steps: int) -> int:
  """The warm-up's length, the one rounding rule of every optimiser here: the nearest whole
  step to `warmup_frac` of the steps (Python's round), and at least one."""
  return max(1, int(round(warmup_frac * total_steps)))


def warmup_linear_schedule(lr: float, warmup_frac: float, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to `lr` over warmup_steps(...), then linear decay to 0 at
  `total_steps` (transformers' get_linear_schedule_with_warmup, LaMP's WarmupLinearScheduler)."""
  warmup = warmup_steps(warmup_frac, total_steps)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup),
       optax.linear_schedule(lr, 0.0, max(1, total_steps - warmup))], [warmup])


def build_optimizer(config, total_steps: int) -> tuple[optax.GradientTransformation, Any]:
  """AdamW with linear warm-up then linear decay to 0, after global-norm clipping."""
  o = config.optim
  schedule = warmup_linear_schedule(o.lr, o.warmup_frac, total_steps)
  mask = hf_decay_mask if o.decay_mask == 'hf' else None
  tx = optax.chain(optax.clip_by_global_norm(o.grad_clip),
                   optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=o.weight_decay,
                               mask=mask))
  return tx, schedule


def hf_decay_mask(params: dict) -> dict:
  """True where Hugging Face's Trainer applies weight decay: not biases, not LayerNorm weights
  (our norm modules' names end in 'norm')."""
  from flax import traverse_util
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({
      k: not (k[-1] == 'bias' or (len(k) > 1 and k[-2].endswith('norm'))) for k in flat})


def make_train_step(system: System, tx: optax.GradientTransformation, seed: int = 0):
  """(state, llm_params, batch[accum, micro, ...]) -> (state, metrics); grads only for the plug.

  The frozen LLM is a separate argument: it is never differentiated, has no optimizer state,
  and is not donated. When the models have dropout, each micro-batch gets its own key, folded
  from the one seed and the step number, so a resumed run draws the same masks.
  """

  def step(state, llm_params, batch):
    grad_fn = jax.value_and_grad(system.loss)
    n = jax.tree.leaves(batch)[0].shape[0]
    if system.uses_dropout:
      keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), state['step']), n)
    else:
      keys = None

    def micro(acc, inputs):
      mb, key = inputs
      loss, grads = grad_fn(state['params'], llm_params, mb, key)
      return jax.tree.map(jnp.add, acc, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state['params']))
    (loss, grads), _ = jax.lax.scan(micro, zeros, (batch, keys))
    loss, grads = loss / n, jax.tree.map(lambda g: g / n, grads)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    new = {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}
    return new, {'loss': loss, 'grad_norm': optax.tree.norm(grads)}

  return step


def init_state_fn(system: System, tx: optax.GradientTransformation, seed: int):
  """() -> the initial train state {step, params, opt_state}; jit it or eval_shape it."""

  def init_state():
    params = system.init_trainable(seed)
    return {'step': jnp.int32(0), 'params': params, 'opt_state': tx.init(params)}

  return init_state


def compile_train_step(system: System, tx: optax.GradientTransformation, abstract_state,
                       config, shape: tuple[int, int] | None = None) -> tuple[Any, Any, dict]:
  """AOT-compiles the train step for one (input, target) length bucket on the system's mesh.

  Returns (compiled step, state sharding, batch sharding); `shape` defaults to the config's
  maxima. `system.llm_params` may be abstract (ShapeDtypeStructs with shardings), which is how
  `pplug_jax.aot` plans for TPUs it lacks.
  """
  mesh, rules = system.mesh, system.rules
  accum, micro = pipeline.step_layout(config)
  state_sharding = partitioning.replicated_like(abstract_state, mesh)
  shapes = pipeline.shapes(config, system.encoder_dim, *(shape or (None, None)))
  batch_sharding = {k: partitioning.batch_sharding(mesh, rules, 2 + len(s), leading=1)
                    for k, s in shapes.items()}
  step_fn = jax.jit(make_train_step(system, tx, config.seed),
                    in_shardings=(state_sharding,
                                  jax.tree.map(lambda x: x.sharding, system.llm_params),
                                  batch_sharding),
                    out_shardings=(state_sharding, None), donate_argnums=(0,))
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       abstract_state, state_sharding)
  batch = {k: jax.ShapeDtypeStruct((accum, micro) + s,
                                   jnp.float32 if pipeline.is_float(k) else jnp.int32,
                                   sharding=batch_sharding[k]) for k, s in shapes.items()}
  return step_fn.lower(state, system.llm_params, batch).compile(), state_sharding, batch_sharding


def memory_summary(compiled) -> dict[str, float]:
  """Per-device memory of a compiled function in GiB (XLA's AOT memory analysis)."""
  mem = compiled.memory_analysis()
  if mem is None:
    return {}
  get = lambda k: getattr(mem, k, 0) / 2**30
  out = {'arguments': get('argument_size_in_bytes'), 'outputs': get('output_size_in_bytes'),
         'aliased': get('alias_size_in_bytes'), 'temporaries': get('temp_size_in_bytes'),
         'code': get('generated_code_size_in_bytes')}
  out['total'] = (out['arguments'] + out['outputs'] - out['aliased'] + out['temporaries'] +
                  out['code'])
  return out

