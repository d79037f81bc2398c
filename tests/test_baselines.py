"""The retrieval baselines against LaMP's definitions: BM25 order, Contriever scores, prompts.

Prompt expectations are derived by hand from LaMP's create_*_prompt formulas with the ByT5
tokenizer, whose token counts are plain: one token per UTF-8 byte plus the closing </s>.
"""

import json
import math

import numpy as np
import pytest

from pplug_jax.baselines import query_and_corpus, rag_prompt, rank_profile, retrieval, runner
from pplug_jax.data import lamp
from pplug_jax.errors import ConfigError


@pytest.fixture(scope='module')
def byte_tok():
  from transformers import ByT5Tokenizer
  return ByT5Tokenizer(extra_ids=0)


# ------------------------------------------------------------------ BM25 (Okapi, k1 1.5, b .75)

def _okapi_scores(corpus, query, k1=1.5, b=0.75, eps=0.25):
  """BM25Okapi written from its definition (rank_bm25's variant: negative idf -> eps * mean)."""
  docs = [d.split() for d in corpus]
  n = len(docs)
  avgdl = sum(len(d) for d in docs) / n
  df = {}
  for d in docs:
    for w in set(d):
      df[w] = df.get(w, 0) + 1
  idf = {w: math.log(n - f + 0.5) - math.log(f + 0.5) for w, f in df.items()}
  floor = eps * sum(idf.values()) / len(idf)
  idf = {w: (v if v >= 0 else floor) for w, v in idf.items()}
  out = []
  for d in docs:
    s = 0.0
    for q in query.split():
      tf = d.count(q)
      s += idf.get(q, 0.0) * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(d) / avgdl))
    out.append(s)
  return np.array(out)


def test_bm25_order_with_ties_is_lamps(byte_tok):
  texts = ['robot space laser', 'a quiet love story', 'robot space laser', 'space opera robot',
           'Robot laser', 'the love story', 'a quiet love story', 'laser show']
  profile = [{'id': str(i), 'description': t, 'tag': 'x', 'date': '2020-01-01'}
             for i, t in enumerate(texts)]
  question = 'Which tag? description: robot laser love'
  query, corpus = query_and_corpus('LaMP-2', question, profile)
  assert query == 'robot laser love' and corpus == texts
  scores = _okapi_scores(corpus, query)
  assert len(set(np.round(scores, 9))) < len(scores)  # there are ties
  want = [profile[i]['id'] for i in np.argsort(scores)[::-1][:5]]  # get_top_n's order
  got = [p['id'] for p in rank_profile('2', question, profile, 'bm25', 5)]
  assert got == want
  from rank_bm25 import BM25Okapi
  np.testing.assert_allclose(BM25Okapi([d.split() for d in corpus]).get_scores(query.split()),
                             scores, rtol=1e-12)


def test_recency_random_and_queries_per_task():
  profile = [{'id': 'a', 'text': 't1', 'date': '2019-12-31'},
             {'id': 'b', 'text': 't2', 'date': '2020-1-2'},
             {'id': 'c', 'text': 't3', 'date': '2020-01-10'},
             {'id': 'd', 'text': 't4', 'date': '2018-05-05'}]
  got = rank_profile('LaMP_7', 'x: y', profile, 'recency', 3)
  assert [p['id'] for p in got] == ['c', 'b', 'a']  # integer tuples, newest first
  r1 = rank_profile(7, 'x: y', profile, 'random', 6, seed=1)
  assert len(r1) == 6 and r1 == rank_profile(7, 'x: y', profile, 'random', 6, seed=1)
  cite = ('For an author who has written the paper with the title "A", which reference is '
          'related? Just answer with [1] or [2] without explanation. [1]: "B b" [2]: "C"')
  assert query_and_corpus(1, cite, [{'title': 't', 'abstract': 'a'}]) == ('B b C', ['t a'])
  assert query_and_corpus(4, 'headline for article: news here',
                          [{'title': 'T', 'text': 'X'}]) == ('news here', ['T X'])
  assert query_and_corpus(5, 'title for the paper: abc', [{'title': 'T', 'abstract': 'A'}])[0] \
      == 'abc'
  assert query_and_corpus(3, 'score of review: good', [{'text': 'ok', 'score': 4}])[0] == 'good'
  with pytest.raises(lamp.LampError, match='cannot find the retrieval query'):
    query_and_corpus(2, 'no marker here', [])
  with pytest.raises(ValueError, match='k=0'):
    rank_profile(2, 'description: x', profile, 'bm25', 0)
  with pytest.raises(ValueError, match="method='tfidf'"):
    rank_profile(2, 'description: x', profile, 'tfidf', 2)


