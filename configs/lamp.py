"""PPlug on LaMP: `get_config(arg)` with comma-separated args.

  configs/lamp.py               the embedded demo (same as :demo)
  configs/lamp.py:demo          synthetic LaMP-2, real all-MiniLM-L6-v2, tiny byte-level T5
  configs/lamp.py:demo,llm=decoder
                                the same with a tiny byte-level decoder-only model (Llama)
  configs/lamp.py:task=2,size=xxl,split=time,encoder=bge
                                a real run; set config.llm.path, config.encoder.path and
                                config.data.lamp_dir to local Hugging Face / LaMP directories
  configs/lamp.py:task=2,llm=llama2-7b
                                the backbone by name: flan-t5-small..xxl (size= is the FlanT5
                                shorthand), llama2-7b, llama3.1-8b, qwen2.5-7b, qwen3-8b; any
                                Hugging Face directory of a supported family works through
                                --config.llm.path (its family is read from its config.json)

Every key can be overridden on the command line, e.g. --config.optim.lr=3e-5.
"""

import ml_collections

from pplug_jax import axis_rules
from pplug_jax.data import lamp

SIZES = ('small', 'base', 'large', 'xl', 'xxl')
# Decoder-only backbones: Hugging Face name, and their remat/scan/dtype/mesh defaults (7-8B in
# bf16 is ~15 GiB of weights: the model axis splits them over 4 chips of 16 GiB).
DECODERS = {
    'llama2-7b': dict(name='meta-llama/Llama-2-7b-hf'),
    'llama3.1-8b': dict(name='meta-llama/Llama-3.1-8B'),
    'qwen2.5-7b': dict(name='Qwen/Qwen2.5-7B'),
    'qwen3-8b': dict(name='Qwen/Qwen3-8B'),
}
DECODER_DEFAULTS = dict(dtype='bfloat16', param_dtype='bfloat16',
                        remat_policy='dots_with_no_batch_dims', scan_layers=True)
DECODER_MESH = (-1, 4)
LLMS = tuple(f'flan-t5-{s}' for s in SIZES) + tuple(DECODERS)
DEMO_DECODER = 'decoder'  # configs/lamp.py:demo,llm=decoder: the demo on a tiny Llama
ENCODERS = {
    'bge': dict(name='BAAI/bge-base-en-v1.5', pooling='cls', normalize=True,
                query_prefix='Represent this sentence for searching relevant passages: '),
    'contriever': dict(name='facebook/contriever', pooling='mean', normalize=False,
                       query_prefix=''),
    'minilm': dict(name='sentence-transformers/all-MiniLM-L6-v2', pooling='mean',
                   normalize=True, query_prefix=''),
}


def _parse(arg):
  out = {}
  for part in (arg or '').split(','):
    if not part:
      continue
    key, _, value = part.partition('=')
    out[key] = value or True
  unknown = set(out) - {'demo', 'task', 'size', 'llm', 'split', 'encoder', 'reference'}
  if unknown:
    raise ValueError(f'configs/lamp.py: unknown args {sorted(unknown)}; use demo, task=N, '
                     'size=small..xxl, llm=NAME, split=user|time, '
                     'encoder=bge|contriever|minilm, reference.')
  return out


# The optimised baselines' training (Salemi et al., SIGIR 2024): Adam, lr 1e-5, clipping at 1.0,
# 5 % linear warm-up, 10 epochs, batch 64.
SALEMI_OPTIMISATION = dict(lr=1e-5, batch_size=64, epochs=10, warmup_frac=0.05, grad_clip=1.0,
                           checkpoint_every=500)


def _resumable(c, key, value):
  """Sets config.<key> (a value or a whole section) and marks it as one that may change when a
  run resumes: how it logs, evaluates and places arrays, and what runs after training. Every
  key not marked trains something else, and checkpoints refuse to resume with it changed."""
  section, _, name = key.rpartition('.')
  (c[section] if section else c)[name] = value
  c.resumable_keys = (*c.resumable_keys, key)


