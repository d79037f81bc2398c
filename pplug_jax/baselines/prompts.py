"""LaMP's retrieval-augmented prompts (`create_*_prompt` in LaMP/prompts/prompts.py), exactly.

For k retrieved items and a token budget B:

- budget: `B = max_length - min(len(tok(input)), int(factor * max_length))` with factor 0.6;
  if building the prompt raises (an impossible truncation length, an empty profile), factor drops
  by 0.1 (in floating point, as LaMP: 0.6 - 0.1 = 0.49999999999999994) and it retries; below 0 the
  plain input is returned.
- per item: `per = (B - 1 - 2 * (k - 1) - len(tok(header))) // k` (LaMP-1 has no `- 1` and no
  header). Each item's free text is cut with the LLM tokenizer to
  `per + saved - len(tok(frame))` tokens and decoded with `skip_special_tokens`; the unused part
  carries over: `saved += per - len(tokens) - len(frame)`.
- the pieces are joined with `", and "`.

Quirks kept on purpose (they are LaMP's behaviour):
- LaMP-1 inserts the quoted titles right after the first `title` of the input, with `, and `.
- LaMP-5 measures its frame as `"{title}" is a title " " ` but writes `... is a title for ...`.
- LaMP-7 budgets for the header `are written by user. Following the given patterns` but writes
  `are written by a person. Following the given patterns`.
- token counts include the special tokens the tokenizer adds (FlanT5: the closing `</s>`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from pplug_jax.baselines.retrieval import task_name


@dataclasses.dataclass(frozen=True)
class PromptSpec:
  """How one task lays out a retrieved item: which field is cut, and the text around it."""
  field: str                                  # the free text that is truncated
  frame: Callable[[dict], str] | int          # what the budget counts besides that text
  piece: Callable[[dict, str], str]           # the item as written, given its cut text
  assemble: Callable[[str, str], str]         # (input, joined pieces) -> prompt
  header: str | None = None                   # reserved once, before the per-item split
  minus_one: bool = True                      # LaMP-1 alone has no `- 1` in the split


def _after_title(question_input: str, joined: str) -> str:
  i = question_input.find('title')
  if i < 0:
    return question_input
  return question_input[:i + 5] + ', and ' + joined + question_input[i + 5:]


SPECS: dict[str, PromptSpec] = {
    'LaMP_1': PromptSpec('title', 2, lambda p, t: f'"{t}"', _after_title, minus_one=False),
    'LaMP_2': PromptSpec('description', lambda p: f'the tag for the movie: " " is "{p["tag"]}" ',
                         lambda p, t: f'the tag for the movie: "{t}" is "{p["tag"]}" ',
                         lambda x, j: f'{j}. {x}'),
    'LaMP_3': PromptSpec('text', lambda p: f'{p["score"]} is the score for " " ',
                         lambda p, t: f'{p["score"]} is the score for "{t}" ',
                         lambda x, j: f'{j}. {x}'),
    'LaMP_4': PromptSpec('text', lambda p: f'"{p["title"]}" is the title for " " ',
                         lambda p, t: f'"{p["title"]}" is the title for "{t}" ',
                         lambda x, j: f'{j}. {x}'),
    'LaMP_5': PromptSpec('abstract', lambda p: f'"{p["title"]}" is a title " " ',
                         lambda p, t: f'"{p["title"]}" is a title for "{t}" ',
                         lambda x, j: f'{j}. Following the given patterns {x}',
                         header='Following the given patterns'),
    'LaMP_6': PromptSpec('text', lambda p: f'"{p["title"]}" is the title for " " ',
                         lambda p, t: f'"{p["title"]}" is the title for "{t}" ',
                         lambda x, j: f'{j}. {x}'),
    'LaMP_7': PromptSpec('text', lambda p: '"" ', lambda p, t: f'"{t}" ',
                         lambda x, j: f'{j} are written by a person. Following the given '
                                      f'patterns {x}',
                         header='are written by user. Following the given patterns'),
}


def _n_tokens(tokenizer: Any, text: str) -> int:
  return len(tokenizer(text)['input_ids'])


def _build(spec: PromptSpec, question_input: str, items: Sequence[dict], budget: int,
           tokenizer: Any) -> str:
  """One attempt at the prompt within `budget` tokens; raises where LaMP's code raises."""
  k = len(items)
  reserved = (1 if spec.minus_one else 0) + 2 * (k - 1)
  if spec.header is not None:
    reserved += _n_tokens(tokenizer, spec.header)
  per_item = (budget - reserved) // k  # ZeroDivisionError for no items, as in LaMP
  saved = 0
  pieces = []
  for item in items:
    frame = spec.frame if isinstance(spec.frame, int) else _n_tokens(tokenizer, spec.frame(item))
    ids = tokenizer(str(item[spec.field]), max_length=per_item + saved - frame,
                    truncation=True)['input_ids']
    saved += per_item - len(ids) - frame
    text = tokenizer.batch_decode([ids], skip_special_tokens=True)[0]
    pieces.append(spec.piece(item, text))
  return spec.assemble(question_input, ', and '.join(pieces))


def rag_prompt(task: Any, question_input: str, items: Sequence[dict], tokenizer: Any,
               max_length: int = 512) -> str:
  """LaMP's prompt for `items` (best first) within `max_length` LLM tokens.

  `tokenizer` is any Hugging Face tokenizer (FlanT5's for the paper's setting). With no items the
  plain input comes back, as in LaMP.
  """
  spec = SPECS[task_name(task)]
  input_tokens = _n_tokens(tokenizer, question_input)
  factor = 0.6
  while True:
    try:
      budget = max_length - min(input_tokens, int(factor * max_length))
      return _build(spec, question_input, items, budget, tokenizer)
    except Exception:  # LaMP retries on any failure with a larger share for the items
      factor -= 0.1
      if factor < 0:
        return question_input