# ------------------------------------------------------------------ Contriever scores

def test_contriever_scores_match_torch_bert_mean_pooling(minilm_path):
  """Masked mean pooling and an unnormalised dot product, against transformers' BertModel."""
  import torch
  from transformers import AutoTokenizer, BertModel
  from pplug_jax.models.text_encoder import TextEncoder
  texts = ['a robot crew on a starship', 'two friends laugh at a joke',
           'love letters in winter', 'an alien planet and a laser battle far away in space']
  query = 'space robots'
  encoder = TextEncoder(str(minilm_path), 'mean', False)
  tok = AutoTokenizer.from_pretrained(str(minilm_path))
  model = BertModel.from_pretrained(str(minilm_path)).eval()

  def mean_pool(batch):
    enc = tok(batch, padding=True, truncation=True, return_tensors='pt')
    with torch.no_grad():
      h = model(**enc).last_hidden_state
    m = enc['attention_mask'][..., None].float()
    return ((h * m).sum(1) / m.sum(1)).numpy()

  want = mean_pool(texts) @ mean_pool([query])[0]
  got = encoder.encode(texts) @ encoder.encode([query])[0]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  profile = [{'id': str(i), 'description': t, 'tag': 'x'} for i, t in enumerate(texts)]
  ranked = rank_profile(2, f'description: {query}', profile, 'contriever', 2, encoder=encoder)
  assert [p['id'] for p in ranked] == [str(i) for i in np.argsort(-want)[:2]]


# ------------------------------------------------------------------ prompts, byte for byte

def test_lamp2_prompt_truncates_and_carries_saved_tokens(byte_tok):
  question = 'Which tag does this movie relate to? description: a robot'
  items = [{'description': 'two friends laugh', 'tag': 'comedy'},
           {'description': 'A very long story about a starship crew that travels to a distant '
                           'alien planet where they meet a robot who wants to learn how to laugh '
                           'at jokes', 'tag': 'sci-fi'}]
  # input 58 tokens; budget 300 - min(58, 180) = 242; per item (242 - 1 - 2) // 2 = 119.
  # item 1: frame 40, limit 79, uses 18 -> saved 61; item 2: limit 119 + 61 - 40 = 140 tokens,
  # i.e. 139 bytes of its description.
  want = ('the tag for the movie: "two friends laugh" is "comedy" , and the tag for the movie: '
          '"A very long story about a starship crew that travels to a distant alien planet where '
          'they meet a robot who wants to learn how to laugh at j" is "sci-fi" . Which tag does '
          'this movie relate to? description: a robot')
  assert rag_prompt('LaMP-2', question, items, byte_tok, max_length=300) == want


def test_lamp1_titles_go_after_the_first_title(byte_tok):
  question = ('For an author who has written the paper with the title "Deep nets", which '
              'reference is related? Just answer with [1] or [2] without explanation. [1]: '
              '"Graph theory" [2]: "Neural codes"')
  items = [{'title': 'Learning to see in the dark with very deep convolutional networks trained '
                     'end to end', 'abstract': 'x'}, {'title': 'Short', 'abstract': 'y'}]
  # budget 260 - min(183, 156) = 104; per item (104 - 2) // 2 = 51; limit 51 - 2 = 49 tokens.
  want = ('For an author who has written the paper with the title, and "Learning to see in the '
          'dark with very deep convo", and "Short" "Deep nets", which reference is related? Just '
          'answer with [1] or [2] without explanation. [1]: "Graph theory" [2]: "Neural codes"')
  assert rag_prompt(1, question, items, byte_tok, max_length=260) == want


def test_lamp7_budgets_for_user_but_writes_a_person(byte_tok):
  question = ('Paraphrase the following tweet without any explanation before or after it: so '
              'tired today')
  items = [{'text': 'first tweet here is quite long and keeps going on and on about the weather'},
           {'text': 'ok'}]
  # budget 200 - min(91, 120) = 110; header 50; per item (110 - 1 - 2 - 50) // 2 = 28;
  # frame '"" ' is 4 tokens: item 1 keeps 23 bytes.
  want = ('"first tweet here is qui" , and "ok"  are written by a person. Following the given '
          'patterns Paraphrase the following tweet without any explanation before or after it: '
          'so tired today')
  assert rag_prompt('7', question, items, byte_tok, max_length=200) == want


