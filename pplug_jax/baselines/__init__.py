"""The retrieval baselines of the paper's Table 1, as LaMP runs them.

    rank_profile(task, question_input, profile, method, k, encoder=None) -> list[dict]
    rag_prompt(task, question_input, items, tokenizer, max_length=512) -> str

`python -m pplug_jax.baselines --config ... --method bm25 --k 4 --split dev --workdir W` runs one
over a split with the frozen FlanT5 (see runner.py); `python -m pplug_jax.table` lays them out.
"""

from pplug_jax.baselines.prompts import rag_prompt
from pplug_jax.baselines.retrieval import METHODS, query_and_corpus, rank_profile

__all__ = ['METHODS', 'query_and_corpus', 'rag_prompt', 'rank_profile']