def get_config(arg=None):
  args = _parse(arg)
  demo = 'demo' in args or not args
  if demo and args.get('task', '2') != '2':
    raise ValueError(f'configs/lamp.py: the demo is synthetic LaMP-2; task={args["task"]} needs '
                     'a real config, e.g. configs/lamp.py:task=N,size=small.')
  task = int(args.get('task', 2))
  if not 1 <= task <= 7:
    raise ValueError(f'configs/lamp.py: task={task} must be 1..7.')
  size = args.get('size', 'xxl')
  if size not in SIZES:
    raise ValueError(f'configs/lamp.py: size={size!r} must be one of {SIZES}.')
  llm = args.get('llm', f'flan-t5-{size}')
  if 'llm' in args and 'size' in args and llm != f'flan-t5-{size}':
    raise ValueError(f'configs/lamp.py: size={size} and llm={llm} name two backbones; give one.')
  if llm == DEMO_DECODER and not demo:
    raise ValueError(f'configs/lamp.py: llm={DEMO_DECODER} is the demo\'s tiny decoder-only '
                     f'model; use configs/lamp.py:demo,llm={DEMO_DECODER}.')
  if demo and 'llm' in args and llm != DEMO_DECODER:
    raise ValueError(f'configs/lamp.py: the demo makes its own tiny model (T5, or '
                     f'llm={DEMO_DECODER}); llm={llm} needs a real config, e.g. '
                     f'configs/lamp.py:task=2,llm={llm}.')
  if llm not in LLMS + (DEMO_DECODER,):
    raise ValueError(f'configs/lamp.py: llm={llm!r} must be one of {LLMS}.')
  if llm.startswith('flan-t5-'):
    size = llm[len('flan-t5-'):]
  encoder = args.get('encoder', 'bge')
  if encoder not in ENCODERS:
    raise ValueError(f'configs/lamp.py: encoder={encoder!r} must be one of {sorted(ENCODERS)}.')

  c = ml_collections.ConfigDict()
  c.resumable_keys = ()  # filled by _resumable below: not a setting
  c.seed = 0
  c.task = f'LaMP_{task}'
  c.split_type = args.get('split', 'user')
  c.demo = demo
  _resumable(c, 'demo_ablations', False)  # the demo only: then the variants study on drift and two_preferences

  c.data = ml_collections.ConfigDict()
  c.data.lamp_dir = ''          # holds LaMP_N/ and/or LaMP_time_N/
  c.data.records_dir = ''       # precompute output; '' = <workdir>/records
  _resumable(c, 'data.rebuild_records', False)  # True: delete records made from other inputs, make them again
  c.data.num_shards = 4
  c.data.num_streams = 0        # data streams of a global batch; 0 = one per process
  c.data.embedding_dtype = 'float32'
  c.data.max_input_length = 256
  c.data.max_target_length = lamp.task_spec(task).max_target_length  # LaMP-3: 10, else 128
  c.data.bucketing = 'auto'     # 'auto': a few length-bucket shapes | 'off': pad to the maxima
  c.data.input_buckets = ()     # input-length bounds by hand; () = from the data (README)
  c.data.target_buckets = ()    # target-length bounds by hand; () = from the data
  c.data.max_history = 512
  c.data.history_cap = 0        # > 0: batches keep only the most recent N of the records' items
  c.data.history_order = 'date'  # 'date': the most recent by date | 'file': the last in the file
  c.data.item_max_length = 512  # encoder tokens per profile item
  c.data.query_max_length = 512
  c.data.query_source = 'input'  # 'input' | 'truncated_input': the official code's query text
  c.data.augment_copies = 10    # extra copies of a history with > 2 items, 0 = off
  c.data.augment_max_drop = 0.5
  c.data.augment_fixed = False  # True: the same copies every epoch, each dropping >= 1 (official)
  c.data.shuffle_buffer = 10_000
  _resumable(c, 'data.prefetch', 2)

  c.encoder = ml_collections.ConfigDict(dict(ENCODERS[encoder]))
  c.encoder.path = ''           # local Hugging Face directory of the encoder
  c.encoder.mode = 'frozen'     # 'frozen': precomputed query embedding | 'finetune'
  _resumable(c, 'encoder.batch_size', 64)
  # bfloat16 on TPU/GPU, float32 on CPU; only the records depend on it, and they check it
  _resumable(c, 'encoder.dtype', 'auto')
  c.encoder.dropout_rate = 0.0  # in the fine-tuned query encoder during training (official: 0.1)

  c.llm = ml_collections.ConfigDict()
  c.llm.name = f'google/flan-t5-{size}'
  c.llm.path = ''               # local Hugging Face directory of the backbone (family from config.json)
  c.llm.tokenizer = ''          # '' = the tokenizer in llm.path; 'byte' = ByT5 bytes
  c.llm.dtype = 'bfloat16'      # compute dtype
  c.llm.param_dtype = 'bfloat16'
  c.llm.remat_policy = 'none' if size in ('small', 'base') else 'dots_with_no_batch_dims'
  c.llm.scan_layers = size in ('xl', 'xxl')
  c.llm.vocab_limit = 0         # 0: all rows; -1: len(tokenizer) + 2 (the official resize); N
  c.llm.dropout_rate = 0.0      # in the frozen LLM during training steps only (official: 0.1)
  c.llm.chat_template = False   # decoder-only: wrap the input in the tokenizer's chat template

  c.plug = ml_collections.ConfigDict()
  c.plug.persona_scale = -1.0   # -1: mean L2 norm of the backbone's token embeddings
  c.plug.instruction_scale_divisor = 7.0
  c.plug.dtype = 'float32'
  c.plug.retrieval = ''         # '' | 'bm25' | 'recency': PPlug + retrieval (the paper's Table 3)
  c.plug.retrieval_k = 1        # items in the LaMP prompt the soft tokens are prepended to
  # Variants (README "Ablations and variants"); the defaults are the paper's PPlug.
  c.plug.pooling = 'attention'  # 'attention' (input-aware) | 'mean': uniform over the items
  c.plug.instruction = True     # False: no instruction token, the persona(s) alone
  c.plug.num_persona_tokens = 1  # K personas, each from its own query (q + a learned offset)
  c.plug.time_decay = 'none'    # 'learned': scores q . h - lambda * age (days; needs item dates)
  c.plug.time_decay_init = 1e-3  # lambda's starting value, per day of age (>= 0)

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.weight_decay = 1e-4
  c.optim.decay_mask = 'all'    # 'all' | 'hf': no decay on biases and LayerNorm weights (HF Trainer)
  c.optim.warmup_frac = 0.05
  c.optim.grad_clip = 1.0
  c.optim.batch_size = 16       # global batch of one micro-step (reference: 2 per device)
  c.optim.grad_accum = 8
  c.optim.epochs = 1 if task == 3 else 2
  c.optim.max_steps = -1        # -1: from epochs

  _resumable(c, 'train', ml_collections.ConfigDict())  # logging, evaluation, checkpoints
  c.train.log_every = 50
  c.train.eval_every = 500
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 3
  c.train.eval_batch_size = 16
  c.train.max_eval_batches = -1
  c.train.eval_persona_zeroed = False  # True: also the final dev metrics with the persona zeroed
  c.train.profile_steps = ()    # (start, stop): a jax.profiler trace of those steps in <workdir>/profile

  _resumable(c, 'eval', ml_collections.ConfigDict())  # generation after training
  c.eval.num_beams = 4
  c.eval.length_penalty = 1.0
  c.eval.early_stopping = False
  c.eval.explain_top_k = 5     # evaluate writes the top-k history items per example
  # follows data.max_target_length (a one-way link: setting this key alone breaks it)
  c.eval.max_new_tokens = c.data.get_ref('max_target_length') + 0

  c.rag = ml_collections.ConfigDict()  # the retrieval baselines (python -m pplug_jax.baselines)
  c.rag.k = 4                   # PPlug's RAG setting (LaMP's script default is 1)
  c.rag.max_length = 512        # LLM input tokens of a RAG prompt (LaMP's default is 256)
  c.rag.retriever_path = ''     # Contriever's directory (facebook/contriever), for 'contriever'
  c.rag.retriever_pooling = 'mean'

  # The optimised retrieval baselines (Salemi et al., SIGIR 2024); README "ROPG and RSPG".
  # They run after training and check their own inputs.
  _resumable(c, 'ropg', ml_collections.ConfigDict())  # python -m pplug_jax.baselines.utility, then .ropg
  c.ropg.candidates = 16        # l: items of the initial ranking scored per query (paper 16)
  c.ropg.initial_ranker = 'contriever'  # 'bm25' | 'contriever' | 'recency' | 'file' (file order)
  c.ropg.temperature = 1.0      # KD temperature (the reference's default)
  c.ropg.kd_form = 'kl'         # 'kl' (the paper) | 'reference' (the code's cross-entropy form)
  c.ropg.query_max_length = 512
  c.ropg.doc_max_length = 512
  c.ropg.dropout = 0.1          # in the retriever while training (BERT's default, as the code)
  c.ropg.update(SALEMI_OPTIMISATION)

  _resumable(c, 'rspg', ml_collections.ConfigDict())  # python -m pplug_jax.baselines.rspg --kind pre|post
  c.rspg.retrievers = ('none', 'bm25', 'contriever', 'recency', 'ropg-rl', 'ropg-kd')
  c.rspg.model_path = ''        # the selection model's BERT directory; '' = rag.retriever_path
  c.rspg.max_length = 512
  c.rspg.temperature = 1.0
  c.rspg.loss_form = 'kl'       # 'kl' | 'reference' (the same at temperature 1)
  c.rspg.dropout = 0.1
  c.rspg.update(SALEMI_OPTIMISATION)

  # (data, model); -1 = all remaining devices. On a v5e-8, XXL needs the weights split: (8, 1)
  # needs 23 GiB of temporaries per chip, (2, 4) 8.8 GiB (the planner); the README's runbook
  # sets --config.mesh_shape='(-1,4)'. The default runs on any number of devices.
  _resumable(c, 'mesh_shape', (-1, 1))  # placement: a resume may use other devices
  _resumable(c, 'logical_axis_rules', axis_rules.STANDARD_RULES)
  if llm in DECODERS:
    c.llm.name = DECODERS[llm]['name']
    c.llm.update(DECODER_DEFAULTS)
    c.mesh_shape = DECODER_MESH

  if 'reference' in args:
    _reference(c)
  if demo:
    _demo(c, decoder=llm == DEMO_DECODER)
  return c


