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

Each task's layout (the field cut, the frame, the piece and the assembly) is its
`TaskSpec.prompt` in `data/tasks.py`.

Quirks kept on purpose (they are LaMP's behaviour):
- LaMP-1 inserts the quoted titles right after the first `title` of the input, with `, and `.
- LaMP-5 measures its frame as `"{title}" is a title " " ` but writes `... is a title for ...`.
- LaMP-7 budgets for the header `are written by user. Following the given patterns` but writes
  `are written by a person. Following the given patterns`.
- token counts include the special tokens the tokenizer adds (FlanT5: the closing `</s>`).
"""

from __future__ import annotations

from typing import Any, Sequence

from pplug_jax.data.tasks import PromptSpec, task_spec


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
  spec = task_spec(task).prompt
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