def test_lamp3_4_5_templates(byte_tok):
  review = 'What is the score of the following review on a scale of 1 to 5? review: fine'
  assert rag_prompt(3, review, [{'text': 'great stuff', 'score': 5}], byte_tok) == \
      f'5 is the score for "great stuff" . {review}'
  news = 'Generate a headline for the following article: storm hits town'
  assert rag_prompt(4, news, [{'title': 'Rain', 'text': 'wet day'}], byte_tok) == \
      f'"Rain" is the title for "wet day" . {news}'
  paper = 'Generate a title for the following abstract of a paper: we study X'
  assert rag_prompt(5, paper, [{'title': 'On Y', 'abstract': 'we study Y'}], byte_tok) == \
      f'"On Y" is a title for "we study Y" . Following the given patterns {paper}'


def test_no_items_give_the_plain_input(byte_tok):
  """LaMP divides by the item count; its retries end on the plain input."""
  assert rag_prompt(2, 'description: x', [], byte_tok) == 'description: x'


# ------------------------------------------------------------------ the runner's checks

def test_runner_refuses_bad_methods_k_and_missing_fields(tmp_path):
  from configs import lamp as lamp_config
  config = lamp_config.get_config('demo')
  with pytest.raises(ConfigError, match="--method='bm52'"):
    runner.run(config, str(tmp_path), 'bm52', 4)
  with pytest.raises(ConfigError, match='--k=0'):
    runner.run(config, str(tmp_path), 'bm25', 0)
  questions = [{'id': 'u1', 'input': 'description: x',
                'profile': [{'id': 'p1', 'description': 'd', 'date': '2020-01-01'}]}]
  with pytest.raises(lamp.LampError, match=r"f.json: example id u1, profile item p1: missing "
                                           r"field\(s\) \['tag'\]"):
    retrieval.check_fields('LaMP_2', 'f.json', questions, 'bm25')
  questions[0]['profile'][0].update(tag='t')
  del questions[0]['profile'][0]['date']
  retrieval.check_fields('LaMP_2', 'f.json', questions, 'bm25')
  with pytest.raises(lamp.LampError, match=r"\['date'\]"):
    retrieval.check_fields('LaMP_2', 'f.json', questions, 'recency')


# ------------------------------------------------------------------ PPlug + retrieval

def test_pplug_with_retrieval_records_hold_the_lamp_prompt(tmp_path, minilm_path, byte_tok):
  """config.plug.retrieval: the soft tokens go before the k=1 LaMP prompt, not the plain input."""
  import tensorflow as tf
  from configs import lamp as lamp_config
  from pplug_jax import precompute
  from pplug_jax.data import records, synthetic
  from pplug_jax.errors import RecordsError
  synthetic.generate(str(tmp_path / 'lamp'), 'LaMP_2', users={'train': 6, 'dev': 4, 'test': 2},
                     seed=5, empty_frac=0.0, long_frac=0.0, mean_items=5)
  config = lamp_config.get_config('demo')
  config.data.lamp_dir = str(tmp_path / 'lamp')
  config.data.records_dir = str(tmp_path / 'records')
  config.encoder.path = str(minilm_path)
  config.data.num_shards = 1
  config.plug.retrieval, config.plug.retrieval_k = 'bm25', 1
  meta = precompute.run(config)
  assert meta['fingerprint']['plug_retrieval'] == 'bm25:1'
  parse = records.parse_fn(meta['fingerprint']['dim'], meta['fingerprint']['embedding_dtype'])
  recs = {r['id'].decode(): r for r in tf.data.TFRecordDataset(
      records.split_shards(config.data.records_dir, 'dev')).map(parse).as_numpy_iterator()}
  with open(tmp_path / 'lamp' / 'LaMP_2' / 'dev_questions.json') as f:
    questions = json.load(f)
  for q in questions:
    top = rank_profile(2, q['input'], q['profile'], 'bm25', 1)
    prompt = rag_prompt(2, q['input'], top, byte_tok, config.data.max_input_length)
    assert prompt.startswith('the tag for the movie: "') and f'is "{top[0]["tag"]}"' in prompt
    want = byte_tok(prompt, truncation=True, max_length=config.data.max_input_length)['input_ids']
    assert list(recs[q['id']]['input_ids']) == want
  config.plug.retrieval = ''  # the plain-input records are other records
  with pytest.raises(RecordsError, match="plug_retrieval: 'bm25:1' -> None"):
    precompute.verify_records(config, config.data.records_dir)