# The official PPlug code's persona scale, the same for every backbone (code/ModelForPer.py).
REFERENCE_PERSONA_SCALE = 539.9738


def _reference(c):
  """Trains as the official PPlug code does; README "Fidelity to the official code" has the rows.

  Each row is its own key, so one can be taken at a time.
  """
  c.plug.persona_scale = REFERENCE_PERSONA_SCALE  # row 1: one constant for every backbone
  c.llm.vocab_limit = -1                         # row 2: resize to len(tokenizer) + 2
  c.data.history_order = 'file'                  # row 4: his_id[-512:] in file order
  c.encoder.mode = 'finetune'                    # row 6: the query-side BGE is trained
  c.optim.decay_mask = 'hf'                      # row 8: no decay on biases and LayerNorm
  c.data.augment_fixed = True                    # row 9: copies made once, each drops >= 1
  c.llm.dropout_rate = 0.1                       # row 7: dropout while training, in FlanT5
  c.encoder.dropout_rate = 0.1                   # and in BGE
  c.data.query_source = 'truncated_input'        # row 3: the query from the cut LLM input,
  c.data.query_max_length = c.data.max_input_length + 20  # with BGE's limit at input + 20
  c.encoder.query_prefix = c.encoder.query_prefix.rstrip()  # and no space after the colon


def _demo(c, decoder: bool = False):
  """Runs anywhere with nothing downloaded: see README 'The embedded demo'.

  decoder=True: the same demo on a tiny byte-level decoder-only model (model_type llama) in
  place of the tiny T5, of a similar size; everything else is the same.
  """
  c.task = 'LaMP_2'
  c.demo_data = ml_collections.ConfigDict(dict(
      train_users=400, dev_users=100, test_users=60, num_preferences=4, mean_items=12,
      empty_frac=0.05, long_frac=0.01, signal=0.5,
      scenario='stable'))  # or 'drift', 'two_preferences' (pplug_jax/data/synthetic.py)
  _resumable(c, 'demo_compare', True)  # after training, the ablations and the retrieval baselines (Table 1)
  # Also ROPG-RL/KD and RSPG-Pre/Post (about 6 more minutes on 2 CPU cores), with the reduced
  # settings below: l = 4 candidates, one epoch, batch 8, a higher learning rate, short inputs.
  _resumable(c, 'demo_optimized', False)
  c.ropg.update(candidates=4, lr=5e-5, batch_size=8, epochs=1, query_max_length=64,
                doc_max_length=64, checkpoint_every=20)
  c.rspg.update(lr=5e-5, batch_size=8, epochs=1, max_length=96, checkpoint_every=20)
  c.demo_model = ml_collections.ConfigDict(dict(
      family='t5', d_model=64, num_heads=4, d_kv=16, d_ff=128, num_layers=2, pretrain_steps=500,
      pretrain_lr=3e-3, pretrain_batch_size=32))
  c.encoder.update(ENCODERS['minilm'])
  c.llm.name = 'demo-tiny-t5-byte'
  c.llm.tokenizer = 'byte'
  c.llm.dtype = 'float32'
  c.llm.param_dtype = 'float32'
  c.llm.remat_policy = 'none'
  c.llm.scan_layers = False
  c.mesh_shape = (-1, 1)  # a tiny model: data parallel only
  c.data.num_shards = 2
  c.data.max_input_length = 128
  c.data.max_target_length = 16
  c.data.max_history = 64
  c.data.item_max_length = 64
  c.data.query_max_length = 64
  c.data.augment_copies = 2
  c.optim.lr = 3e-3
  c.optim.batch_size = 16
  c.optim.grad_accum = 1
  c.optim.epochs = 3
  c.train.log_every = 20
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  c.train.eval_batch_size = 40  # a multiple of 8: the demo also runs on 8 devices
  c.eval.num_beams = 1
  # RAG prompts in bytes: 192 keeps the k = 4 retrieved tags (LaMP's budget leaves no room for
  # the descriptions at this length) and keeps the tiny model's fitting fast.
  c.rag.max_length = 192
  if decoder:
    c.llm.name = 'demo-tiny-llama-byte'
    c.llm.tokenizer = ''  # its own byte-level tokenizer files, beside the weights (BOS + bytes)
    # hidden 128 and 4 layers: at hidden 64 and 2 layers the frozen decoder cannot spell a tag
    # that is not in its prompt, so no soft token can make it answer (README, issue 33's table)
    c.demo_model = ml_collections.ConfigDict(dict(
        family='llama', hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=32,
        intermediate_size=384, num_layers=4, pretrain_steps=500, pretrain_lr=3e-3,
        pretrain_batch_size=32))
